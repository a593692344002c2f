"""Batched sampling (`sample_batch`) against per-request `sample_one`; rows that are no distribution
(NaN/inf logits) draw their argmax instead of raising."""

import math

import pytest
import torch

from thinktalk.errors import InputError
from thinktalk.request import Request, SamplingParams, sampling_from
from thinktalk.sampler import filter_logits, sample_batch, sample_one, top_logprobs


def _req(**sp):
    r = Request([1, 2, 3], torch.zeros(3, 3, dtype=torch.long), 0, SamplingParams(**sp))
    if r.sampling.seed is not None:
        r.generator = torch.Generator().manual_seed(r.sampling.seed)
    return r


def test_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    reqs = [
        _req(temperature=0),  # greedy, batched
        _req(temperature=0.7, top_k=2),  # sampled, batched
        _req(temperature=0, repetition_penalty=1.3),  # own pass (penalty)
        _req(temperature=0.9, seed=11),  # own pass (seeded)
        _req(temperature=0, logprobs=3),  # own pass (logprobs)
        _req(temperature=0.7, top_k=2),  # same group as row 1
    ]
    out = sample_batch(logits, reqs)
    assert out[0] == (int(logits[0].argmax()), None)
    top2 = [set(torch.topk(logits[i], 2).indices.tolist()) for i in range(6)]
    assert out[1][0] in top2[1] and out[5][0] in top2[5]
    assert out[2][0] == sample_one(logits[2], reqs[2].sampling, reqs[2].prompt_ids, [], None)[0]
    seeded = sample_one(logits[3], reqs[3].sampling, [1, 2, 3], [], torch.Generator().manual_seed(11))[0]
    assert out[3][0] == seeded
    token, logprobs = out[4]
    assert token == int(logits[4].argmax()) and logprobs is not None
    torch.testing.assert_close(logprobs, torch.log_softmax(logits[4], -1))
    assert all(lp is None for i, (_, lp) in enumerate(out) if i != 4)


def test_batched_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).repeat(4000, 1)
    out = sample_batch(logits, [_req(temperature=1.0)] * 4000)
    counts = torch.bincount(torch.tensor([t for t, _ in out]), minlength=4).float() / 4000
    assert abs(counts[0] - 0.7) < 0.04 and abs(counts[1] - 0.2) < 0.04 and counts[3] == 0


def test_filter_logits_rows_equal_single_rows():
    torch.manual_seed(1)
    logits = torch.randn(5, 300)
    rows = filter_logits(logits, 0.8, 20, 0.9)
    for i in range(5):
        torch.testing.assert_close(rows[i], filter_logits(logits[i], 0.8, 20, 0.9))


@pytest.mark.parametrize("row", [
    [0.0, float("nan"), 1.0, 2.0],
    [0.0, float("inf"), 1.0, float("-inf")],
    [float("-inf")] * 4,
    [float("nan")] * 4,
])
def test_broken_rows_draw_a_token_instead_of_raising(row):
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=3)
    token, logprobs = sample_one(torch.tensor(row), sp, [], [], torch.Generator().manual_seed(0))
    assert 0 <= token < 4
    finite = [x for x in row if not math.isnan(x)]
    if finite and max(finite) > float("-inf"):
        assert row[token] == max(finite)  # the most likely token
    entry = top_logprobs(logprobs, token, 3)
    assert all(math.isfinite(v) for v in [entry["logprob"], *(lp for _, lp in entry["top"])])


def test_tiny_temperature_is_greedy():
    logits = torch.tensor([0.0, 5.0, 4.9])
    for t in (1e-300, 1e-9):
        assert sample_one(logits, SamplingParams(temperature=t), [], [], None)[0] == 1


@pytest.mark.parametrize("penalty", [0, 1e-300, 1e-3, 101, 1e300])
def test_repetition_penalty_out_of_range_is_an_input_error(penalty):
    with pytest.raises(InputError) as info:
        sampling_from(repetition_penalty=penalty)
    assert info.value.param == "repetition_penalty"


def test_broken_rows_in_a_batch_draw_their_argmax():
    logits = torch.randn(3, 50)
    logits[0, 7] = float("inf")
    logits[1] = float("nan")
    reqs = [_req(temperature=0.8), _req(temperature=0.8), _req(temperature=0.8)]
    out = sample_batch(logits, reqs)
    assert out[0][0] == 7 and 0 <= out[1][0] < 50 and 0 <= out[2][0] < 50
