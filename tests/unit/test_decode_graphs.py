"""The static-buffer decode step (decode_graphs.py) against the contiguous reference engine.

On CUDA these steps replay CUDA graphs; here, on the CPU, the very same buffers, padding rows and
scratch block run eagerly, so a wrong slot, block-table row or padding write shows up as a
different greedy token. Tiny random thinker in fp32.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # only the test that asks for Triton uses it

import pytest
import torch

from thinktalk.config import config_from_dict
from thinktalk.decode_graphs import buckets_up_to
from thinktalk.engine import Engine, EngineConfig
from thinktalk.request import Request, SamplingParams
from thinktalk.weights.loader import build_model
from thinktalk.weights.tiny import randomize_
from thinktalk.weights.tiny_config import tiny_config_dict

EOS = [-1]  # never sampled: every request runs to its max_new_tokens
# (prompt length, seed, new tokens): different lengths so the decode batch shrinks step by step
SHAPES = [(5, 1, 12), (19, 2, 3), (33, 3, 9), (7, 4, 6), (26, 5, 14)]


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict(tiny_config_dict())
    return randomize_(build_model(cfg, "cpu", torch.float32, with_talker=False), seed=3)


def _requests(speak=False):
    reqs = []
    for n, seed, new in SHAPES:
        ids = torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        r = Request(ids, torch.arange(n)[None].expand(3, -1).clone(), 0, SamplingParams(temperature=0, max_new_tokens=new))
        r.speaker = "someone" if speak else None
        reqs.append(r)
    return reqs


def _run(model, config, reqs, capture_layer=None):
    engine = Engine(model, EOS, config, capture_layer=capture_layer)
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    return engine


def _graphed(**kw):
    return EngineConfig(**{"kv_backend": "paged", "block_size": 4, "num_kv_blocks": 64, "cuda_graphs": True, **kw})


def test_buckets():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(5) == [1, 2, 4, 5]
    assert buckets_up_to(64)[-3:] == [32, 48, 64]


def test_static_decode_equals_reference(model):
    ref = _requests()
    _run(model, EngineConfig(), ref)
    got = _requests()
    # 5 requests, graphs up to 3 (buckets 1, 2, 3): the first decode steps (4-5 requests) run
    # eagerly, the rest through the buffers
    engine = _run(model, _graphed(max_graph_batch=3), got)
    assert engine.decode_graphs is not None and engine.decode_graphs.steps > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_padding_writes_only_the_scratch_block(model):
    engine = Engine(model, EOS, _graphed(max_graph_batch=4))
    pool = engine.pool
    for layer in range(len(pool.k)):
        pool.k[layer].fill_(7.0)  # a marker in every block
    reqs = _requests()[:3]
    for r in reqs:
        r.sampling.max_new_tokens = 3
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    # two decode steps of 3 requests, each in bucket 4: one padding row per step
    assert engine.decode_graphs.steps == 2
    # only the requests' own blocks (prompt + 2 fed tokens each) and the scratch block changed
    own_blocks = sum(-(-(len(r.prompt_ids) + 2) // 4) for r in reqs)
    for layer in range(len(pool.k)):
        changed = ~(pool.k[layer] == 7.0).flatten(1).all(1)
        assert bool(changed[pool.scratch_block])
        assert int(changed[: pool.scratch_block].sum()) == own_blocks


@pytest.mark.parametrize("prefill_graphs", [False, True], ids=["eager-prefill", "piecewise-prefill"])
def test_preemption_prefix_reuse_and_hidden_states(model, prefill_graphs):
    """Chunked prefill (16-token budget), preemption by recompute and prefix reuse through the static
    decode step, with the talker's hidden states (layer 0 and 2) captured on the way; and the same
    with the prefill chunks through prefill_graphs.py's pieces."""
    ref = _requests(speak=True)
    _run(model, EngineConfig(), ref, capture_layer=2)
    got = _requests(speak=True)
    config = _graphed(num_kv_blocks=12, kv_watermark=0.0, max_prefill_tokens=16, prefill_graphs=prefill_graphs)
    engine = _run(model, config, got, capture_layer=2)
    assert engine.stats["preemptions"] > 0 and engine.stats["cached_tokens"] > 0 and engine.decode_graphs.steps > 0
    assert (engine.prefill_graphs is not None and engine.prefill_graphs.steps > 0) == prefill_graphs
    for a, b in zip(ref, got):
        assert a.output_ids == b.output_ids
        for layer in (0, 2):
            x, y = torch.cat(a.capture[layer]), torch.cat(b.capture[layer])
            assert x.shape[0] == y.shape[0] == a.num_tokens - 1
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_hidden_states_of_decoded_tokens_come_back_for_the_next_turn(model):
    """Turn 2 re-sends turn 1's prompt and answer: the prefix it reuses holds answer tokens computed
    by the static decode step, whose talker-layer hidden states that step wrote into the pool's
    side tensor; turn 2 keeps the same hidden states as the reference engine computes."""
    first = _requests(speak=True)[2]
    engine = _run(model, _graphed(), [first], capture_layer=2)
    assert engine.decode_graphs.steps > 0 and engine.pool.hidden is not None

    def second():
        ids = first.prompt_ids + first.output_ids + [17, 18, 19]
        r = Request(ids, torch.arange(len(ids))[None].expand(3, -1).clone(), 0,
                    SamplingParams(temperature=0, max_new_tokens=4))
        r.speaker = "someone"
        return r

    got, ref = second(), second()
    before = engine.stats["cached_tokens"]
    engine.add_request(got)
    while engine.has_work():
        engine.step()
    assert engine.stats["cached_tokens"] - before > len(first.prompt_ids) + 4  # answer tokens reused
    _run(model, EngineConfig(), [ref], capture_layer=2)
    assert got.output_ids == ref.output_ids
    for layer in (0, 2):
        x, y = torch.cat(ref.capture[layer]), torch.cat(got.capture[layer])
        assert x.shape[0] == y.shape[0] == ref.num_tokens - 1
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_fractional_rope_delta(model):
    """A video prompt's decode positions can be fractional; the buffers keep them."""
    def make():
        r = _requests()[2]
        r.rope_delta = 0.5
        return r

    ref, got = make(), make()
    _run(model, EngineConfig(), [ref])
    engine = _run(model, _graphed(), [got])
    assert engine.decode_graphs.steps > 0 and got.output_ids == ref.output_ids


