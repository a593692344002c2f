"""Quantized tiny models generate; greedy top-1 agreement with the unquantized model is measured.

The tiny checkpoint has random weights, so agreement is a property of the numbers, not of
language: it is printed (pytest -s) and only sanity is asserted (tokens come out, logits finite).
CPU runs the reference path (dequantize on the fly; fp8 weight-only), which is what CI has.
"""

import pytest
import torch

from thinktalk.engine import Engine
from thinktalk.kernels.quant_gemm import use_backend
from thinktalk.layers.attention import ContiguousKV, SequenceKV
from thinktalk.layers.quant_linear import QuantExperts, QuantLinear
from thinktalk.request import Request, SamplingParams
from thinktalk.weights.loader import load_model
from thinktalk.weights.quant import describe, quantize_model_, weight_bytes

N_NEW = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: intra-op threads only contend (10x slower on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _prompt(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 100000, (n,), generator=g).tolist()


def _generate(model, prompt, n_new=N_NEW):
    req = Request(prompt_ids=list(prompt), positions=torch.arange(len(prompt))[None].expand(3, -1).clone(),
                  rope_delta=0, sampling=SamplingParams(temperature=0.0, max_new_tokens=n_new))
    engine = Engine(model, eos_token_ids=[])
    engine.add_request(req)
    while engine.has_work():
        engine.step()
    return req.output_ids


@torch.inference_mode()
def _teacher_forced_logits(model, ids):
    """Thinker logits at every position of `ids` in one pass."""
    t = model.thinker
    ids = torch.tensor(ids)
    embeds, _ = t.embed(ids)
    pos = torch.arange(len(ids))[None].expand(3, -1)
    hidden, _ = t(embeds, pos, ContiguousKV([SequenceKV()], [len(ids)]))
    return t.logits(hidden).float()


@pytest.fixture(scope="module")
def reference(tiny_instruct):
    with use_backend("reference"):
        model = load_model(tiny_instruct, progress=False)
        prompt = _prompt()
        out = _generate(model, prompt)
        logits = _teacher_forced_logits(model, prompt + out)
    return model, prompt, out, logits


@pytest.mark.parametrize("method", ["int8", "int4", "int4-asym", "fp8"])
def test_quantized_tiny_generates_and_agrees(tiny_instruct, reference, method):
    ref_model, prompt, ref_out, ref_logits = reference
    with use_backend("reference"):
        # group 32 so the tiny model's 64-wide layers really have several groups per row
        spec = method if method == "fp8" else f"{method}-g32"
        model = load_model(tiny_instruct, progress=False, quantization=spec)
        out = _generate(model, prompt)
        logits = _teacher_forced_logits(model, prompt + ref_out)
    assert len(out) == N_NEW
    assert torch.isfinite(logits).all()
    span = slice(len(prompt) - 1, len(prompt) + N_NEW - 1)  # the positions that predicted each new token
    agree = (logits[span].argmax(-1) == ref_logits[span].argmax(-1)).float().mean().item()
    prefix = next((i for i, (a, b) in enumerate(zip(out, ref_out)) if a != b), N_NEW)
    rel = ((logits[span] - ref_logits[span]).norm() / ref_logits[span].norm()).item()
    q = sum(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
    mib = sum(weight_bytes(model).values()) / 2**20
    print(f"\n{method}: teacher-forced top-1 agreement {agree:.3f} over {N_NEW} tokens; free-running greedy "
          f"identical for the first {prefix}/{N_NEW} tokens; logits rel err {rel:.4f}; {q} quantized modules; "
          f"weights {mib:.1f} MiB ({describe(model)})")
    assert q > 0 and agree > 0


def test_quantize_model_in_place_equals_quantize_on_load(tiny_instruct, reference):
    ref_model, prompt, ref_out, _ = reference
    with use_backend("reference"):
        loaded = load_model(tiny_instruct, progress=False, quantization="int4-g32")
        model = load_model(tiny_instruct, progress=False)
        quantize_model_(model, "int4", group_size=32)
        a, b = loaded.state_dict(), model.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert _generate(model, prompt, 16) == _generate(loaded, prompt, 16)


def test_quantized_pipeline_speaks(tiny_instruct):
    """Thinker, talker and code predictor quantized (int4), code2wav bf16: speech comes out."""
    from thinktalk.api import Omni

    with use_backend("reference"):
        omni = Omni.load(tiny_instruct, device="cpu", quantization="int4-g32", progress=False)
        assert isinstance(omni.model.talker.model.layers[0].mlp.experts, QuantExperts)
        assert isinstance(omni.model.talker.code_predictor.model.layers[0].mlp.down_proj, QuantLinear)
        res = omni.generate([{"role": "user", "content": "hi"}], speaker="Ethan", max_new_tokens=8,
                            temperature=0.0, speech_max_frames=6)
    assert res.token_ids and res.audio is not None and len(res.audio) > 0
    assert torch.isfinite(torch.as_tensor(res.audio)).all()


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_float16_pipeline(tiny_instruct, quantization):
    """--dtype float16: nothing forces bf16; text and speech come out finite."""
    from thinktalk.api import Omni

    with use_backend("reference"):
        omni = Omni.load(tiny_instruct, device="cpu", dtype="float16", quantization=quantization, progress=False)
        assert omni.model.thinker.lm_head.weight.dtype == torch.float16
        res = omni.generate([{"role": "user", "content": "hi"}], speaker="Ethan", max_new_tokens=6,
                            temperature=0.0, speech_max_frames=4)
    assert len(res.token_ids) > 0 and res.audio is not None
    assert torch.isfinite(torch.as_tensor(res.audio)).all()


def test_quantized_encoders_with_media(tiny_instruct, media):
    """int4 decoders + int8 audio/vision encoders (the tightest 24 GB setting): media prompts run."""
    from thinktalk.api import Omni

    with use_backend("reference"):
        omni = Omni.load(tiny_instruct, device="cpu", quantization="int4-g32-encint8", progress=False)
        t = omni.model.thinker
        assert t.audio_tower.layers[0].fc1.weight.fmt.method == "int8"
        assert t.visual.blocks[0].mlp.linear_fc1.weight.fmt.method == "int8"
        assert t.model.layers[0].self_attn.q_proj.weight.fmt.method == "int4"
        msg = [{"role": "user", "content": [{"type": "image", "image": str(media["image"])},
                                            {"type": "audio", "audio": str(media["audio"])},
                                            {"type": "text", "text": "what is this?"}]}]
        res = omni.generate(msg, max_new_tokens=4, temperature=0.0)
    assert len(res.token_ids) == 4 and res.prompt_tokens_by_modality["audio"] > 0
    print(f"\nencoders int8: {describe(omni.model)}")
