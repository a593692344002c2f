"""The paged engine (block manager + paged KV + scheduler) against the contiguous reference engine.

Tiny random thinker in fp32 on the CPU; the paged backend uses the torch reference of the decode
kernel here (the Triton kernels themselves are tested in tests/kernels). Greedy tokens must be
identical in every scenario: batching, chunked prefill, preemption, prefix reuse, media.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # only the test that asks for Triton uses it

from dataclasses import replace

import pytest
import torch

from thinktalk.block_manager import media_digest
from thinktalk.config import config_from_dict
from thinktalk.engine import Engine, EngineConfig
from thinktalk.models.thinker import MultimodalInputs
from thinktalk.multimodal.items import media_items
from thinktalk.request import Request, SamplingParams
from thinktalk.weights.loader import build_model
from thinktalk.weights.tiny import randomize_
from thinktalk.weights.tiny_config import tiny_config_dict

EOS = [-1]  # never sampled: every request runs to max_new_tokens


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict(tiny_config_dict())
    return randomize_(build_model(cfg, "cpu", torch.float32, with_talker=False), seed=3)


def _prompt(n, seed):
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _request(ids, n_new=10, mm=None, positions=None, rope_delta=0):
    pos = positions if positions is not None else torch.arange(len(ids))[None].expand(3, -1).clone()
    return Request(ids, pos, rope_delta, SamplingParams(temperature=0, max_new_tokens=n_new), mm=mm)


def _run(model, config, requests):
    engine = Engine(model, EOS, config)
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    return [r.output_ids for r in requests], engine


def _clone(r):
    return _request(list(r.prompt_ids), r.sampling.max_new_tokens, r.mm, r.positions, r.rope_delta)


def _paged(**kw):
    kw = {"kv_backend": "paged", "block_size": 4, "num_kv_blocks": 64, **kw}
    return EngineConfig(**kw)


_REFERENCE: dict = {}  # contiguous-engine answers, computed once per distinct request


def _key(r):
    return tuple(r.prompt_ids), r.sampling.max_new_tokens, media_digest(vars(r.mm).values()) if r.mm else None


def _reference(model, requests):
    """Greedy tokens of the contiguous (reference) engine, one batch for the requests not yet seen."""
    todo = {_key(r): _clone(r) for r in requests if _key(r) not in _REFERENCE}
    if todo:
        outs, _ = _run(model, EngineConfig(), list(todo.values()))
        _REFERENCE.update(zip(todo, outs))
    return [_REFERENCE[_key(r)] for r in requests]


def _expect_same(model, config, requests):
    ref = _reference(model, requests)
    got, engine = _run(model, config, requests)
    assert got == ref
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # all returned
    return engine


PROMPTS = [(5, 0), (37, 1), (20, 2), (61, 3)]


def test_batched_greedy_equals_contiguous(model):
    engine = _expect_same(model, _paged(), [_request(_prompt(n, s)) for n, s in PROMPTS])
    assert engine.stats["preemptions"] == 0
    assert engine.stats["prefill_tokens"] == sum(n for n, _ in PROMPTS)


def test_chunked_prefill_equals_contiguous(model):
    # a 16-token budget cuts the long prompts into chunks while the short ones decode
    _expect_same(model, _paged(max_prefill_tokens=16), [_request(_prompt(n, s)) for n, s in PROMPTS])


def test_forced_preemption_recomputes_identically(model):
    # 20 blocks x 4 tokens: the four requests need 134 slots together, so decodes run out
    engine = _expect_same(
        model, _paged(num_kv_blocks=20, kv_watermark=0.0), [_request(_prompt(n, s)) for n, s in PROMPTS]
    )
    assert engine.stats["preemptions"] > 0


def test_preemption_without_prefix_cache(model):
    engine = _expect_same(
        model, _paged(num_kv_blocks=20, kv_watermark=0.0, enable_prefix_caching=False, max_prefill_tokens=24),
        [_request(_prompt(n, s)) for n, s in PROMPTS],
    )
    assert engine.stats["preemptions"] > 0 and engine.stats["cached_tokens"] == 0


def test_prefix_reuse_on_second_turn(model):
    first = _prompt(30, 7)
    (answer,), engine = _run(model, _paged(), [_request(first)])
    second = first + answer + _prompt(9, 8)  # the conversation goes on
    ref = _reference(model, [_request(second)])

    before = dict(engine.stats)
    req = _request(second)
    engine.add_request(req)
    while engine.has_work():
        engine.step()
    assert req.output_ids == ref[0]
    computed = engine.stats["prefill_tokens"] - before["prefill_tokens"]
    cached = engine.stats["cached_tokens"] - before["cached_tokens"]
    # the first turn's prompt and all but the last of its answer are in cache (full blocks of 4)
    assert cached == (len(first) + len(answer) - 1) // 4 * 4
    assert computed == len(second) - cached < len(second)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_shared_by_concurrent_requests(model):
    system = _prompt(24, 9)
    reqs = [_request(system + _prompt(6, 10 + i)) for i in range(3)]
    engine = Engine(model, EOS, _paged())
    engine.add_request(reqs[0])
    engine.step()  # first request's prefill fills the cache
    free = engine.block_manager.num_free_blocks
    for r in reqs[1:]:
        engine.add_request(r)
    engine.step()
    # the two newcomers share the 6 system blocks: each takes only ceil(30/4) - 6 = 2 new blocks
    assert engine.block_manager.num_free_blocks == free - 2 * 2
    assert engine.stats["cached_tokens"] == 2 * 24
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in reqs] == _reference(model, reqs)


def test_requests_wait_when_cache_is_full(model):
    # 10 blocks hold one 30-token request with its answer at a time; the others wait, none fails
    engine = _expect_same(
        model, _paged(num_kv_blocks=10, kv_watermark=0.0), [_request(_prompt(28, s), n_new=8) for s in range(3)]
    )
    assert engine.stats["preemptions"] == 0


def test_abort_frees_blocks_at_once(model):
    engine = Engine(model, EOS, _paged())
    baseline = engine.block_manager.num_free_blocks
    reqs = [_request(_prompt(n, s), n_new=50) for n, s in PROMPTS]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < baseline
    for r in reqs:
        assert engine.abort(r.request_id) is r and r.finish_reason == "abort" and r.kv is None
    assert engine.block_manager.num_free_blocks == baseline
    assert not engine.has_work()
    assert engine.abort("no-such-request") is None


def test_context_limit_is_the_cache(model):
    engine = Engine(model, EOS, _paged(num_kv_blocks=4))
    assert engine.max_model_len == 16
    from thinktalk.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        engine.add_request(_request(_prompt(16, 0)))


# -- multimodal: the media is part of the prefix key --------------------------------------------
def _pixels(model, seed):
    """The 8 patch rows of one 2-token image (grid 1x2x4 patches, merged 2x2)."""
    v = model.thinker.cfg.vision_config
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return torch.randn(8, patch, generator=torch.Generator().manual_seed(seed))


def _with_media(model, req, pixels: list[torch.Tensor], items: bool):
    """Attach the images; with `items`, also their per-image digests, as `request_from_inputs` does
    (without, the pool falls back to one digest of all the media)."""
    grid = torch.tensor([[1, 2, 4]] * len(pixels))
    req.mm = MultimodalInputs(pixel_values=torch.cat(pixels), image_grid_thw=grid)
    if items:
        req.media_items = media_items({"pixel_values": req.mm.pixel_values, "image_grid_thw": grid}, model.thinker.cfg)
    return req


def _image_request(model, seed, n_new=6, items=False):
    """Text, one 2-token image, text: [3 + 2 + 11] tokens."""
    cfg = model.thinker.cfg
    ids = [11, 12, 13] + [cfg.image_token_id] * 2 + _prompt(11, 42)
    pos = torch.arange(len(ids))[None].repeat(3, 1)
    pos[1, 4], pos[2, 4] = 4, 4  # a made-up but fixed M-RoPE layout for the image tokens
    return _with_media(model, _request(ids, n_new, positions=pos), [_pixels(model, seed)], items)


@pytest.mark.parametrize("items", [False, True], ids=["one-digest", "per-item"])
def test_images_never_share_blocks(model, items):
    a, b = _image_request(model, 0, items=items), _image_request(model, 1, items=items)  # same ids, other pixels
    assert a.prompt_ids == b.prompt_ids
    ref = _reference(model, [a, b])
    assert ref[0] != ref[1]  # the image matters

    engine = Engine(model, EOS, _paged())
    for r in (a, b):  # one after the other, so b could find a's blocks
        engine.add_request(r)
        while engine.has_work():
            engine.step()
    assert [a.output_ids, b.output_ids] == ref
    assert engine.stats["cached_tokens"] == 0  # block 0 is [11, 12, 13, image]: not shareable

    c = _image_request(model, 0, items=items)  # a's image again: its prompt blocks are reused
    engine.add_request(c)
    while engine.has_work():
        engine.step()
    assert c.output_ids == ref[0]
    assert engine.stats["cached_tokens"] == 12


def _run_one(engine, req):
    before = dict(engine.stats)
    engine.add_request(req)
    while engine.has_work():
        engine.step()
    return {k: engine.stats[k] - before[k] for k in before}


def test_per_item_digests_share_up_to_the_first_different_image(model):
    """Two images, the second one different: the blocks before it are shared, the rest not
    (with one digest of all the media nothing holding an image could be)."""
    cfg = model.thinker.cfg
    # [11 12 13 I] [I t t t] [t t I I] [t t t t] [t t]: images at 3-4 and 10-11, blocks of 4
    ids = [11, 12, 13] + [cfg.image_token_id] * 2 + _prompt(5, 60) + [cfg.image_token_id] * 2 + _prompt(6, 61)

    def make(seeds, items):
        return _with_media(model, _request(list(ids), 5), [_pixels(model, s) for s in seeds], items)

    for items, shared in ((True, 8), (False, 0)):
        x, y = make((0, 1), items), make((0, 2), items)
        ref = _reference(model, [x, y])
        assert ref[0] != ref[1]
        engine = Engine(model, EOS, _paged())
        _run_one(engine, x)
        stats = _run_one(engine, y)
        assert [x.output_ids, y.output_ids] == ref
        assert stats["cached_tokens"] == shared, items


def test_a_conversation_that_adds_an_image_reuses_the_earlier_one(model):
    """Turn 2 re-sends turn 1 (text, image 1, text, answer) and adds image 2: everything of turn 1
    in full blocks is reused, only the new turn is computed, and the tokens are the reference's."""
    cfg = model.thinker.cfg
    first = [11, 12, 13] + [cfg.image_token_id] * 2 + _prompt(9, 70)
    r1 = _with_media(model, _request(first, 6), [_pixels(model, 0)], True)
    engine = Engine(model, EOS, _paged())
    _run_one(engine, r1)
    assert r1.output_ids == _reference(model, [r1])[0]

    second = first + r1.output_ids + [14] + [cfg.image_token_id] * 2 + _prompt(7, 71)
    r2 = _with_media(model, _request(second, 6), [_pixels(model, 0), _pixels(model, 1)], True)
    stats = _run_one(engine, r2)
    assert r2.output_ids == _reference(model, [r2])[0]
    cached = (len(first) + len(r1.output_ids) - 1) // 4 * 4  # turn 1's full blocks (its last token has no KV)
    assert stats["cached_tokens"] == cached == 16  # 14 prompt + 5 answer tokens with KV: 4 blocks
    assert stats["prefill_tokens"] == len(second) - cached  # the new turn and the partly filled block
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_image_prompt_in_chunks(model):
    # chunks of 3 tokens cut the image placeholders apart; deepstack features must follow
    _expect_same(model, _paged(max_prefill_tokens=3), [_image_request(model, 0), _request(_prompt(9, 5))])


