"""Piecewise prefill steps (prefill_graphs.py) against the contiguous reference engine.

On CUDA the pieces replay CUDA graphs; here the same static buffers, padded buckets and eager
attention between pieces run on the CPU, so a wrong row, a padding row leaking into a real one or
a stale residual shows up as a different greedy token or hidden state. Tiny random thinker in fp32.
"""

import pytest
import torch

from thinktalk.config import config_from_dict
from thinktalk.engine import Engine, EngineConfig
from thinktalk.prefill_graphs import BUCKETS, PrefillGraphs
from thinktalk.request import Request, SamplingParams
from thinktalk.weights.loader import build_model
from thinktalk.weights.tiny import randomize_
from thinktalk.weights.tiny_config import tiny_config_dict

EOS = [-1]
SHAPES = [(5, 1, 6), (19, 2, 3), (33, 3, 5), (7, 4, 4), (26, 5, 7)]
# chunked prefill, preemption, prefix reuse and hidden states through the pieces:
# test_decode_graphs.py::test_preemption_prefix_reuse_and_hidden_states[piecewise-prefill]


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict(tiny_config_dict())
    return randomize_(build_model(cfg, "cpu", torch.float32, with_talker=False), seed=3)


def _requests():
    reqs = []
    for n, seed, new in SHAPES:
        ids = torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        reqs.append(Request(ids, torch.arange(n)[None].expand(3, -1).clone(), 0,
                            SamplingParams(temperature=0, max_new_tokens=new)))
    return reqs


def _run(model, config, reqs, spread=False):
    engine = Engine(model, EOS, config)
    for i, r in enumerate(reqs):
        engine.add_request(r)
        if spread and i % 2:  # later requests arrive while earlier ones decode: mixed steps
            engine.step()
    while engine.has_work():
        engine.step()
    return engine


def _pieces(**kw):
    return EngineConfig(**{"kv_backend": "paged", "block_size": 4, "num_kv_blocks": 64, "prefill_graphs": True,
                           "cuda_graphs": False, **kw})


def test_buckets_cover_the_largest_step(model):
    graphs = PrefillGraphs(model.thinker.model, 100)
    assert graphs.buckets[-1] == 128 and graphs.buckets[0] == BUCKETS[0]
    assert graphs.supports(128, None) and not graphs.supports(129, None)
    assert not graphs.supports(10, (torch.zeros(10, dtype=torch.bool), []))  # deepstack: eager


@pytest.mark.parametrize("spread", [False, True], ids=["prefills", "mixed"])
def test_piecewise_prefill_equals_reference(model, spread):
    ref = _requests()
    _run(model, EngineConfig(), ref, spread=spread)
    got = _requests()
    engine = _run(model, _pieces(), got, spread=spread)
    assert engine.prefill_graphs.steps > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_padding_rows_never_reach_real_rows(model):
    """Stale garbage in the padding rows of the static buffers changes nothing."""
    ref = _requests()[:2]
    _run(model, EngineConfig(), ref)
    engine = Engine(model, EOS, _pieces())
    graphs = engine.prefill_graphs
    for buf in (graphs.embeds, graphs.q, graphs.k, graphs.v, graphs.attn, graphs.out, graphs.residual):
        buf.fill_(1e4)
    graphs.positions.fill_(12345.0)
    got = _requests()[:2]
    for r in got:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]


def test_captured_layers_as_the_stack_returns_them(model):
    """Every capture index, the last one included (transformers ties it to the normed output),
    equal to `DecoderStack.forward`'s."""
    from thinktalk.layers.attention import ContiguousKV, SequenceKV

    stack = model.thinker.model
    last = len(stack.layers)
    capture = (0, 1, last)
    n = 21
    embeds = model.thinker.embed(torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(9)))[0]
    positions = torch.arange(n)[None].expand(3, -1)
    with torch.inference_mode():
        want_hidden, want = stack(embeds, positions, ContiguousKV([SequenceKV()], [n]), None, capture)
        hidden, got = PrefillGraphs(stack, 64, capture).run(embeds, positions, ContiguousKV([SequenceKV()], [n]), capture)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)
    assert sorted(got) == sorted(want)
    for c in capture:
        torch.testing.assert_close(got[c], want[c], rtol=1e-5, atol=1e-5)
