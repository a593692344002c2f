"""Quantization benchmark: bf16 / fp8 / int8 / int4 on full-size random weights, one GPU.

    python benchmarks/bench_quant.py --out benchmarks/results/quant_h200.json

Each variant runs in its own process (so one variant's CUDA graph pools, cuBLAS workspaces and
caches never count in the next one's memory); the bf16 variant leaves its logits in a file for
the others' comparison (--ref-logits, kept, so variants can also be run by separate commands with
--merge into one JSON).

A variant: the full Instruct model — thinker (audio and vision encoders included), talker, code
predictor and code2wav — is built with its parameters on the meta device and materialized part
by part with random bf16 weights (seeded by name, so every variant has the same model). For the
quantized variants the parts outside the decoder stacks (encoders, heads, embeddings: what the
policy of weights/quant.py covers) are measured and quantized first, then the decoder layers one
at a time, each measured and quantized before the next one exists: the bf16 model is never held
whole, so the build peak is the quantized model plus one bf16 layer (or the bf16 parts).

Figures per variant:
  weights_gib / weights_by_part   bytes of parameters and buffers after the build
  build                           seconds and peak GPU memory while building (+ quantizing)
  exchange                        one spoken exchange as a single-user server runs it: ~30 s of
                                  user audio + a text question in, greedy answer
                                  (--answer-tokens), the talker streams --speech-seconds of speech
                                  (12.5 codec frames/s, codec eos ignored) through code2wav in
                                  chunks, all stepped together as Omni.stream_speech does. The
                                  engine has max_num_seqs 1 and a paged KV pool of exactly the
                                  blocks the exchange needs (kv_blocks, recorded), one talker KV
                                  slot. Recorded: startup (Omni + speech warm-up + one short
                                  exchange: peak), then the exchange: peak GPU memory
                                  (max_memory_allocated; reserved), first text token and first
                                  audio latency (from the messages, processor included, to the
                                  first PCM on the host), seconds
  decode_1 / decode_N             thinker decode tok/s, one stream and N concurrent streams
                                  (thinktalk.engine.Engine, KV pool sized to the streams; eos ignored)
  layer_errors                    per decoder layer (thinker, talker, code predictor), with the
                                  bf16 layer's own inputs: relative error ||q - ref|| / ||ref|| of
                                  the attention output, the MLP/MoE output and their sum
  part_errors                     the quantized parts: per linear / embedding table (random
                                  unit-RMS inputs, random rows), and end to end: the audio
                                  encoder on the exchange's clip, the vision encoder on a 448x448
                                  image's patches, lm_head logits (relative error, top-1 agreement)
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
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.config import ASSETS, reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.layers.attention import ContiguousKV, SequenceKV  # noqa: E402
from thinktalk.request import Request, SamplingParams  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.quant import (  # noqa: E402
    QuantConfig, _params_on_meta, describe, quantize_model_, quantized_module_names, weight_bytes,
)
from thinktalk.weights.tiny import _random_like  # noqa: E402

GIB = 2**30
STACKS = ("thinker.model", "talker.model", "talker.code_predictor.model")
DEVICE = "cuda"  # --tiny without a GPU: "cpu" (a dry run of every code path on the tiny config)
SAMPLE_RATE_IN = 16000
CODEC_FPS = 12.5


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
    def device_used():
        """total - free on the device: this process's CUDA context + reserved memory (+ any other process)."""
        if DEVICE != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    @staticmethod
    def free():
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# -- building a variant, part by part -------------------------------------------------------------
def _fill_random_(module: nn.Module, prefix: str, seed: int, device, skip: set[int] = frozenset()) -> None:
    """Allocate every meta parameter of `module` (but those in `skip`, by id) on `device` and fill
    it like weights.tiny.randomize_, seeded by its full name."""
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta" or id(p) in skip:
                continue
            full = f"{prefix}{mod_name + '.' if mod_name else ''}{pname}"
            gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(full.encode()))
            t = _random_like(full, tuple(p.shape), gen, device).to(p.dtype)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _unit_rms(n: int, width: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(n, width, generator=gen, device=device).to(torch.bfloat16)


@torch.inference_mode()
def _layer_outputs(layer, x, cos, sin):
    h = layer.input_layernorm(x)
    attn = layer.self_attn(h, cos, sin, ContiguousKV([SequenceKV()], [x.shape[0]]))
    x2 = x + attn
    h2 = layer.post_attention_layernorm(x2)
    return h, h2, attn, layer.mlp(h2), x2


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "max": float(np.max(values)), "n": len(values)}