def test_triton_kernels_in_the_engine(model):
    """Paged decode kernel and fused MoE (Triton interpreter) inside the engine: same tokens."""
    from thinktalk.kernels.common import available

    if not available("cpu"):
        pytest.skip("triton is not installed")
    reqs = [_request(_prompt(n, s), n_new=4) for n, s in PROMPTS[:2]]
    _expect_same(model, _paged(decode_attention="triton", moe_kernel="triton"), reqs)


def test_an_engine_after_another_runs_its_own_kernels(model):
    """Engines built one after another on one model: a torch engine after a Triton one finds none
    of the kernels the first set on the modules (it would run them, under the interpreter here),
    and answers as the reference; its q/k/v stay stacked."""
    from thinktalk.engine import KERNEL_ATTRS
    from thinktalk.kernels.common import available

    if not available("cpu"):
        pytest.skip("triton is not installed")
    fresh = randomize_(build_model(config_from_dict(tiny_config_dict()), "cpu", torch.float32, with_talker=False), seed=3)

    def overridden():
        return {name for m in fresh.modules() for name in KERNEL_ATTRS if name in m.__dict__}

    Engine(fresh, EOS, _paged(moe_kernel="triton", layer_kernels="triton"))
    assert {"experts_fn", "linear_fn", "qk_kernel", "norm_moe_fn"} <= overridden()
    reqs = [_request(_prompt(n, s), n_new=4) for n, s in PROMPTS[:2]]
    outs, _ = _run(fresh, _paged(), [_clone(r) for r in reqs])
    assert overridden() == set()
    assert all(layer.self_attn.qkv_weight is not None for layer in fresh.thinker.model.layers)
    assert outs == _reference(model, reqs)


