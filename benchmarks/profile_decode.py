"""Where thinker time goes: torch profiler over decode steps (and a prefill) of the full-size thinker.

    python benchmarks/profile_decode.py --out benchmarks/results/profile_decode_h200.txt [--batch 1 64] [--prefill 512]
        [--prompt-len 128]

For each decode batch size: wall ms per step, GPU kernels by time per step (with calls per step),
host ops by CPU time. --prefill N adds one N-token text prefill (TTFT's GPU side) the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_thinker import text_request  # noqa: E402
from profile_speech import kernel_table  # noqa: E402

from thinktalk.config import reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.tiny import randomize_  # noqa: E402


def ms_per_call(fn, reps: int) -> float:
    """Wall milliseconds per call of fn over reps calls, the GPU drained before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def graph_replay_ms(engine, batch: int) -> float:
    """GPU time of one decode step without the host: the batch's graph replayed 20 times back to
    back (it rewrites the same KV slots with the same values)."""
    graphs = engine.decode_graphs
    if graphs is None or graphs.bucket(batch) not in graphs.graphs:
        return float("nan")
    graph = graphs.graphs[graphs.bucket(batch)][0]
    graph.replay()
    return ms_per_call(graph.replay, 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine-config", default='{"kv_backend": "paged", "moe_kernel": "triton"}')
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--prefill", type=int, nargs="*", default=[512])
    ap.add_argument("--prompt-len", type=int, default=128,
                    help="prompt tokens of each decoding sequence (bench_thinker's aggregate decode: 512)")
    args = ap.parse_args()
    model = randomize_(build_model(reference_config(), "cuda", torch.bfloat16, with_talker=False), 0)
    t0 = time.perf_counter()
    engine = Engine(model, eos_token_ids=[], config=EngineConfig(**json.loads(args.engine_config)))
    lines = [f"engine start-up (KV sizing, kernel warm-up, CUDA graph capture): {time.perf_counter() - t0:.1f} s"]
    for batch in args.batch:
        reqs = [text_request(args.prompt_len, 64, seed=i) for i in range(batch)]
        for r in reqs:
            engine.add_request(r)
        for _ in range(8):  # prefill and warm-up decodes
            engine.step()
        step_ms = ms_per_call(engine.step, 10)
        replay_ms = graph_replay_ms(engine, batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.step()
            torch.cuda.synchronize()
        for r in reqs:
            engine.abort(r.request_id)
        while engine.has_work():  # an overlapped step may still be in flight: land it
            engine.step()
        lines.append(f"=== batch {batch} ({args.prompt_len}-token prompts): {step_ms:.2f} ms per decode step (wall, 10 steps); its CUDA graph "
                     f"replayed back to back: {replay_ms:.2f} ms (the rest is host time between steps)")
        lines += kernel_table(prof, 5)
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")  # what is measured so far, in case a later part fails
    for n in args.prefill:
        if n + 1 > engine.max_model_len:
            lines.append(f"=== prefill {n} tokens: skipped, the KV cache holds {engine.max_model_len} tokens on this GPU")
            continue
        walls = []
        for i in range(4):  # 3 warm-ups (shapes compile), then a timed and a profiled one
            req = text_request(n, 1, seed=100 + i)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.add_request(req)
            while engine.has_work():
                engine.step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1000)
        req = text_request(n, 1, seed=200)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.add_request(req)
            while engine.has_work():
                engine.step()
            torch.cuda.synchronize()
        lines.append(f"=== prefill {n} tokens (new prompt, 1 output token): {walls[-1]:.2f} ms wall (warm), runs {[round(w, 1) for w in walls]}")
        lines += kernel_table(prof, 1, rows=25)
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
