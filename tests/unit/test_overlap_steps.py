"""Overlapped decode steps (engine.py, `overlap_steps`): the next decode step is launched before
the host reads this one's tokens. On the CPU the same order runs synchronously, so a wrong input
row, a lost or repeated token, a token of a stopped request or a leaked block shows up here.
Tiny random thinker in fp32, greedy; the contiguous engine is the reference.
"""

import pytest
import torch

from thinktalk.config import config_from_dict
from thinktalk.engine import Engine, EngineConfig
from thinktalk.request import Request, SamplingParams
from thinktalk.weights.loader import build_model
from thinktalk.weights.tiny import randomize_
from thinktalk.weights.tiny_config import tiny_config_dict

NO_EOS = [-1]
SHAPES = [(5, 1, 12), (19, 2, 3), (33, 3, 9), (7, 4, 6), (26, 5, 14)]  # prompt length, seed, new tokens


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict(tiny_config_dict())
    return randomize_(build_model(cfg, "cpu", torch.float32, with_talker=False), seed=3)


def _requests(speak=False, shapes=SHAPES, **sampling):
    reqs = []
    for n, seed, new in shapes:
        ids = torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        sp = SamplingParams(**{"temperature": 0, "max_new_tokens": new, **sampling})
        r = Request(ids, torch.arange(n)[None].expand(3, -1).clone(), 0, sp)
        r.speaker = "someone" if speak else None
        reqs.append(r)
    return reqs


def _overlapped(**kw):
    return EngineConfig(**{"kv_backend": "paged", "block_size": 4, "num_kv_blocks": 64, "cuda_graphs": True,
                           "overlap_steps": True, **kw})


def _drive(engine, reqs, add_later=()):
    """Step to the end; returns every (request id, token, finished) that step() reported.
    add_later: (step index, request) pairs added while decoding is under way."""
    for r in reqs:
        engine.add_request(r)
    pending = sorted(add_later, key=lambda x: x[0])
    reported, i = [], 0
    while engine.has_work() or pending:
        while pending and pending[0][0] <= i:
            engine.add_request(pending.pop(0)[1])
        reported += [(o.request.request_id, o.new_token, o.finished) for o in engine.step()]
        i += 1
    return reported


def _reference(model, reqs, eos=NO_EOS, capture_layer=None):
    engine = Engine(model, eos, EngineConfig(), capture_layer=capture_layer)
    _drive(engine, reqs)
    return reqs


def _check_reports(reqs, reported):
    """Each request's tokens reported once each, in order, the last one flagged finished."""
    for r in reqs:
        mine = [(t, f) for rid, t, f in reported if rid == r.request_id]
        assert [t for t, _ in mine] == r.output_ids
        assert [f for _, f in mine] == [False] * (len(mine) - 1) + [True]


def test_greedy_tokens_equal_the_reference(model):
    ref = _reference(model, _requests())
    got = _requests()
    engine = Engine(model, NO_EOS, _overlapped())
    reported = _drive(engine, got)
    assert engine.overlap_steps and engine.decode_graphs.steps > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    _check_reports(got, reported)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_launched_step_reports_one_call_later(model):
    engine = Engine(model, NO_EOS, _overlapped())
    req = _requests()[0]
    engine.add_request(req)
    assert len(engine.step()) == 1  # the prefill samples synchronously
    assert engine.step() == []  # the first decode step is launched, its token not read yet
    assert engine._in_flight is not None and len(req.output_ids) == 1
    assert len(engine.step()) == 1 and len(req.output_ids) == 2  # launched the next, landed that one


def test_stop_tokens_drop_the_extra_step_and_free_every_block(model):
    """A request that samples eos has one more token computed (launched before its eos was read):
    it is thrown away, the other requests go on unchanged, and all blocks come back."""
    base = _reference(model, _requests())
    eos = base[0].output_ids[4]  # request 0 stops at its 5th token; others may stop on it too
    ref = _reference(model, _requests(), eos=[eos])
    assert ref[0].finish_reason == "stop" and len(ref[0].output_ids) <= 5
    got = _requests()
    engine = Engine(model, [eos], _overlapped())
    reported = _drive(engine, got)
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in ref]
    _check_reports(got, reported)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_while_a_step_is_in_flight(model):
    ref = _reference(model, _requests())
    got = _requests()
    engine = Engine(model, NO_EOS, _overlapped())
    for r in got:
        engine.add_request(r)
    while engine._in_flight is None:
        engine.step()
    engine.step()
    victim = got[4]
    engine.abort(victim.request_id)
    assert victim.kv is None  # its blocks are free at once
    kept = len(victim.output_ids)
    while engine.has_work():
        engine.step()
    assert victim.finish_reason == "abort" and len(victim.output_ids) == kept
    assert victim.output_ids == ref[4].output_ids[:kept]
    assert [r.output_ids for r in got[:4]] == [r.output_ids for r in ref[:4]]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_arrivals_and_preemption(model):
    """Requests arriving while others decode (the overlapped steps hand over to the scheduler
    and back), a KV cache small enough to preempt, and chunked prefill."""
    ref = _reference(model, _requests())
    got = _requests()
    config = _overlapped(num_kv_blocks=12, kv_watermark=0.0, max_prefill_tokens=16)
    engine = Engine(model, NO_EOS, config)
    launched = 0
    launch = engine._launch

    def counting(*a, **k):
        nonlocal launched
        launched += 1
        return launch(*a, **k)

    engine._launch = counting
    reported = _drive(engine, got[:2], add_later=[(4, got[2]), (7, got[3]), (9, got[4])])
    assert engine.stats["preemptions"] > 0 and launched > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    _check_reports(got, reported)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_speaking_requests_decode_synchronously(model):
    """The talker reads each token and its hidden states right after the step, so a batch with a
    speaking request is never overlapped; tokens and captured hidden states equal the reference."""
    ref = _reference(model, _requests(speak=True), capture_layer=2)
    got = _requests(speak=True)
    engine = Engine(model, NO_EOS, _overlapped(), capture_layer=2)
    for r in got:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
        assert engine._in_flight is None
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    for a, b in zip(ref, got):
        for layer in (0, 2):
            torch.testing.assert_close(torch.cat(a.capture[layer]), torch.cat(b.capture[layer]), rtol=1e-4, atol=1e-4)


def test_requests_with_their_own_sampling_pass_are_not_overlapped(model):
    """Penalties read the tokens so far, so such a batch decodes step by step, with the same
    tokens as without overlapping."""
    ref = _reference(model, _requests(repetition_penalty=1.3))
    got = _requests(repetition_penalty=1.3)
    engine = Engine(model, NO_EOS, _overlapped())
    _drive(engine, got)
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]


def test_sampled_requests_overlap_with_the_same_distribution_rules(model):
    """Unseeded sampled requests are drawn on the device in the overlapped steps; a tiny top_p
    leaves one candidate, so the draw must give the greedy tokens."""
    ref = _reference(model, _requests())
    got = _requests(temperature=0.7, top_p=1e-9)
    engine = Engine(model, NO_EOS, _overlapped())
    _drive(engine, got)
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