def test_hidden_states_for_the_talker_survive_preemption_and_prefix_reuse(model):
    """Requests that speak keep one hidden-state row per token: none lost to the prefix cache
    (a speaking request reuses at most the rows it already kept), none repeated by a recompute."""

    def make():
        shared = _prompt(24, 20)
        reqs = [_request(_prompt(n, s), n_new=8) for n, s in PROMPTS]
        reqs += [_request(shared + [5, 6], n_new=8), _request(shared + [7], n_new=8)]
        for r in reqs:
            r.speaker = "someone"  # the engine keeps hidden states of requests that speak
        return reqs

    def run(config, reqs):
        engine = Engine(model, EOS, config, capture_layer=2)
        for r in reqs:
            engine.add_request(r)
        while engine.has_work():
            engine.step()
        return engine

    ref, got = make(), make()
    run(EngineConfig(), ref)
    engine = run(_paged(num_kv_blocks=24, kv_watermark=0.0, max_prefill_tokens=16), got)
    assert engine.stats["preemptions"] > 0
    assert engine.stats["cached_tokens"] > 0  # recomputes found their own kept blocks
    for a, b in zip(ref, got):
        assert a.output_ids == b.output_ids
        for layer in (0, 2):
            x, y = torch.cat(a.capture[layer]), torch.cat(b.capture[layer])
            assert x.shape[0] == y.shape[0] == a.num_tokens - 1
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_the_talkers_hidden_states_are_part_of_the_kv_budget(model):
    """With a talker layer captured and prefix caching on, each block also holds its tokens' hidden
    states (kv_cache.PagedPool.hidden), sized into the same memory budget; otherwise no side tensor."""
    from thinktalk.kv_cache import bytes_per_block

    text = model.thinker.cfg.text_config
    head_dim = text.get("head_dim") or text.hidden_size // text.num_attention_heads
    budget = 2**20
    config = EngineConfig(kv_backend="paged", block_size=4, cpu_kv_cache_gib=budget / 2**30)
    kv = bytes_per_block(text.num_hidden_layers, 4, text.num_key_value_heads, head_dim, torch.float32)
    both = bytes_per_block(text.num_hidden_layers, 4, text.num_key_value_heads, head_dim, torch.float32, text.hidden_size)
    assert both == kv + 4 * text.hidden_size * 4

    speaking = Engine(model, EOS, config, capture_layer=2)
    assert speaking.block_manager.num_blocks == budget // both
    assert speaking.pool.hidden.shape == (budget // both + 1, 4, text.hidden_size)
    for engine in (Engine(model, EOS, config), Engine(model, EOS, replace(config, enable_prefix_caching=False), capture_layer=2)):
        assert engine.pool.hidden is None and engine.block_manager.num_blocks == budget // kv


# -- out of accelerator memory in a prefill ---------------------------------------------------------
def _oom_on_media(model, monkeypatch, times=1):
    """The vision encoder raises torch.OutOfMemoryError (as CUDA would for a too-large video) the
    first `times` calls."""
    visual = model.thinker.visual
    real = type(visual).forward
    left = [times]

    def forward(self, *args, **kw):
        if left[0] > 0:
            left[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, *args, **kw)

    monkeypatch.setattr(type(visual), "forward", forward)


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole-prompt", "chunked-prefill"])
def test_out_of_memory_in_a_prefill_fails_that_request_only(model, monkeypatch, chunk):
    """The request whose media ran out of memory finishes with reason "error" and an
    OutOfMemoryError saying what to do; its blocks are freed at once, the requests that shared
    its step give the reference's tokens, and the engine takes new media requests after it."""
    from thinktalk.errors import InputError, OutOfMemoryError

    text = [_request(_prompt(n, s), n_new=6) for n, s in PROMPTS[:2]]
    ref = _reference(model, text)
    media_ref = _reference(model, [_image_request(model, 0)])[0]
    engine = Engine(model, EOS, _paged(**({"max_prefill_tokens": chunk} if chunk else {})))
    baseline = engine.block_manager.num_free_blocks
    big = _image_request(model, 0)
    for r in (text[0], big, text[1]):  # one step holds all three prompts (or chunks of them)
        engine.add_request(r)
    _oom_on_media(model, monkeypatch)
    finished = []
    while engine.has_work():
        finished += [o.request for o in engine.step() if o.finished]
    assert big.finish_reason == "error" and big.output_ids == [] and big.kv is None
    assert isinstance(big.error, OutOfMemoryError) and isinstance(big.error, InputError)
    assert "shorter or fewer media" in str(big.error)
    assert big in finished
    assert [r.output_ids for r in text] == ref
    assert engine.block_manager.num_free_blocks == baseline
    again = _image_request(model, 0)  # the encoder works again: served as usual
    engine.add_request(again)
    while engine.has_work():
        engine.step()
    assert again.output_ids == media_ref and again.error is None


def test_out_of_memory_in_a_decode_step_stays_fatal(model, monkeypatch):
    """A decode-only step has no request to blame: the error propagates (the server reports the
    engine dead rather than guessing)."""
    engine = Engine(model, EOS, _paged())
    r = _request(_prompt(5, 1), n_new=4)
    engine.add_request(r)
    engine.step()  # the prefill

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "_run", oom)
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()


