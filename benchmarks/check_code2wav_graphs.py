"""GPU check: code2wav eager vs replayed as CUDA graphs (thinktalk/code2wav_graphs.py).

    python benchmarks/check_code2wav_graphs.py [--out benchmarks/results/code2wav_graphs_h100.json]

Full-size code2wav (the real config) with random weights, bf16 on CUDA, nothing else loaded.

"rows": the conv stack alone. For B = 1 and 8 rows of a 60-frame window (a 50-frame chunk + 10
frames of history, the schedule's largest conv shape): milliseconds per `wav_from_hidden` call
eagerly and through the graph runner (input copy, replay, output copy), the max abs difference
between the two outputs (the output conv is scaled so the waveform is rarely clamped), the
capture time and the graph pool's memory.

"transformer": the transformer alone, for a 50-frame chunk: `hidden_from_codes` over the
568 + 50 codes of a steady-state decode, eagerly, vs `Code2WavTransformerGraphs` with a full
history (kept 568) and with none (kept 0: 568 masked dummy frames; the same replay), their max
abs differences from eager, capture time and pool memory.

"stream": whole `Code2WavStream`s over the same codes, B = 1 and 8 rows (batched streams, as a
group decoded together), schedule 4, 8, 16, 32, 50: eager, conv stack graphed, and fully graphed
(transformer + conv stack), run until the transformer's history is full (568 frames), then
`--iters` steady-state 50-frame decodes (`push` of 50 frames: append, transformer, conv stack)
timed: "<variant>_ms" per decode, and the max abs difference of each variant's PCM from the
eager stream's over the whole stream ("<variant>_pcm_max_abs_diff") and over the timed decodes
only ("..._steady"). This is the per-decode figure the speech stage pays.

`--device cpu --tiny --iters 1` runs the same script on the tiny config without a GPU (the runners
then run their static buffers eagerly: a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.code2wav_graphs import Code2WavGraphs, Code2WavTransformerGraphs, stream_conv_frames  # noqa: E402
from thinktalk.config import config_from_dict, reference_config  # noqa: E402
from thinktalk.models.code2wav import Code2Wav, Code2WavStream  # noqa: E402
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
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms per shape")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
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

    res: dict = {"cudnn_benchmark": args.cudnn_benchmark,
                 "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
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

    # the transformer alone: a steady-state 50-frame chunk (full history), and the first (none)
    ctx, chunk = model.transformer_context_frames, 50
    tf = Code2WavTransformerGraphs(model, max_batch=max(args.rows), mempool=runner.mempool)
    res["transformer"] = {}
    for rows in sorted(args.rows, reverse=True):
        codes = torch.randint(0, model.config.codebook_size, (rows, model.num_quantizers, ctx + chunk), device=dev)
        offset = 1000
        eager_ms = ms_per_call(lambda: model.hidden_from_codes(codes, offset)[:, ctx:], args.iters, dev)
        sync(dev)
        before = reserved(dev)
        t = time.perf_counter()
        tf.capture([(tf.bucket(rows), chunk)])
        sync(dev)
        capture_s = time.perf_counter() - t
        graph_ms = ms_per_call(lambda: tf(codes, ctx, offset), args.iters, dev)
        eager = model.hidden_from_codes(codes, offset)[:, ctx:].float()
        first = codes[..., ctx:]  # the same chunk with no history: kept 0, all of it padding
        res["transformer"][rows] = {
            "eager_ms": round(eager_ms, 3), "graph_ms": round(graph_ms, 3),
            "max_abs_diff_full_history": (tf(codes, ctx, offset).float() - eager).abs().max().item(),
            "max_abs_diff_no_history": (tf(first, 0, offset + ctx).float()
                                        - model.hidden_from_codes(first, offset + ctx).float()).abs().max().item(),
            "max_abs_eager": eager.abs().max().item(),
            "capture_s": round(capture_s, 3),
            "reserved_by_capture_gib": round((reserved(dev) - before) / GIB, 3),
        }

    # whole streams: eager, conv graphed, all graphed; steady-state 50-frame decodes timed
    schedule = (4, 8, 16, 32, 50)
    conv_frames = stream_conv_frames(schedule, model.conv_context_frames)
    runner.capture([(runner.bucket(r), t) for r in args.rows for t in conv_frames])
    tf.capture([(tf.bucket(r), n) for r in args.rows for n in schedule])
    warm_chunks = list(schedule[:-1])
    while sum(warm_chunks) < ctx + chunk:  # until the history is full (and one decode more)
        warm_chunks.append(chunk)
    warm_chunks += [chunk] * 2  # two untimed steady-state decodes
    res["stream"] = {"warmup_frames": sum(warm_chunks)}
    for rows in sorted(args.rows, reverse=True):
        total = sum(warm_chunks) + chunk * args.iters
        codes = torch.randint(0, model.config.codebook_size, (rows, model.num_quantizers, total), device=dev)
        variants = {
            "eager": dict(),
            "conv_graphed": dict(conv_runner=runner),
            "graphed": dict(conv_runner=runner, transformer_runner=tf),
        }
        pcm: dict[str, list[torch.Tensor]] = {}
        out: dict = {}
        for name, kw in variants.items():
            stream = Code2WavStream(model, schedule, **kw)
            pieces, at = [], 0
            for n in warm_chunks:
                pieces.append(stream.push(codes[..., at : at + n]))
                at += n
            sync(dev)
            t = time.perf_counter()
            for _ in range(args.iters):
                pieces.append(stream.push(codes[..., at : at + chunk]))
                at += chunk
            sync(dev)
            out[f"{name}_ms"] = round((time.perf_counter() - t) / args.iters * 1e3, 3)
            assert all(p is not None for p in pieces)
            pcm[name] = pieces
        steady = len(warm_chunks)
        whole = {k: torch.cat(v, dim=-1).float() for k, v in pcm.items()}
        for name in ("conv_graphed", "graphed"):
            out[f"{name}_pcm_max_abs_diff"] = (whole[name] - whole["eager"]).abs().max().item()
            out[f"{name}_pcm_max_abs_diff_steady"] = max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(pcm[name][steady:], pcm["eager"][steady:]))
        out["clamped_fraction"] = (whole["eager"].abs() >= 1).float().mean().item()
        res["stream"][rows] = out
    assert runner.counts["eager"] == 0 and tf.counts["eager"] == 0, (runner.counts, tf.counts)
    res["graphed"] = runner.use_graphs and tf.use_graphs  # False: a capture failed (see the warning)
    # captured shapes, "bucket x frames" (conv stack) and "bucket x chunk frames" (transformer)
    res["graphs"] = {name: [f"{b}x{t}" for b, t in r.captured] for name, r in (("conv", runner), ("transformer", tf))}
    if dev.type == "cuda":  # weights + the eager runs' peak + the graph pool
        res["max_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 3)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
