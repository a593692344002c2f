"""Where the time of one spoken frame goes: torch profiler over speech-stage steps mid-answer.

    python benchmarks/profile_speech.py --out benchmarks/results/profile_speech_h200.txt [--concurrency 1 32]

Full-size random weights (thinker + talker + code2wav), bf16, the CUDA-graph speech backend. For
each concurrency c, c spoken requests run until every one is speaking, then `--steps` engine +
stage steps are profiled: GPU kernels by total time, and how many kernels a step launches.
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

from bench_speech import spoken_request  # noqa: E402

from thinktalk.config import reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.speech_stage import SpeechStage  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.tiny import randomize_  # noqa: E402


def kernel_table(prof, steps: int, rows: int = 30) -> list[str]:
    """GPU kernels by total time: µs per step, calls per step, µs per call."""
    stats = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t <= 0 or evt.key.startswith("aten::"):
            continue
        stats[evt.key] = (t, evt.count)
    total = sum(t for t, _ in stats.values())
    lines = [f"GPU total {total / steps / 1000:.3f} ms per step, {sum(c for _, c in stats.values()) / steps:.0f} kernels per step"]
    for name, (t, c) in sorted(stats.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{t / steps:9.1f} us/step {c / steps:7.1f} calls/step {t / c:8.2f} us/call  {name[:90]}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--engine-config", default="{}")
    args = ap.parse_args()
    cfg = reference_config()
    model = randomize_(build_model(cfg, "cuda", torch.bfloat16), 0)
    stage = SpeechStage(model, cfg, [cfg.get("im_end_token_id", 151645)], backend="graphs",
                        max_active=max(args.concurrency), profile=False)
    stage.warmup(list(args.concurrency))
    engine = Engine(model, eos_token_ids=[], config=EngineConfig(**json.loads(args.engine_config)),
                    capture_layer=cfg.talker_config.accept_hidden_layer)
    lines = []
    for c in args.concurrency:
        for warm in (True, False):  # the first round compiles shapes and captures graphs
            reqs = [spoken_request(cfg, 100, 400, 400, seed=i) for i in range(c)]
            for r in reqs:
                engine.add_request(r)
                stage.add(r, ignore_eos=True)
            for _ in range(60):  # prefill, talker start, first chunks
                engine.step()
                stage.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = args.steps
            if warm:
                for _ in range(n):
                    engine.step()
                    stage.step()
            else:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        engine.step()
                        stage.step()
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n * 1000
            for r in reqs:
                engine.abort(r.request_id)
                stage.cancel(r.request_id)
            while stage.has_work():
                stage.step()
            for r in reqs:
                stage.pop(r.request_id)
        lines.append(f"=== {c} speaking (thinker decoding too): {wall:.2f} ms per engine+stage step (wall, profiled)")
        lines += kernel_table(prof, n)
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