def test_engine_sets_the_vision_pass_size(model):
    visual = model.thinker.visual
    try:
        Engine(model, EOS, _paged(vision_max_patches=8))
        assert visual.max_patches_per_pass == 8
        Engine(model, EOS, _paged(vision_max_patches=None))
        assert visual.max_patches_per_pass is None
    finally:
        visual.max_patches_per_pass = EngineConfig().vision_max_patches


def test_kv_sizing_profile_covers_a_vision_pass_and_held_embeddings(model, monkeypatch):
    """The activation profile KV sizing runs (on CUDA) includes a vision pass of the most patches
    one pass takes (whole square frames) and holds buffers for a max-length media prompt's
    embeddings; run here on the CPU, with the calls recorded."""
    engine = Engine(model, EOS, _paged(vision_max_patches=40, max_prefill_tokens=8))
    visual = model.thinker.visual
    merge = visual.spatial_merge_size
    seen, held = [], []
    real_visual = type(visual).forward
    monkeypatch.setattr(type(visual), "forward", lambda self, px, grid: (seen.append((px.shape[0], grid.tolist())),
                                                                          real_visual(self, px, grid))[1])
    real_buffer = engine._prompt_embeddings
    monkeypatch.setattr(engine, "_prompt_embeddings", lambda rows: held.append(real_buffer(rows)) or held[-1])
    engine._profile_prefill()
    assert len(seen) == 1
    patches, [[t, h, w]] = seen[0]
    assert patches == t * h * w <= 40 and h == w and h % merge == 0 and patches > 40 // 2
    hidden = model.thinker.cfg.text_config.hidden_size
    layers = 1 + len(visual.deepstack_visual_indexes)
    assert [tuple(b.shape) for b in held] == [(engine.max_model_len, layers * hidden), (engine.max_model_len, 2 * hidden)]