def test_graphs_need_the_paged_cache(model):
    with pytest.raises(ValueError, match="paged"):
        Engine(model, EOS, EngineConfig(kv_backend="contiguous", cuda_graphs=True))


def test_all_triton_kernels_with_static_decode(model):
    """Fused MoE, paged attention and the layer kernels (Triton interpreter) in the static step."""
    from thinktalk.kernels.common import available
    from thinktalk.kernels.common import interpreting

    if not available("cpu") or not interpreting():
        pytest.skip("needs triton and TRITON_INTERPRET=1 before thinktalk is imported")
    ref = _requests()[:2]
    _run(model, EngineConfig(), ref)
    got = _requests()[:2]
    engine = _run(model, _graphed(decode_attention="triton", moe_kernel="triton", layer_kernels="triton"), got)
    assert engine.decode_graphs.steps > 0
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
    # the next test's engine takes the torch references back (use_triton_kernels)


def test_kernel_warm_up_leaves_no_state(model):
    """warm_up_kernels (run at start-up on the GPU) prefills dummy prompts outside the KV cache:
    afterwards the engine answers exactly as a fresh one and holds no blocks."""
    engine = Engine(model, EOS, _graphed())
    engine.warm_up_kernels(lengths=(1, 7, 20))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    got = _requests()[:2]
    for r in got:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    ref = _requests()[:2]
    _run(model, EngineConfig(), ref)
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]


def test_quantized_static_decode_through_the_gemv_kernels():
    """Decoder layers quantized: the static decode step with the Triton kernels (GEMVs for the
    few decode rows, q/k/v stacked into one, CPU interpreter) yields the greedy tokens of the
    reference path."""
    import copy

    from thinktalk.kernels import quant_gemv, quant_moe_gemv
    from thinktalk.kernels.common import interpreting
    from thinktalk.kernels.quant_gemm import use_backend
    from thinktalk.weights.quant import QuantConfig, quantize_model_

    if not interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before the kernels were imported")
    # a model of its own: another test's engine stacked the shared one's float q/k/v
    qmodel = randomize_(build_model(config_from_dict(tiny_config_dict()), "cpu", torch.float32, with_talker=False), seed=3)
    quantize_model_(qmodel, QuantConfig.parse("int4-asym-g32-decoders"))  # lm_head stays fp32 (152k rows)
    ref = _requests()[:2]
    for r in ref:
        r.sampling.max_new_tokens = 4
    got = copy.deepcopy(ref)
    with use_backend("reference"):
        _run(qmodel, EngineConfig(), ref)
    calls = {"gemv": 0, "moe": 0}
    gemv, moe = quant_gemv.quant_gemv, quant_moe_gemv.quant_moe_gemv

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    try:
        quant_gemv.quant_gemv = count("gemv", gemv)
        quant_moe_gemv.quant_moe_gemv = count("moe", moe)
        with use_backend("triton"):
            engine = _run(qmodel, _graphed(max_graph_batch=2, layer_kernels="triton"), got)
    finally:
        quant_gemv.quant_gemv, quant_moe_gemv.quant_moe_gemv = gemv, moe
    assert engine.decode_graphs.steps > 0 and calls["gemv"] > 0 and calls["moe"] > 0
    assert qmodel.thinker.model.layers[0].self_attn.qkv_proj is not None  # fuse_qkv stacked the quantized q/k/v
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]
