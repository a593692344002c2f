"""Parity of thinktalk's Code2Wav (one-shot, chunked, streaming) with transformers' Qwen3OmniMoeCode2Wav.

A tiny config (hidden 32, 2 layers, GQA 4/2 heads, sliding window 8) keeps the real upsampling
rates, so the waveform geometry (1920 samples per frame, the 555-sample look-ahead, the 17454-sample
conv receptive field) is the real one. Weights are random and seeded, with LayerScale, ConvNeXt
gamma and SnakeBeta parameters far from their trivial init, and the last conv scaled so the output
is not clamped. Run with `-s` to see the max abs errors.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from thinktalk.config import ConfigNode, reference_config
from thinktalk.models.code2wav import Code2Wav, Code2WavStream, receptive_field

hf_cfg_mod = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")
hf_mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

ATOL = 1e-5  # one-shot / chunked parity (in fact bit-identical on CPU)
# Streamed vs one-shot decodes differ only by float rounding (different conv / attention lengths),
# which the random decoder amplifies (29 SnakeBeta layers with exp(alpha)/exp(beta) up to ~2.5):
# ~1e-5 in float32. In float64 they agree to <= ~2e-9 (the reference keeps RMSNorm and the RoPE
# tables in float32 even in a float64 model), while one frame too little context gives >= 5e-5:
# that is the exactness check.
STREAM_ATOL = {torch.float32: 5e-5, torch.float64: 1e-7}
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    codebook_size=64,
    num_quantizers=4,
    decoder_dim=32,
    sliding_window=8,
    upsample_rates=[8, 5, 4, 3],
    upsampling_ratios=[2, 2],
    layer_scale_initial_scale=0.01,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    hidden_act="silu",
    attention_bias=False,
    max_position_embeddings=8000,
)
LENGTHS = (1, 3, 17, 60, 130)


def _report(name: str, err: float) -> None:
    print(f"[code2wav] {name}: max abs err = {err:.3e}")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial seeded weights: unit-scale activations, non-zero LayerScale / gamma / snake."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("alpha", "beta"):  # SnakeBeta (log-scale)
                p.copy_(0.3 * rnd(p.shape))
            elif leaf in ("scale", "gamma"):  # LayerScale, ConvNeXt gamma
                p.copy_(0.2 + 0.4 * torch.rand(p.shape, generator=g))
            elif "norm" in name and leaf == "weight":
                p.copy_(1.0 + 0.1 * rnd(p.shape))
            elif leaf == "bias":
                p.copy_(0.1 * rnd(p.shape))
            elif "embedding" in name:
                p.copy_(rnd(p.shape))
            else:  # linear / conv / trans-conv weights: fan-in scaled
                if p.dim() == 3 and isinstance(_module_of(model, name), torch.nn.ConvTranspose1d):
                    fan_in = p.shape[0] * p.shape[2] / _module_of(model, name).stride[0]
                else:
                    fan_in = p[0].numel()
                p.copy_(rnd(p.shape) / math.sqrt(fan_in))
                if ".conv2." in name:  # residual-unit branch: keep the decoder's activations O(1)
                    p.mul_(0.3)


def _module_of(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Many tiny ops: one intra-op thread is faster, and robust on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = hf_mod.Qwen3OmniMoeCode2Wav._from_config(hf_cfg_mod.Qwen3OmniMoeCode2WavConfig(**TINY)).eval()
    _randomize(hf, seed=1234)
    # Scale the output conv so that the pre-clamp waveform has std ~0.3 (clamp hides nothing).
    last = hf.decoder[-1].conv
    with torch.no_grad():
        codes = torch.randint(0, TINY["codebook_size"], (1, TINY["num_quantizers"], 40), generator=torch.Generator().manual_seed(7))
        pre = hf.decoder[-1].conv.weight.new_tensor(0)
        x = hf(codes)  # clamped; measure pre-clamp std through a hook
        captured = {}
        h = last.register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
        hf(codes)
        h.remove()
        std = captured["o"].std()
        last.weight.mul_(0.3 / std)
        last.bias.mul_(0.3 / std)
        del pre, x
    ours = Code2Wav(ConfigNode(dict(TINY))).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def oneshot(models):
    """codes and both one-shot waveforms per length (B = 1), float32."""
    hf, ours = models
    out = {}
    for t in LENGTHS:
        g = torch.Generator().manual_seed(100 + t)
        codes = torch.randint(0, TINY["codebook_size"], (1, TINY["num_quantizers"], t), generator=g)
        with torch.no_grad():
            out[t] = (codes, hf(codes), ours(codes))
    return out


@pytest.fixture(scope="module")
def by_dtype(models, oneshot):
    """{dtype: (hf, ours, {t: (codes, hf one-shot, ours one-shot)})} for float32 and float64."""
    hf, ours = models
    hf64, ours64 = copy.deepcopy(hf).double(), copy.deepcopy(ours).double()
    out64 = {}
    with torch.no_grad():
        for t, (codes, _, _) in oneshot.items():
            out64[t] = (codes, hf64(codes), ours64(codes))
    return {torch.float32: (hf, ours, oneshot), torch.float64: (hf64, ours64, out64)}


# ------------------------------------------------------------------------------------------------
# geometry and weights
# ------------------------------------------------------------------------------------------------


def test_real_config_geometry():
    cfg = reference_config().code2wav_config
    rf = receptive_field(cfg)
    assert rf["total_upsample"] == int(np.prod(cfg.upsample_rates + cfg.upsampling_ratios)) == 1920
    assert rf["transformer_context_frames"] == cfg.num_hidden_layers * (cfg.sliding_window - 1) == 568
    assert rf["lookahead_samples"] == 555
    assert rf["conv_left_samples"] == 17454
    assert rf["conv_context_frames"] == 10
    with torch.device("meta"):
        ours = Code2Wav(cfg)
        hf = hf_mod.Qwen3OmniMoeCode2Wav._from_config(hf_cfg_mod.Qwen3OmniMoeCode2WavConfig(**cfg.to_dict()))
    assert ours.total_upsample == int(hf.total_upsample) == 1920
    assert ours.exact_left_context_frames == 578
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert {n for n, _ in ours.named_buffers()} <= {n for n, _ in hf.named_buffers()}


def test_state_dict_load_and_nontrivial_weights(models):
    hf, ours = models
    assert set(ours.state_dict()) == set(hf.state_dict())
    fresh = Code2Wav(ConfigNode(dict(TINY)))
    ckpt = {f"code2wav.{k}": v for k, v in hf.state_dict().items()}
    ckpt["talker.model.norm.weight"] = torch.ones(1)  # other components' tensors are ignored
    fresh.load_checkpoint_tensors(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()))
    sd = ours.state_dict()
    assert sd["pre_transformer.layers.0.self_attn_layer_scale.scale"].min() > 0.1
    assert sd["upsample.0.1.gamma"].min() > 0.1
    assert sd["decoder.1.block.2.act1.alpha"].abs().max() > 0.1
    assert torch.equal(ours.code_offset, hf.code_offset)


# ------------------------------------------------------------------------------------------------
# one-shot and reference chunked decode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", LENGTHS)
def test_forward_parity(models, oneshot, t):
    _, ours = models
    codes, ref, mine = oneshot[t]
    assert mine.shape == (1, 1, t * ours.total_upsample - ours.lookahead_samples)
    assert ref.abs().max() > 0.3 and (ref.abs() >= 1).float().mean() < 0.01  # signal, not clamped
    err = _max_err(mine, ref)
    _report(f"forward T={t}", err)
    assert err < ATOL


def test_forward_parity_batched(models):
    hf, ours = models
    codes = torch.randint(0, TINY["codebook_size"], (3, TINY["num_quantizers"], 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, mine = hf(codes), ours(codes)
    err = _max_err(mine, ref)
    _report("forward B=3 T=23", err)
    assert err < ATOL


@pytest.mark.parametrize("chunk,ctx", [(300, 25), (16, 5), (20, 24), (7, 0)])
def test_chunked_decode_parity(models, oneshot, chunk, ctx):
    hf, ours = models
    codes = oneshot[60][0]
    with torch.no_grad():
        ref = hf.chunked_decode(codes, chunk_size=chunk, left_context_size=ctx)
        mine = ours.chunked_decode(codes, chunk_size=chunk, left_context_size=ctx)
    err = _max_err(mine, ref)
    _report(f"chunked_decode chunk={chunk} ctx={ctx}", err)
    assert err < ATOL


def test_reference_chunking_drops_lookahead_at_each_boundary(by_dtype):
    """With enough left context (578 real / 24 tiny) every reference chunk is exact, but it ends
    `lookahead_samples` early: chunk [s, e) yields one-shot samples [s*U, e*U - 555).
    (Float error only; the reference restarts RoPE positions per chunk, which rounds differently.)"""
    dtype = torch.float32
    hf, ours, oneshot = by_dtype[dtype]
    codes, full, _ = oneshot[60]
    u, la, ctx, chunk = ours.total_upsample, ours.lookahead_samples, ours.exact_left_context_frames, 20
    assert ctx == 24
    with torch.no_grad():
        ref = hf.chunked_decode(codes, chunk_size=chunk, left_context_size=ctx)
    n_chunks = math.ceil(60 / chunk)
    assert ref.shape[-1] == 60 * u - n_chunks * la
    pieces = [full[..., s * u : (s + chunk) * u - la] for s in range(0, 60, chunk)]
    err = _max_err(ref, torch.cat(pieces, dim=-1))
    _report(f"reference chunked_decode {dtype} (ctx 24) vs one-shot pieces", err)
    assert err < STREAM_ATOL[dtype]


# ------------------------------------------------------------------------------------------------
# streaming
# ------------------------------------------------------------------------------------------------


def _run_stream(stream: Code2WavStream, codes: torch.Tensor, pushes) -> tuple[torch.Tensor, list[int]]:
    """Push codes[0] (unbatched [Q, n]) in pieces of the given sizes (cycled), then flush."""
    pieces, sizes, pos, i = [], [], 0, 0
    total = codes.shape[-1]
    while pos < total:
        n = min(pushes[i % len(pushes)], total - pos)
        out = stream.push(codes[0, :, pos : pos + n])
        if out is not None:
            assert out.dim() == 1
            pieces.append(out)
            sizes.append(out.shape[-1])
        pos, i = pos + n, i + 1
    tail = stream.flush()
    pieces.append(tail)
    sizes.append(tail.shape[-1])
    return torch.cat(pieces)[None, None], sizes


SCHEDULES = [(4, 25, 50), (1,), (3, 7), (2, 5, 11)]
PUSHES = {(4, 25, 50): (1,), (1,): (1,), (3, 7): (5, 1, 9), (2, 5, 11): (64,)}


# All lengths x schedules in float32, except frame-by-frame decoding (schedule (1,)) only up to
# T = 60; float64 for two schedules. (Test time on 2 cores.)
STREAM_CASES = [
    pytest.param(t, sched, dtype, id=f"T{t}-sched{'-'.join(map(str, sched))}-{str(dtype)[6:]}")
    for dtype in (torch.float32, torch.float64)
    for sched in SCHEDULES
    for t in LENGTHS
    if not (sched == (1,) and (t > 60 or dtype == torch.float64))
    and not (dtype == torch.float64 and sched == (2, 5, 11))
]


@pytest.mark.parametrize("t,schedule,dtype", STREAM_CASES)
def test_stream_exact_equals_oneshot(by_dtype, schedule, t, dtype):
    hf, ours, oneshot = by_dtype[dtype]
    codes, ref, mine = oneshot[t]
    stream = ours.stream(schedule)
    wav, sizes = _run_stream(stream, codes, PUSHES[schedule])
    assert wav.dtype == dtype
    err_ours, err_hf = _max_err(wav, mine), _max_err(wav, ref)
    _report(f"stream {dtype} {schedule} T={t} vs forward / vs HF forward", max(err_ours, err_hf))
    assert err_ours < STREAM_ATOL[dtype] and err_hf < STREAM_ATOL[dtype]
    # Chunk geometry: the first chunk of n frames yields n*U - lookahead samples, later ones n*U.
    u, la = ours.total_upsample, ours.lookahead_samples
    if PUSHES[schedule] == (1,) and t >= schedule[0] + (schedule[1] if len(schedule) > 1 else schedule[0]):
        assert sizes[0] == schedule[0] * u - la
        assert sizes[1] == (schedule[1] if len(schedule) > 1 else schedule[0]) * u
    # ...and equals HF's chunked_decode where that is exact: a single chunk.
    with torch.no_grad():
        ref_chunked = hf.chunked_decode(codes)
    assert _max_err(wav, ref_chunked) < STREAM_ATOL[dtype]


def test_stream_exact_batched_and_reusable(models):
    _, ours = models
    codes = torch.randint(0, TINY["codebook_size"], (2, TINY["num_quantizers"], 41), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = ours(codes)
    stream = Code2WavStream(ours, (4, 25, 50))
    for _ in range(2):  # flush resets: the same stream decodes a second utterance
        outs = [stream.push(codes[..., i : i + 6]) for i in range(0, 41, 6)]
        outs = [o for o in outs if o is not None] + [stream.flush()]
        assert all(o.dim() == 2 and o.shape[0] == 2 for o in outs)
        err = _max_err(torch.cat(outs, dim=-1)[:, None], full)
        _report("stream batched B=2 T=41", err)
        assert err < STREAM_ATOL[torch.float32]
    assert stream.flush().shape == (0,)  # nothing pending: empty
    assert stream.push(codes[0, :, :3]) is None  # below the first chunk: nothing yet


def test_streams_decoded_together_equal_each_alone(models):
    """decode_due_together: three single streams, two in lock step (one batched forward) and one
    started later (decoded on its own), give what each would give alone."""
    _, ours = models
    g = torch.Generator().manual_seed(11)
    codes = [torch.randint(0, TINY["codebook_size"], (TINY["num_quantizers"], 40), generator=g) for _ in range(3)]
    starts = [0, 0, 3]  # the third joins three frames later
    alone = []
    for c in codes:
        st = Code2WavStream(ours, (4, 8, 16))
        outs = [st.push(c[:, i : i + 1]) for i in range(c.shape[1])]
        alone.append(torch.cat([o for o in outs if o is not None] + [st.flush()]))
    together = [Code2WavStream(ours, (4, 8, 16)) for _ in codes]
    got: list[list[torch.Tensor]] = [[] for _ in codes]
    with torch.no_grad():
        for step in range(43):
            active = [i for i in range(3) if 0 <= step - starts[i] < codes[i].shape[1]]
            for i in active:
                together[i].append(codes[i][:, step - starts[i] : step - starts[i] + 1])
            for i, pcm in zip(active, Code2WavStream.decode_due_together([together[i] for i in active])):
                if pcm is not None:
                    got[i].append(pcm)
    for i in range(3):
        wav = torch.cat(got[i] + [together[i].flush()])
        assert wav.shape == alone[i].shape
        torch.testing.assert_close(wav, alone[i], rtol=0, atol=STREAM_ATOL[torch.float32])


@pytest.mark.parametrize("chunk,ctx", [(300, 25), (16, 5), (20, 24), (1, 3)])
def test_stream_reference_mode_equals_hf_chunked_decode(models, oneshot, chunk, ctx):
    hf, ours = models
    codes = oneshot[60 if chunk > 1 else 17][0]
    with torch.no_grad():
        ref = hf.chunked_decode(codes, chunk_size=chunk, left_context_size=ctx)
    wav, _ = _run_stream(Code2WavStream(ours, (chunk,), exact=False, left_context_size=ctx), codes, (7,))
    err = _max_err(wav, ref)
    _report(f"stream exact=False chunk={chunk} ctx={ctx} vs HF chunked_decode", err)
    assert err < ATOL


def test_context_rule_is_tight(by_dtype):
    """One frame less of either context breaks exactness; the default rule is exact. In float64,
    where exact means ~1e-9 here (float32 noise would be ~1e-5, comparable to the conv effect)."""
    dtype = torch.float64
    _, ours, oneshot = by_dtype[dtype]
    codes, _, full = oneshot[130]
    tf, conv = ours.transformer_context_frames, ours.conv_context_frames
    errs = {}
    for name, kw in {
        "exact": {},
        "conv_ctx-1": {"conv_context_frames": conv - 1},
        "tf_ctx-1": {"transformer_context_frames": tf - 1},
    }.items():
        wav, _ = _run_stream(Code2WavStream(ours, (4, 25), **kw), codes, (130,))
        errs[name] = _max_err(wav, full)
        _report(f"stream {dtype} context {name}", errs[name])
    assert errs["exact"] < STREAM_ATOL[dtype]
    assert errs["conv_ctx-1"] > 1000 * errs["exact"] and errs["conv_ctx-1"] > 1e-5
    assert errs["tf_ctx-1"] > 1e-3
