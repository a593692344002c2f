"""GPU check: code2wav's conv stack eager vs replayed as a CUDA graph (thinktalk/code2wav_graphs.py).

    python benchmarks/check_code2wav_graphs.py [--out benchmarks/results/code2wav_graphs_h100.json]

Full-size code2wav (the real config) with random weights, bf16 on CUDA, nothing else loaded. For
B = 1 and 8 rows of a 60-frame window (a 50-frame chunk + 10 frames of history, the schedule's
largest conv shape): milliseconds per `wav_from_hidden` call eagerly and through the graph runner
(input copy, replay, output copy), the max abs difference between the two outputs (the output
conv is scaled so the waveform is rarely clamped), the capture time and the graph pool's memory.
Then one steady-state streaming decode of a 50-frame chunk (the transformer over 568 + 50 codes,
always eager, then the stack) with the stack eager and graphed: the per-decode figure the speech
stage pays. Prints one JSON object.

`--device cpu --tiny --iters 1` runs the same script on the tiny config without a GPU (the runner
then runs its static buffers eagerly: a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.code2wav_graphs import Code2WavGraphs  # noqa: E402
from thinktalk.config import config_from_dict, reference_config  # noqa: E402
from thinktalk.models.code2wav import Code2Wav  # noqa: E402
from thinktalk.weights.loader import default_dtype  # noqa: E402
from thinktalk.weights.tiny import randomize_  # noqa: E402
from thinktalk.weights.tiny_config import tiny_config_dict  # noqa: E402

GIB = 2**30


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ms_per_call(fn, iters: int, dev: torch.device) -> float:
    for _ in range(3):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / iters * 1e3


def reserved(dev: torch.device) -> int:
    return torch.cuda.memory_reserved(dev) if dev.type == "cuda" else 0


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test config (a smoke test on the CPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = config_from_dict(tiny_config_dict()) if args.tiny else reference_config()
    with torch.device(dev), default_dtype(dtype):  # as the loader builds it (rotary table in fp32)
        model = randomize_(Code2Wav(cfg.code2wav_config).eval(), 0)
    hidden_size = model.code_embedding.weight.shape[1]
    # scale the output conv so the pre-clamp waveform has std ~0.3 (a clamped output hides differences)
    seen = {}
    hook = model.decoder[-1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model.wav_from_hidden(torch.randn(1, 12, hidden_size, device=dev, dtype=dtype))
    hook.remove()
    scale = 0.3 / seen["out"].float().std()
    model.decoder[-1].conv.weight.mul_(scale)
    model.decoder[-1].conv.bias.mul_(scale)

    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
                 "frames": args.frames, "samples": args.frames * model.total_upsample - model.lookahead_samples,
                 "rows": {}}
    runner = Code2WavGraphs(model, max_batch=max(args.rows))
    for rows in sorted(args.rows, reverse=True):  # largest first: the smaller graphs share its pool
        hidden = torch.randn(rows, args.frames, hidden_size, device=dev, dtype=dtype)
        eager_ms = ms_per_call(lambda: model.wav_from_hidden(hidden), args.iters, dev)
        sync(dev)
        before = reserved(dev)
        t = time.perf_counter()
        runner.capture([(runner.bucket(rows), args.frames)])
        sync(dev)
        capture_s = time.perf_counter() - t
        graph_ms = ms_per_call(lambda: runner(hidden), args.iters, dev)
        eager, graphed = model.wav_from_hidden(hidden).float(), runner(hidden).float()
        res["rows"][rows] = {
            "eager_ms": round(eager_ms, 3), "graph_ms": round(graph_ms, 3),
            "max_abs_diff": (eager - graphed).abs().max().item(),
            "clamped_fraction": (eager.abs() >= 1).float().mean().item(),
            "capture_s": round(capture_s, 3),
            "reserved_by_capture_gib": round((reserved(dev) - before) / GIB, 3),
        }
    assert runner.counts["eager"] == 0, runner.counts
    res["graphed"] = runner.use_graphs  # False: a capture failed (see the warning), all eager

    # one steady-state streaming decode: transformer over history + chunk (eager), then the stack
    ctx, chunk, conv_ctx = model.transformer_context_frames, 50, model.conv_context_frames
    codes = torch.randint(0, model.config.codebook_size, (1, model.num_quantizers, ctx + chunk), device=dev)
    hist = torch.randn(1, conv_ctx, hidden_size, device=dev, dtype=dtype)
    runner.capture([(1, conv_ctx + chunk)])

    def decode(stack):
        h = model.hidden_from_codes(codes, position_offset=1000)[:, ctx:]
        return stack(torch.cat([hist, h], dim=1))

    res["stream_decode_50_frames_b1"] = {
        "transformer_only_ms": round(ms_per_call(lambda: model.hidden_from_codes(codes, 1000), args.iters, dev), 3),
        "eager_stack_ms": round(ms_per_call(lambda: decode(model.wav_from_hidden), args.iters, dev), 3),
        "graphed_stack_ms": round(ms_per_call(lambda: decode(runner), args.iters, dev), 3),
    }
    res["graphs"] = runner.captured
    if dev.type == "cuda":  # weights + the eager runs' peak + the graph pool
        res["max_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 3)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
