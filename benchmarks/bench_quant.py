"""Quantization benchmark: bf16 / fp8 / int8 / int4 on full-size random weights, one GPU.

    python benchmarks/bench_quant.py --out benchmarks/results/quant_h200.json

For each variant in turn (memory freed in between) the full Instruct model — thinker (audio and
vision encoders included), talker, code predictor and code2wav — is built with its parameters on
the meta device and materialized one decoder layer at a time: random bf16 weights (seeded by
name, so every variant has the same model), then, for the quantized variants, that layer's error
is measured and it is quantized on the GPU before the next one exists. The bf16 model is never
held whole by a quantized variant, so the build peak is the quantized model plus one layer.

Figures per variant:
  weights_gib / weights_by_part   bytes of parameters and buffers after the build
  build                           seconds and peak GPU memory while building (+ quantizing)
  exchange                        one spoken exchange through the whole pipeline: ~30 s of user
                                  audio + a text question in, greedy answer, the talker speaks
                                  `--speech-seconds` of it (12.5 codec frames/s), code2wav decodes
                                  it: peak GPU memory (max_memory_allocated, and reserved) and time
  decode_1 / decode_32            thinker decode tok/s, one stream and 32 concurrent streams
                                  (thinktalk.engine.Engine as in bench_thinker.py; eos ignored)
  layer_errors                    per decoder layer (thinker, talker, code predictor), with the
                                  bf16 layer's own inputs: relative error ||q - ref|| / ||ref|| of
                                  the attention output, the MLP/MoE output and their sum
  logits                          thinker logits on a fixed 512-token prompt (teacher-forced) vs
                                  bf16: relative error and top-1 agreement

Everything is random: the point is memory, speed and numerical error, not what the model says.
Target: well inside 8 minutes on one H200 for the four variants (--variants to choose).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.config import ASSETS, reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.layers.attention import ContiguousKV, SequenceKV  # noqa: E402
from thinktalk.request import Request, SamplingParams  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.quant import QuantConfig, _params_on_meta, quantize_model_, weight_bytes  # noqa: E402
from thinktalk.weights.tiny import _random_like  # noqa: E402

GIB = 2**30
STACKS = ("thinker.model", "talker.model", "talker.code_predictor.model")
DEVICE = "cuda"  # --tiny without a GPU: "cpu" (a dry run of every code path on the tiny config)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _mem:
    """torch.cuda memory statistics; zeros on the CPU dry run."""

    @staticmethod
    def reset():
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def allocated():
        return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0

    @staticmethod
    def peak():
        return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0

    @staticmethod
    def peak_reserved():
        return torch.cuda.max_memory_reserved() if DEVICE == "cuda" else 0

    @staticmethod
    def free():
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# -- building a variant, layer by layer -------------------------------------------------------------
def _fill_random_(module: torch.nn.Module, prefix: str, seed: int, device) -> None:
    """Allocate every meta parameter of `module` on `device` and fill it like weights.tiny.randomize_."""
    gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(prefix.encode()))
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            full = f"{prefix}{mod_name + '.' if mod_name else ''}{pname}"
            t = torch.empty(p.shape, dtype=p.dtype, device=device)
            with torch.no_grad():
                t.copy_(_random_like(full, tuple(p.shape), gen, device))
            mod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@torch.inference_mode()
def _layer_outputs(layer, x, cos, sin):
    h = layer.input_layernorm(x)
    attn = layer.self_attn(h, cos, sin, ContiguousKV([SequenceKV()], [x.shape[0]]))
    x2 = x + attn
    h2 = layer.post_attention_layernorm(x2)
    return h, h2, attn, layer.mlp(h2), x2


@torch.inference_mode()
def build_variant(cfg, variant: str, device, seed: int, prompt: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    qcfg = None if variant == "bf16" else QuantConfig.parse(variant)
    _mem.reset()
    t0 = time.perf_counter()
    with _params_on_meta():
        model = build_model(cfg, device, torch.bfloat16, with_talker=True)
    layer_lists = {name: model.get_submodule(name).layers for name in STACKS}
    # everything outside the decoder layers first (embeddings, encoders, heads, code2wav)
    in_layers = {id(p) for layers in layer_lists.values() for p in layers.parameters()}
    for name, mod in model.named_children():
        for sub_name, sub in mod.named_modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None and p.device.type == "meta" and id(p) not in in_layers:
                    full = f"{name}.{sub_name + '.' if sub_name else ''}{pname}"
                    gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(full.encode()))
                    t = _random_like(full, tuple(p.shape), gen, device).to(p.dtype)
                    sub._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
    errors: dict[str, list[dict]] = {}
    for stack_name, layers in layer_lists.items():
        stack = model.get_submodule(stack_name)
        if stack_name == "thinker.model":
            x = stack.embed_tokens(prompt.to(device))
            pos = torch.arange(len(prompt), device=device)[None].expand(3, -1)
        else:  # talker / code predictor: unit-RMS random hidden states
            width = cfg.talker_config.text_config.hidden_size if stack_name == "talker.model" else \
                cfg.talker_config.code_predictor_config.hidden_size
            n = 256 if stack_name == "talker.model" else 16
            g = torch.Generator(device=device).manual_seed(seed + 7)
            x = torch.randn(n, width, generator=g, device=device).to(torch.bfloat16)
            pos = torch.arange(n, device=device)
            if stack_name == "talker.model":
                pos = pos[None].expand(3, -1)
        cos, sin = stack.rotary_emb(pos)
        errors[stack_name] = []
        for i, layer in enumerate(layers):
            prefix = f"{stack_name}.layers.{i}."
            _fill_random_(layer, prefix, seed, device)
            if qcfg is None:
                continue
            h, h2, attn, mlp, x2 = _layer_outputs(layer, x, cos, sin)
            quantize_model_(layer, qcfg, prefix=prefix)
            attn_q = layer.self_attn(h, cos, sin, ContiguousKV([SequenceKV()], [x.shape[0]]))
            mlp_q = layer.mlp(h2)
            errors[stack_name].append({
                "attn": _rel(attn_q, attn), "mlp": _rel(mlp_q, mlp), "layer": _rel(attn_q + mlp_q, attn + mlp),
            })
            x = x2 + mlp  # the next layer sees the bf16 model's input
    if qcfg is not None:
        model.quant_config = qcfg
    sync()
    info = {"build_s": time.perf_counter() - t0, "build_peak_gib": _mem.peak() / GIB}
    if qcfg is not None:
        summary = {}
        for stack_name, rows in errors.items():
            summary[stack_name] = {
                k: {"mean": float(np.mean([r[k] for r in rows])), "max": float(np.max([r[k] for r in rows]))}
                for k in ("attn", "mlp", "layer")
            }
        info["layer_errors"] = {"summary": summary, "per_layer": errors}
    return model.eval(), info


# -- measurements ---------------------------------------------------------------------------------
@torch.inference_mode()
def thinker_logits(model, prompt: torch.Tensor) -> torch.Tensor:
    t = model.thinker
    ids = prompt.to(DEVICE)
    embeds, _ = t.embed(ids)
    pos = torch.arange(len(ids), device=DEVICE)[None].expand(3, -1)
    hidden, _ = t(embeds, pos, ContiguousKV([SequenceKV()], [len(ids)]))
    return t.logits(hidden).float()


def text_request(n_prompt: int, n_out: int, seed: int = 0) -> Request:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 100000, (n_prompt,), generator=g).tolist()
    pos = torch.arange(n_prompt)[None].expand(3, -1).clone()
    return Request(prompt_ids=ids, positions=pos, rope_delta=0, sampling=SamplingParams(temperature=0.0, max_new_tokens=n_out))


def run_engine(engine: Engine, reqs: list[Request]) -> dict:
    for r in reqs:
        engine.add_request(r)
    sync()
    t0 = time.perf_counter()
    decode_start, decode_tokens = None, 0
    while engine.has_work():
        outs = engine.step()
        if decode_start is None and all(r.output_ids for r in reqs):
            sync()
            decode_start = time.perf_counter()
        elif decode_start is not None:
            decode_tokens += len(outs)
    sync()
    decode_s = time.perf_counter() - decode_start if decode_start else float("nan")
    return {"total_s": time.perf_counter() - t0, "decode_tokens": decode_tokens,
            "tok_s": decode_tokens / decode_s if decode_tokens else None}


def engine_config(spec: str) -> EngineConfig:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in json.loads(spec).items() if k in fields})


def bench_decode(model, args) -> dict:
    engine = Engine(model, eos_token_ids=[], config=engine_config(args.engine_config))
    run_engine(engine, [text_request(32, 8)])  # warm-up: kernels for one row
    run_engine(engine, [text_request(32, 4, seed=i) for i in range(args.streams)])  # and for many
    one = run_engine(engine, [text_request(128, args.decode_len)])
    many = run_engine(engine, [text_request(128, args.decode_len_many, seed=i) for i in range(args.streams)])
    del engine
    return {"decode_1": one, f"decode_{args.streams}": many}


def bench_exchange(model, args) -> dict:
    """One spoken exchange through the whole pipeline; peak GPU memory of it."""
    from thinktalk.api import Omni
    from thinktalk.multimodal.processor import OmniProcessor

    omni = Omni(model, OmniProcessor.from_pretrained(ASSETS), ASSETS, engine_config(args.engine_config))
    sr = 16000
    t = np.arange(int(args.audio_seconds * sr)) / sr
    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": wave},
                                             {"type": "text", "text": "Answer the question in the recording."}]}]
    frames = int(args.speech_seconds * 12.5)
    kw = dict(speaker="Ethan", max_new_tokens=args.answer_tokens, temperature=0.0, speech_max_frames=frames)
    omni.generate(messages, speaker="Ethan", max_new_tokens=4, temperature=0.0, speech_max_frames=4)  # warm-up
    _mem.free()
    sync()
    base = _mem.allocated()
    _mem.reset()
    t0 = time.perf_counter()
    res = omni.generate(messages, **kw)
    sync()
    out = {
        "seconds": time.perf_counter() - t0,
        "prompt_tokens": res.prompt_tokens, "answer_tokens": len(res.token_ids),
        "codec_frames": int(res.codes.shape[-1]) if res.codes is not None else 0,
        "speech_seconds": len(res.audio) / res.sample_rate if res.audio is not None else 0.0,
        "allocated_before_gib": base / GIB,
        "peak_allocated_gib": _mem.peak() / GIB,
        "peak_reserved_gib": _mem.peak_reserved() / GIB,
    }
    del omni, res
    return out


def run_variant(cfg, variant: str, args, prompt: torch.Tensor, ref_logits: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    model, res = build_variant(cfg, variant, DEVICE, args.seed, prompt[: args.error_tokens])
    parts = weight_bytes(model)
    res["weights_gib"] = sum(parts.values()) / GIB
    res["weights_by_part_gib"] = {k: v / GIB for k, v in sorted(parts.items())}
    print(json.dumps({variant: {k: res[k] for k in ("build_s", "build_peak_gib", "weights_gib")}}), flush=True)
    logits = thinker_logits(model, prompt)
    if ref_logits is not None:
        ref = ref_logits.to(logits.device).float()
        res["logits"] = {"rel_err": _rel(logits, ref),
                         "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                         "tokens": int(prompt.numel())}
        print(json.dumps({variant: res["logits"], "layer_errors": res["layer_errors"]["summary"]}), flush=True)
    logits = logits.to(torch.bfloat16).cpu()
    if not args.skip_exchange:
        res["exchange"] = bench_exchange(model, args)
        print(json.dumps({variant: {"exchange": res["exchange"]}}), flush=True)
    res.update(bench_decode(model, args))
    print(json.dumps({variant: {k: res[k] for k in res if k.startswith("decode")}}), flush=True)
    del model
    _mem.free()
    return res, logits


@torch.inference_mode()
def smoke() -> dict:
    """Quick GPU check of every quantized kernel against its torch reference (a few seconds + compiles)."""
    from thinktalk.kernels import quant_gemm as qg
    from thinktalk.kernels.quant_format import quantize, resolve_format
    from thinktalk.kernels.quant_moe import QuantTensor, quant_fused_moe, quant_moe_reference
    from thinktalk.layers.moe import route

    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for method, group, sym, block in [("int4", 128, True, None), ("int4", 128, False, None), ("int8", 128, True, None),
                                      ("fp8", None, True, None), ("fp8", None, True, 128)]:
        name = f"{method}-g{group}-{'sym' if sym else 'asym'}" + (f"-block{block}" if block else "")
        for m in (1, 33, 300):
            n, k = 4096, 2048
            w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            fmt = resolve_format(method, k, group, sym, block)
            q, s, z = quantize(w, fmt, scale_dtype=torch.bfloat16)
            exact = qg.quant_matmul_reference(x.float(), q, s, z, fmt)
            got = qg.quant_matmul(x, q, s, z, fmt)
            scale = exact.abs().max().item()
            out[f"gemm {name} m={m}"] = (got.float() - exact).abs().max().item() / scale
            if method == "fp8":
                ref = qg.w8a8_fp8_reference(x.float(), q, s, None, fmt)
                got = qg.w8a8_fp8_matmul(x, q, s, None, fmt)
                out[f"w8a8 {name} m={m}"] = (got.float() - ref).abs().max().item() / scale
        e, h, i, topk = 16, 1024, 384, 4
        gu = torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5
        dn = torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5
        for ntok in (1, 64):
            x = torch.randn(ntok, h, device="cuda", generator=g)
            wts, ids = route(x, torch.randn(e, h, device="cuda", generator=g), topk, True)
            f1, f2 = resolve_format(method, h, group, sym, block), resolve_format(method, i, group, sym, block)
            a = QuantTensor(*quantize(gu, f1, scale_dtype=torch.bfloat16), f1, h)
            b = QuantTensor(*quantize(dn, f2, scale_dtype=torch.bfloat16), f2, i)
            exact = quant_moe_reference(x, a, b, wts, ids)
            got = quant_fused_moe(x.to(torch.bfloat16), a, b, wts.to(torch.bfloat16), ids)
            out[f"moe {name} n={ntok}"] = (got.float() - exact).abs().max().item() / exact.abs().max().item()
    for key, v in out.items():
        print(f"{key:40s} max abs err / max |ref| = {v:.3g}", flush=True)
    bad = {k: v for k, v in out.items() if not v < 0.03}
    if bad:
        raise SystemExit(f"kernels disagree with their references: {bad}")
    return out


def main():
    if "--smoke" in sys.argv:
        smoke()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="*", default=["bf16", "fp8", "int8", "int4"],
                    help="bf16 and any QuantConfig spec: fp8, fp8-block128, int8, int4, int4-asym, int4-g64 ...")
    ap.add_argument("--engine-config", default='{"moe_kernel": "triton"}', help="JSON of EngineConfig fields")
    ap.add_argument("--decode-len", type=int, default=128, help="tokens decoded by the single stream")
    ap.add_argument("--decode-len-many", type=int, default=64, help="tokens decoded by each of --streams streams")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--audio-seconds", type=float, default=30.0, help="user audio in the spoken exchange")
    ap.add_argument("--speech-seconds", type=float, default=30.0, help="spoken answer length cap (12.5 frames/s)")
    ap.add_argument("--answer-tokens", type=int, default=96, help="thinker answer length cap in the exchange")
    ap.add_argument("--error-tokens", type=int, default=256, help="prompt tokens for the per-layer errors")
    ap.add_argument("--logit-tokens", type=int, default=512, help="prompt tokens for the logits comparison")
    ap.add_argument("--skip-exchange", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny random config instead of the full model (a quick check of the script; CPU if no GPU)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if DEVICE == "cpu" and not args.tiny:
        raise SystemExit("bench_quant needs a CUDA GPU (or --tiny for a CPU dry run)")
    if "bf16" in args.variants and args.variants[0] != "bf16":
        args.variants = ["bf16"] + [v for v in args.variants if v != "bf16"]
    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if DEVICE == "cuda" else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": "Qwen3-Omni-30B-A3B-Instruct, full-size random weights (thinker + talker + code2wav)",
        "engine_config": json.loads(args.engine_config),
        "notes": [
            "quantized: decoder-layer linears + routed/shared experts of thinker, talker and code predictor; "
            "embeddings, heads, routers, norms, audio/vision encoders and code2wav stay bf16",
            "fp8: per-channel e4m3 weights; dense linears W8A8 via torch._scaled_mm (dynamic per-token "
            "activation scales), experts weight-only fp8 in the fused-MoE kernel",
            "int8/int4: weight-only, group 128 symmetric, Triton GEMM / fused-MoE dequantizing in registers",
            "exchange: reference speech path (talker + code predictor + code2wav chunked decode)",
        ],
        "variants": {},
    }
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    if args.tiny:
        from thinktalk.config import config_from_dict
        from thinktalk.weights.tiny_config import tiny_config_dict

        cfg = config_from_dict(tiny_config_dict("instruct"))
        result["model"] = "tiny random config (dry run of the script, figures meaningless)"
    else:
        cfg = reference_config()
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(1000, 100000, (args.logit_tokens,), generator=g)
    t_all = time.perf_counter()
    ref_logits = None
    for variant in args.variants:
        res, logits = run_variant(cfg, variant, args, prompt, ref_logits)
        if variant == "bf16":
            ref_logits = logits
        result["variants"][variant] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a timeout
    result["total_s"] = time.perf_counter() - t_all
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {v: {"weights_gib": r["weights_gib"], "exchange_peak_gib": r.get("exchange", {}).get("peak_allocated_gib"),
                   "decode_1_tok_s": r["decode_1"]["tok_s"], f"decode_{args.streams}_tok_s": r[f"decode_{args.streams}"]["tok_s"],
                   "logits": r.get("logits")} for v, r in result["variants"].items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
