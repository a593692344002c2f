"""Thinker benchmark: thinktalk beside transformers' generate, full-size random weights, one GPU.

    python benchmarks/bench_thinker.py --out benchmarks/results/thinker_h200.json [--skip-transformers]

Figures (forced output lengths, eos ignored):
  ttft_512 / ttft_4096      time to first token for a text prompt of that many tokens
  decode_1                  ms/token and tok/s for one stream
  decode_aggregate[c]       aggregate decode tok/s with c concurrent sequences (512 in, 256 out)
  image_ttft                one 1280x720 image + 50-token question
  video_60s / video_120s    prefill time and peak GPU memory, 2 fps frames + their audio
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.config import reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.request import Request, SamplingParams  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.tiny import randomize_  # noqa: E402


def sync():
    torch.cuda.synchronize()


def text_request(n_prompt: int, n_out: int, seed: int = 0) -> Request:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 100000, (n_prompt,), generator=g).tolist()
    pos = torch.arange(n_prompt)[None].expand(3, -1).clone()
    sp = SamplingParams(temperature=0.0, max_new_tokens=n_out)
    return Request(prompt_ids=ids, positions=pos, rope_delta=0, sampling=sp)


def run_engine(engine: Engine, reqs: list[Request]) -> dict:
    """Time to first token of the first request, and decode throughput once all are running."""
    for r in reqs:
        engine.add_request(r)
    sync()
    t0 = time.perf_counter()
    first = None
    decode_start = None
    decode_tokens = 0
    while engine.has_work():
        outs = engine.step()
        if first is None and reqs[0].output_ids:
            sync()
            first = time.perf_counter() - t0
        if decode_start is None and all(r.output_ids for r in reqs):
            sync()
            decode_start = time.perf_counter()
        elif decode_start is not None:
            decode_tokens += len(outs)
    sync()
    total = time.perf_counter() - t0
    decode_time = time.perf_counter() - decode_start if decode_start else float("nan")
    return dict(ttft_s=first, total_s=total, decode_tokens=decode_tokens, decode_s=decode_time,
                decode_tok_s=decode_tokens / decode_time if decode_tokens else None)


def synth_video(path: Path, seconds: int, fps: int = 4, size=(640, 360), sample_rate: int = 16000) -> Path:
    """A video with moving content and a tone track, encoded with PyAV."""
    import av
    import numpy as np

    w, h = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = out.add_stream("aac", rate=sample_rate)
        aus.layout = "mono"
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(seconds * fps):
            img = np.stack([(xx + 7 * i) % 256, (yy + 3 * i) % 256, (xx + yy) % 256], -1).astype(np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        t = np.arange(seconds * sample_rate) / sample_rate
        pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
        for start in range(0, len(pcm), 1024):
            fr = av.AudioFrame.from_ndarray(pcm[None, start : start + 1024], format="s16", layout="mono")
            fr.sample_rate = sample_rate
            for p in aus.encode(fr):
                out.mux(p)
        for p in aus.encode(None):
            out.mux(p)
    return path


def mm_request(processor, cfg, content: list, use_audio_in_video: bool = False) -> Request:
    from thinktalk.api import request_from_inputs

    messages = [{"role": "user", "content": content}]
    inputs = processor.prepare_messages(messages, use_audio_in_video=use_audio_in_video)
    sp = SamplingParams(temperature=0.0, max_new_tokens=1)
    return request_from_inputs(inputs, cfg.thinker_config, sp, torch.device("cuda"), use_audio_in_video)


def bench_multimodal(engine: Engine, cfg, args) -> dict:
    import numpy as np
    from PIL import Image

    from thinktalk.config import ASSETS
    from thinktalk.multimodal.processor import OmniProcessor

    processor = OmniProcessor.from_pretrained(ASSETS)
    res = {}
    question = " ".join(["please"] * 48) + " describe."
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8))
    content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    run_engine(engine, [mm_request(processor, cfg, content)])  # warm-up: vision kernels for this shape
    other = Image.fromarray(np.random.default_rng(1).integers(0, 255, (720, 1280, 3), dtype=np.uint8))
    content[0] = {"type": "image", "image": other}  # another image: no prefix-cache hit
    t0 = time.perf_counter()
    req = mm_request(processor, cfg, content)
    prep = time.perf_counter() - t0
    r = run_engine(engine, [req])
    res["image_1280x720"] = {"ttft_ms": r["ttft_s"] * 1000, "preprocess_ms": prep * 1000, "prompt_tokens": len(req.prompt_ids)}
    print(json.dumps(res), flush=True)
    for seconds in args.video_seconds:
        path = synth_video(Path(f"/tmp/bench_video_{seconds}.mp4"), seconds)
        t0 = time.perf_counter()
        req = mm_request(processor, cfg, [{"type": "video", "video": str(path)}, {"type": "text", "text": "What happens?"}], True)
        prep = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        r = run_engine(engine, [req])
        peak = torch.cuda.max_memory_allocated()
        # the paged pool is one tensor allocated up front (90% of the GPU by default), so the peak
        # counts all of it; the working set counts only the blocks this request used
        pool = engine.pool
        pool_bytes = sum(t.numel() * t.element_size() for t in pool.k + pool.v)
        used = pool_bytes / pool.k[0].shape[0] * -(-(len(req.prompt_ids) + 1) // pool.block_size)
        res[f"video_{seconds}s_with_audio"] = {
            "prefill_s": r["ttft_s"], "preprocess_s": prep, "prompt_tokens": len(req.prompt_ids),
            "peak_gpu_gib": peak / 2**30,
            "kv_pool_gib": pool_bytes / 2**30,
            "peak_working_set_gib": (peak - pool_bytes + used) / 2**30,
            "weights_gib": sum(p.numel() * p.element_size()
                               for p in itertools.chain(engine.model.parameters(), engine.model.buffers())) / 2**30,
        }
        print(json.dumps(res[f"video_{seconds}s_with_audio"]), flush=True)
    return res


def bench_thinktalk(args) -> dict:
    cfg = reference_config()
    t = time.perf_counter()
    model = build_model(cfg, "cuda", torch.bfloat16, with_talker=False)
    randomize_(model, 0)
    if args.quantization:  # module by module, in place (weights/quant.py's policy)
        from thinktalk.weights.quant import quantize_model_

        quantize_model_(model, args.quantization)
        gc.collect()
        torch.cuda.empty_cache()
    sync()
    res = {"build_s": time.perf_counter() - t, "weights_gib": torch.cuda.memory_allocated() / 2**30,
           "quantization": args.quantization}
    econf = EngineConfig(**json.loads(args.engine_config))
    engine = Engine(model, eos_token_ids=[], config=econf)
    run_engine(engine, [text_request(64, 8)])  # warm-up (kernels, graphs)
    for n in (512, 4096):
        # the first prompt of a new length compiles Triton kernels for it: report the second
        # (prefix caching is avoided by a different seed)
        cold = run_engine(engine, [text_request(n, 1, seed=n)])
        r = run_engine(engine, [text_request(n, 1, seed=n + 1)])
        res[f"ttft_{n}_ms"] = r["ttft_s"] * 1000
        res[f"ttft_{n}_first_call_ms"] = cold["ttft_s"] * 1000
    r = run_engine(engine, [text_request(128, args.decode_len)])
    res["decode_1"] = {"ms_per_token": 1000 / r["decode_tok_s"], "tok_s": r["decode_tok_s"]}
    res["decode_aggregate"] = {}
    for c in args.concurrency:
        r = run_engine(engine, [text_request(512, 256, seed=i) for i in range(c)])
        res["decode_aggregate"][str(c)] = {"tok_s": r["decode_tok_s"], "total_s": r["total_s"]}
        print(json.dumps({c: res["decode_aggregate"][str(c)]}), flush=True)
    if args.video_seconds is not None:
        res.update(bench_multimodal(engine, cfg, args))
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def bench_transformers(args) -> dict:
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    cfg = Qwen3OmniMoeConfig(**json.loads(Path(reference_config_path()).read_text())).thinker_config
    t = time.perf_counter()
    with torch.device("cuda"):
        model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    sync()
    res = {"build_s": time.perf_counter() - t}

    def gen(n_prompt, n_out, batch=1):
        ids = torch.randint(1000, 100000, (batch, n_prompt), device="cuda")
        sync()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                       min_new_tokens=n_out, do_sample=False)
        sync()
        return time.perf_counter() - t0

    gen(64, 4)
    for n in (512, 4096):
        res[f"ttft_{n}_ms"] = gen(n, 1) * 1000
    t1, t2 = gen(128, 1), gen(128, 1 + args.hf_decode_len)
    res["decode_1"] = {"ms_per_token": (t2 - t1) / args.hf_decode_len * 1000, "tok_s": args.hf_decode_len / (t2 - t1)}
    res["decode_aggregate"] = {}
    for c in args.hf_concurrency:
        t1, t2 = gen(512, 1, c), gen(512, 1 + args.hf_decode_len, c)
        res["decode_aggregate"][str(c)] = {"tok_s": c * args.hf_decode_len / (t2 - t1)}
        print(json.dumps({"hf": c, **res["decode_aggregate"][str(c)]}), flush=True)
    return res


def reference_config_path() -> Path:
    return Path(__file__).resolve().parents[1] / "thinktalk" / "assets" / "qwen3_omni" / "config_instruct.json"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine-config", default="{}", help="JSON of EngineConfig fields")
    ap.add_argument("--decode-len", type=int, default=256)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[8, 32, 64, 128])
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--video-seconds", type=int, nargs="*", default=[60, 120], help="omit the flag's values to skip")
    ap.add_argument("--hf-decode-len", type=int, default=32)
    ap.add_argument("--hf-concurrency", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--quantization", default=None, help="quantize thinktalk's weights after building: fp8 | int8 | int4 ...")
    ap.add_argument("--moe-decode-tiles", default=None,
                    help="JSON of the fused MoE's decode-regime tiles (kernels/fused_moe.DECODE_TILES: gate_up's "
                         "BLOCK_N, BLOCK_K, num_warps, num_stages, the down's *_D), e.g. a tune_fused_moe.py --wide "
                         "or --down result tried in the engine before it goes into the code")
    ap.add_argument("--plain-norm-gemv-tiles", action="store_true",
                    help="the norm-folded GEMVs with the plain GEMV's tiles (kernels/gemv.gemv_config), not "
                         "norm_gemv_config's own one-row tiles: the A/B of those")
    args = ap.parse_args()
    if args.plain_norm_gemv_tiles:
        from thinktalk.kernels import gemv, norm_gemv

        norm_gemv.norm_gemv_config = gemv.gemv_config
    if args.moe_decode_tiles:
        from thinktalk.kernels import fused_moe

        fused_moe.DECODE_TILES.update(json.loads(args.moe_decode_tiles))
    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": "Qwen3-Omni-30B-A3B thinker, full-size random weights, "
                 + (f"bf16 quantized to {args.quantization} (thinktalk only)" if args.quantization else "bf16"),
    }
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    def save():  # after each part, so a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["thinktalk"] = bench_thinktalk(args)
    print(json.dumps(result["thinktalk"], indent=1), flush=True)
    save()
    if not args.skip_transformers:
        import transformers

        result["versions"]["transformers"] = transformers.__version__
        try:
            result["transformers"] = bench_transformers(args)
        except Exception as exc:  # noqa: BLE001 - keep our figures when the comparison fails
            result["transformers"] = {"error": repr(exc)}
        save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