def audio_clip(seconds: float) -> np.ndarray:
    """A deterministic 'voice-like' clip: an amplitude-modulated tone plus noise."""
    t = np.arange(int(seconds * SAMPLE_RATE_IN)) / SAMPLE_RATE_IN
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@torch.inference_mode()
def _encoder_outputs(model, audio_feats, pixels, grid):
    t = model.thinker
    audio = t.audio_tower(audio_feats, torch.tensor([audio_feats.shape[1]]))
    vis, deep = t.visual(pixels, grid)
    return audio, vis, deep


@torch.inference_mode()
def quantize_parts_(model, qcfg: QuantConfig, layer_params: set[int], device, seed: int, audio_seconds: float) -> dict:
    """Quantize the covered modules outside the decoder stacks; their errors against bf16."""
    in_layers = {name for name, mod in model.named_modules()
                 if any(id(p) in layer_params for p in mod.parameters(recurse=False))}
    dense, _ = quantized_module_names(model, qcfg)
    names = [n for n in dense if n not in in_layers]
    g = torch.Generator(device=device).manual_seed(seed + 11)
    probes = {}
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            x = torch.randint(0, mod.num_embeddings, (4096,), generator=g, device=device)
        else:
            x = _unit_rms(64, mod.in_features, g, device)
        probes[name] = (x, mod(x))
    # end to end: the audio encoder on the exchange's clip, the vision encoder on a 448x448 image
    from thinktalk.multimodal.processor import OmniProcessor

    proc = OmniProcessor.from_pretrained(ASSETS)
    feats = proc.prepare_messages([{"role": "user", "content": [{"type": "audio", "audio": audio_clip(audio_seconds)}]}])
    mask = feats["feature_attention_mask"][0].bool()
    audio_feats = feats["input_features"][0][:, mask].to(device, torch.bfloat16)
    vcfg = model.thinker.visual
    side = 448 // vcfg.patch_embed.patch_size
    grid = torch.tensor([[1, side, side]])
    pixels = torch.randn(side * side, vcfg.patch_embed.patch_dim, generator=g, device=device).to(torch.bfloat16)
    hidden = _unit_rms(256, model.thinker.lm_head.in_features, g, device)
    ref_audio, ref_vis, ref_deep = _encoder_outputs(model, audio_feats, pixels, grid)
    ref_logits = model.thinker.lm_head(hidden).float()

    quantize_model_(model, qcfg, names=names)

    per_module = {name: _rel(model.get_submodule(name)(x), y) for name, (x, y) in probes.items()}
    del probes
    audio, vis, deep = _encoder_outputs(model, audio_feats, pixels, grid)
    logits = model.thinker.lm_head(hidden).float()
    groups: dict[str, list[float]] = {}
    for name, err in per_module.items():
        groups.setdefault(f"{qcfg.group_of(name)} ({qcfg.method_for(name)})", []).append(err)
    return {
        "summary": {k: _summary(v) for k, v in groups.items()},
        "audio_encoder_output": _rel(audio, ref_audio),
        "vision_encoder_output": _rel(vis, ref_vis),
        "vision_deepstack_output": float(np.mean([_rel(a, b) for a, b in zip(deep, ref_deep)])) if deep else None,
        "lm_head_logits": {"rel_err": _rel(logits, ref_logits),
                           "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()},
        "per_module": per_module,
    }


@torch.inference_mode()
def build_variant(cfg, variant: str, device, seed: int, prompt: torch.Tensor, args) -> tuple[nn.Module, dict]:
    qcfg = None if variant == "bf16" else QuantConfig.parse(variant)
    _mem.reset()
    t0 = time.perf_counter()
    with _params_on_meta():
        model = build_model(cfg, device, torch.bfloat16, with_talker=True)
    layer_lists = {name: model.get_submodule(name).layers for name in STACKS}
    in_layers = {id(p) for layers in layer_lists.values() for p in layers.parameters()}
    # everything outside the decoder layers first (embeddings, encoders, heads, code2wav) ...
    _fill_random_(model, "", seed, device, skip=in_layers)
    info: dict = {}
    if qcfg is not None:  # ... and the parts of it the policy covers quantized (with their errors)
        info["part_errors"] = quantize_parts_(model, qcfg, in_layers, device, seed, args.audio_seconds)
        _mem.free()
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
            x = _unit_rms(n, width, g, device)
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
    info.update({"build_s": time.perf_counter() - t0, "build_peak_gib": _mem.peak() / GIB})
    if qcfg is not None:
        info["quantized"] = describe(model)
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


def compare_logits(model, prompt: torch.Tensor, ref_path: Path | None) -> tuple[dict | None, torch.Tensor]:
    """(relative error and top-1 agreement vs the bf16 logits in ref_path, or None; these logits in
    bf16 on the host). Nothing of it stays on the device."""
    logits = thinker_logits(model, prompt)
    out = None
    if ref_path is not None and ref_path.is_file():
        ref = torch.load(ref_path).to(logits.device).float()
        out = {"rel_err": _rel(logits, ref), "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
               "tokens": int(prompt.numel())}
    return out, logits.to(torch.bfloat16).cpu()


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


def engine_config(spec: str, **sizing) -> EngineConfig:
    """EngineConfig from the --engine-config JSON, with the benchmark's sizing unless the JSON sets it."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    user = {k: v for k, v in json.loads(spec).items() if k in fields}
    return EngineConfig(**{**sizing, **user})


def kv_blocks(tokens_per_seq: int, seqs: int, block_size: int = 16) -> int:
    """Paged KV blocks for `seqs` sequences of up to `tokens_per_seq` tokens (+1 block each: the
    block a sequence's next token would open)."""
    return seqs * (math.ceil(tokens_per_seq / block_size) + 1)


def bench_decode(model, args) -> dict:
    longest = 128 + max(args.decode_len, args.decode_len_many)
    blocks = kv_blocks(longest, args.streams)
    econf = engine_config(args.engine_config, max_num_seqs=args.streams, num_kv_blocks=blocks)
    engine = Engine(model, eos_token_ids=[], config=econf)
    run_engine(engine, [text_request(32, 8)])  # warm-up: kernels for one row
    run_engine(engine, [text_request(32, 4, seed=i) for i in range(args.streams)])  # and for many
    one = run_engine(engine, [text_request(128, args.decode_len)])
    many = run_engine(engine, [text_request(128, args.decode_len_many, seed=i) for i in range(args.streams)])
    profile = profile_decode(engine) if args.profile and DEVICE != "cpu" else None
    cfg, graphed = engine.config, engine.decode_graphs is not None and engine.decode_graphs.use_graphs
    del engine
    _mem.free()
    return {"decode_1": one, f"decode_{args.streams}": many,
            "decode_engine": {"kv_backend": cfg.kv_backend, "num_kv_blocks": blocks, "max_num_seqs": args.streams,
                              "cuda_graphs": graphed, "moe_kernel": cfg.moe_kernel},
            **({"decode_1_profile": profile} if profile else {})}


def profile_decode(engine: Engine) -> dict:
    """Where one stream's decode step goes: GPU time per step and the top kernels (torch profiler)."""
    req = text_request(64, 40, seed=99)
    engine.add_request(req)
    for _ in range(8):
        engine.step()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        sync()
    engine.abort(req.request_id)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in rows)
    return {"gpu_ms_per_step": total / 5 / 1000,
            "top_kernels": [{"name": e.key[:80], "us_per_step": e.self_device_time_total / 5, "calls_per_step": e.count / 5}
                            for e in rows[:12]]}


def spoken_question(audio_seconds: float) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": audio_clip(audio_seconds)},
                                         {"type": "text", "text": "Answer the question in the recording."}]}]