def test_decode_attention_with_its_context_split(model, monkeypatch):
    """The Triton decode attention (interpreter) with its context split in 3, as on a GPU, the
    splits merged by the merge kernel: the reference's tokens."""
    from thinktalk.kernels import paged_attention as pa

    if not pa.available("cpu"):
        pytest.skip("triton is not installed")
    monkeypatch.setattr(pa, "_num_splits", lambda *args: 3)
    merge_grids = []
    merge_kernel = pa._merge_splits_kernel

    class CountedMergeKernel:
        def __getitem__(self, grid):
            merge_grids.append(grid)
            return merge_kernel[grid]

    monkeypatch.setattr(pa, "_merge_splits_kernel", CountedMergeKernel())
    reqs = [_request(_prompt(n, s), n_new=4) for n, s in PROMPTS[:2]]
    ref = _reference(model, reqs)
    outs, _ = _run(model, _paged(decode_attention="triton"), [_clone(r) for r in reqs])
    assert outs == ref
    assert merge_grids


@pytest.mark.parametrize("route_in_gate_up", [False, True])
def test_the_norms_folded_into_the_gemvs_in_the_engine(model, monkeypatch, route_in_gate_up):
    """Every layer kernel and decode GEMV (Triton interpreter) inside the engine with the norms
    folded into the q/k/v and MoE GEMVs (fuse_norm_gemv; route_in_gate_up: the router's top-k in
    the gate-up GEMV too): the reference's greedy tokens (fp32: the fused norm's other rounding is
    far below a token flip), the fused kernels taking the decode steps."""
    from functools import partial

    from thinktalk.kernels import norm_gemv as ng
    from thinktalk.kernels.common import available
    from thinktalk.layers.decoder import DecoderLayer
    from thinktalk.layers.moe import SparseMoE

    if not available("cpu"):
        pytest.skip("triton is not installed")
    reqs = [_request(_prompt(n, s), n_new=new) for (n, s), new in zip(PROMPTS[:2], (3, 5))]
    ref = _reference(model, reqs)
    fresh = randomize_(build_model(config_from_dict(tiny_config_dict()), "cpu", torch.float32, with_talker=False), seed=3)
    rows, moe_rows = [], []
    real, real_moe = ng.add_norm_gemv, ng.add_norm_moe
    monkeypatch.setattr(ng, "add_norm_gemv", lambda x, *a, **kw: rows.append(x.shape[0]) or real(x, *a, **kw))

    def norm_moe(x, *a, **kw):
        assert kw.get("route_in_gate_up", False) == route_in_gate_up
        out = real_moe(x, *a, **kw)
        moe_rows.append(None if out is None else x.shape[0])
        return out

    monkeypatch.setattr(ng, "add_norm_moe", norm_moe)
    config = _paged(decode_attention="triton", moe_kernel="triton", layer_kernels="triton", fuse_norm_gemv=True,
                    route_in_gate_up=route_in_gate_up)
    outs, engine = _run(fresh, config, [_clone(r) for r in reqs])
    layers = [m for m in fresh.modules() if isinstance(m, DecoderLayer)]
    moe_layers = [layer for layer in layers if isinstance(layer.mlp, SparseMoE)]
    assert all(layer.norm_linear_fn is ng.add_norm_linear for layer in layers)
    assert moe_layers and all(getattr(layer.norm_moe_fn, "func", layer.norm_moe_fn) is norm_moe
                              and isinstance(layer.norm_moe_fn, partial) == route_in_gate_up for layer in moe_layers)
    assert outs == ref
    # decode steps of 2 rows, then 1: the q/k/v GEMVs of the layers after the first (the first
    # has no residual to add) and the router GEMVs of the MoE layers; the MoE took them too
    assert {n for n in moe_rows if n is not None} == {1, 2}
    decode_moe_calls = sum(n is not None for n in moe_rows)
    assert sorted(set(rows)) == [1, 2] and len(rows) == (len(layers) - 1) * decode_moe_calls // len(moe_layers) + decode_moe_calls