def speak(omni, messages, max_new_tokens: int, frames: int) -> dict:
    """One spoken answer, stepped as Omni.stream_speech does (thinker step, then speech step),
    with the talker's codec eos ignored so that exactly `frames` frames are spoken."""
    t0 = time.perf_counter()
    req = omni.make_request(messages, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), speaker="Ethan")
    req.speech_max_frames = frames
    chunks: list = []
    stage = omni.speech_stage
    omni.engine.add_request(req)
    stage.add(req, on_chunk=chunks.append, ignore_eos=True)
    first_token = first_audio = None
    samples, done = 0, False
    while not done:
        if omni.engine.has_work():
            omni.engine.step()
        if first_token is None and req.output_ids:
            first_token = time.perf_counter() - t0
        stage.step()
        for chunk in chunks:
            if chunk.pcm.size:
                if first_audio is None:
                    first_audio = time.perf_counter() - t0
                samples += chunk.pcm.size
            done = done or chunk.finished
        chunks.clear()
    while req.finish_reason is None:  # speech ended first: the thinker finishes its answer
        omni.engine.step()
    job = stage.pop(req.request_id)
    sync()
    return {"seconds": time.perf_counter() - t0, "first_token_s": first_token, "first_audio_s": first_audio,
            "prompt_tokens": len(req.prompt_ids), "answer_tokens": len(req.output_ids),
            "codec_frames": int(job.codes().shape[-1]) if job is not None else 0,
            "speech_seconds": samples / 24000}


def bench_exchange(model, args) -> dict:
    """One spoken exchange as a single-user server runs it (see the module docstring)."""
    from thinktalk.api import Omni
    from thinktalk.multimodal.processor import OmniProcessor

    proc = OmniProcessor.from_pretrained(ASSETS)
    messages = spoken_question(args.audio_seconds)
    prompt_len = int(proc.prepare_messages(messages)["input_ids"].shape[-1])
    blocks = kv_blocks(prompt_len + args.answer_tokens, 1)
    econf = engine_config(args.engine_config, max_num_seqs=1, num_kv_blocks=blocks)
    frames = int(args.speech_seconds * CODEC_FPS)
    _mem.free()
    sync()
    _mem.reset()
    weights = _mem.allocated()
    t0 = time.perf_counter()
    omni = Omni(model, proc, ASSETS, econf)
    omni.speech_stage.warmup((1,))  # what `thinktalk serve` does before taking requests
    speak(omni, messages, 4, 8)  # and the first (short) exchange: kernels compiled, shapes seen
    startup = {"seconds": time.perf_counter() - t0, "peak_allocated_gib": _mem.peak() / GIB,
               "allocated_after_gib": _mem.allocated() / GIB}
    _mem.free()
    sync()
    base = _mem.allocated()
    _mem.reset()
    out = speak(omni, messages, args.answer_tokens, frames)
    out.update({
        "allocated_before_gib": base / GIB,
        "peak_allocated_gib": _mem.peak() / GIB,
        "peak_reserved_gib": _mem.peak_reserved() / GIB,
        "peak_above_weights_gib": (_mem.peak() - weights) / GIB,
        "allocated_after_gib": _mem.allocated() / GIB,
        "device_used_gib": _mem.device_used() / GIB,
        "startup": startup,
        "sizing": {"max_num_seqs": 1, "kv_backend": omni.engine.config.kv_backend, "num_kv_blocks": blocks,
                   "kv_block_size": econf.block_size, "kv_tokens": blocks * econf.block_size,
                   "speech_slots": omni.speech_slots, "talker_kv_capacity": getattr(omni.speech_stage.runner, "capacity", None),
                   "speech_backend": omni.speech_stage.backend_name, "cuda_graphs": omni.engine.decode_graphs is not None},
    })
    del omni
    _mem.free()
    return out


def reference_logits_only(cfg, args, prompt: torch.Tensor) -> None:
    """Build the bf16 model, write its logits to --ref-logits, nothing else (for a run without bf16)."""
    model, _ = build_variant(cfg, "bf16", DEVICE, args.seed, prompt[: args.error_tokens], args)
    _, logits = compare_logits(model, prompt, None)
    torch.save(logits, args.ref_logits)


def run_variant(cfg, variant: str, args, prompt: torch.Tensor) -> dict:
    model, res = build_variant(cfg, variant, DEVICE, args.seed, prompt[: args.error_tokens], args)
    parts = weight_bytes(model)
    res["weights_gib"] = sum(parts.values()) / GIB
    res["weights_by_part_gib"] = {k: v / GIB for k, v in sorted(parts.items())}
    print(json.dumps({variant: {k: res[k] for k in ("build_s", "build_peak_gib", "weights_gib")}}), flush=True)
    if "part_errors" in res:
        print(json.dumps({variant: {"part_errors": {k: v for k, v in res["part_errors"].items() if k != "per_module"}}}), flush=True)
    logit_cmp, logits = compare_logits(model, prompt, args.ref_logits if variant != "bf16" else None)
    if variant == "bf16":
        torch.save(logits, args.ref_logits)
    elif logit_cmp is not None:
        res["logits"] = logit_cmp
        print(json.dumps({variant: res["logits"], "layer_errors": res["layer_errors"]["summary"]}), flush=True)
    del logits
    if not args.skip_exchange:
        res["exchange"] = bench_exchange(model, args)
        print(json.dumps({variant: {"exchange": res["exchange"]}}), flush=True)
    res.update(bench_decode(model, args))
    print(json.dumps({variant: {k: res[k] for k in res if k.startswith("decode")}}), flush=True)
    return res


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
                    help="bf16 and any QuantConfig spec: fp8, int8, int4, int4-asym, int4-g64, int4-decoders, fp8-block128 ...")
    ap.add_argument("--engine-config", default="{}",
                    help="JSON of EngineConfig fields (default: the engine's own, i.e. paged KV + CUDA graphs on a GPU); "
                         "max_num_seqs / num_kv_blocks given here override the benchmark's sizing")
    ap.add_argument("--decode-len", type=int, default=128, help="tokens decoded by the single stream")
    ap.add_argument("--decode-len-many", type=int, default=64, help="tokens decoded by each of --streams streams")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--audio-seconds", type=float, default=30.0, help="user audio in the spoken exchange")
    ap.add_argument("--speech-seconds", type=float, default=30.0, help="spoken answer length (12.5 frames/s)")
    ap.add_argument("--answer-tokens", type=int, default=96, help="thinker answer length cap in the exchange")
    ap.add_argument("--error-tokens", type=int, default=256, help="prompt tokens for the per-layer errors")
    ap.add_argument("--logit-tokens", type=int, default=512, help="prompt tokens for the logits comparison")
    ap.add_argument("--skip-exchange", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one stream's decode step (GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-logits", type=Path, default=None,
                    help="bf16 logits file: the bf16 variant writes it, the others read it (default: a temporary "
                         "file; without bf16 among the variants and no such file, a bf16 build makes it first)")
    ap.add_argument("--merge", action="store_true", help="add the variants to those already in --out")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one variant in this process
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny random config instead of the full model (a quick check of the script; CPU if no GPU)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if DEVICE == "cpu" and not args.tiny:
        raise SystemExit("bench_quant needs a CUDA GPU (or --tiny for a CPU dry run)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from thinktalk.config import config_from_dict
        from thinktalk.weights.tiny_config import tiny_config_dict

        cfg = config_from_dict(tiny_config_dict("instruct"))
    else:
        cfg = reference_config()
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(1000, 100000, (args.logit_tokens,), generator=g)
    if args.child == "bf16-logits":
        reference_logits_only(cfg, args, prompt)
        return
    if args.child is not None:
        res = run_variant(cfg, args.child, args, prompt)
        args.child_out.write_text(json.dumps(res, indent=2) + "\n")
        return

    if "bf16" in args.variants and args.variants[0] != "bf16":
        args.variants = ["bf16"] + [v for v in args.variants if v != "bf16"]
    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if DEVICE == "cuda" else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip(),
        "model": "Qwen3-Omni-30B-A3B-Instruct, full-size random weights (thinker + talker + code2wav)",
        "engine_config": json.loads(args.engine_config),
        "notes": [
            "quantized (weights/quant.py policy): decoder-layer linears + routed/shared experts of thinker, talker "
            "and code predictor with the variant's method; audio/vision encoder linears int8 (fp8 under fp8); "
            "lm_head, codec_head, code-predictor heads and the token/codec embeddings int8 g128; routers, norms, "
            "talker projections, encoder convolutions and code2wav stay bf16 (spec suffix -decoders: decoders only)",
            "fp8: per-channel e4m3 weights; dense linears W8A8 via torch._scaled_mm (dynamic per-token "
            "activation scales), experts weight-only fp8 in the fused-MoE kernel",
            "int8/int4: weight-only, group 128 symmetric, Triton GEMM / fused-MoE dequantizing in registers",
            "one process per variant; exchange: max_num_seqs 1, paged KV of exactly the exchange's blocks, one talker "
            "KV slot, streaming speech (talker + code predictor CUDA graphs, code2wav chunks 4/8/16/32/50 frames)",
        ],
        "variants": {},
    }
    if args.merge and args.out.is_file():
        result["variants"] = json.loads(args.out.read_text()).get("variants", {})
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    if args.tiny:
        result["model"] = "tiny random config (dry run of the script, figures meaningless)"
    t_all = time.perf_counter()
    child_argv = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        if args.ref_logits is None:
            args.ref_logits = Path(tmp) / "bf16_logits.pt"
        if "bf16" not in args.variants and not args.ref_logits.is_file():
            args.variants = ["bf16-logits"] + args.variants
        for variant in args.variants:
            child_out = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv, "--child", variant,
                   "--child-out", str(child_out), "--ref-logits", str(args.ref_logits)]
            r = subprocess.run(cmd, env=os.environ.copy())
            if variant == "bf16-logits":
                if r.returncode != 0:
                    raise SystemExit("the bf16 reference logits could not be made")
                continue
            if r.returncode != 0 or not child_out.is_file():
                result["variants"][variant] = {"error": f"exit status {r.returncode}"}
            else:
                result["variants"][variant] = json.loads(child_out.read_text())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a timeout
    result["total_s"] = time.perf_counter() - t_all
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {}
    for v, r in result["variants"].items():
        if "error" in r:
            summary[v] = r
            continue
        ex = r.get("exchange", {})
        summary[v] = {"weights_gib": r["weights_gib"], "exchange_peak_gib": ex.get("peak_allocated_gib"),
                      "startup_peak_gib": ex.get("startup", {}).get("peak_allocated_gib"),
                      "first_audio_s": ex.get("first_audio_s"),
                      "decode_1_tok_s": r["decode_1"]["tok_s"], f"decode_{args.streams}_tok_s": r[f"decode_{args.streams}"]["tok_s"],
                      "logits": r.get("logits")}
    print(json.dumps(summary, indent=1))
    if any("error" in r for r in result["variants"].values()):
        raise SystemExit("some variants failed (see above)")


if __name__ == "__main__":
    main()
