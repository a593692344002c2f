"""Streaming speech benchmark: thinker + speech stage (talker, code predictor, code2wav) on one GPU.

    python benchmarks/bench_speech.py --out benchmarks/results/speech_h200.json [--skip-transformers]
        [--compile-predictor] [--engine-config '{"kv_backend": "paged", "moe_kernel": "triton"}']

About 2 minutes on an H200 with the defaults (transformers included); --compile-predictor adds
80-150 s of torch.compile per batch-size bucket (use it with one or two --concurrency values).

Full-size Qwen3-Omni-30B-A3B with random bf16 weights (`build_model(reference_config())` +
`randomize_`). Random weights never stop by themselves, so lengths are forced: the thinker ignores
eos and writes --answer-tokens tokens, the talker ignores codec_eos and speaks --frames frames
(125 = 10 s of speech). Greedy everywhere. The engine loop is the server's: engine.step() then
speech_stage.step().

Figures
  check                     tiny float32 model on the GPU: codes of the paged backends equal the
                            reference (contiguous) backend's, three concurrent requests: "paged"
                            (paged talker KV, eager steps), "graphs" (paged KV, graphed talker
                            decode and predictor), and "graphs" on a pool too small for the three at
                            once (requests wait for blocks, maybe one is preempted and recomputed);
                            every talker KV block is free again at the end
  c1.first_audio_ms         request -> first PCM chunk on the host, 100-token text prompt
  c1.rtf                    wall time request -> last chunk / seconds of audio (10 s)
  c1.rtf_speech             talker + code predictor + code2wav time / seconds of audio
  c1.split_s                thinker / talker / code predictor / code2wav / other (stage bookkeeping)
                            seconds, from CUDA events around each phase
  c{8,16,32}                c concurrent spoken answers: first audio p50/p90, per-request RTF p50/p90,
                            aggregate audio seconds per wall second, playback underruns (a chunk that
                            arrives after the audio before it has played out)
  transformers.c1           Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True), same
                            prompt, forced lengths --hf-answer-tokens / --hf-frames (smaller by default:
                            its per-frame code-predictor generate() is slow); not streaming, so its
                            first audio is its total time
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinktalk.config import config_from_dict, reference_config  # noqa: E402
from thinktalk.engine import Engine, EngineConfig  # noqa: E402
from thinktalk.request import Request, SamplingParams  # noqa: E402
from thinktalk.speech_stage import SAMPLE_RATE, SpeechStage  # noqa: E402
from thinktalk.weights.loader import build_model  # noqa: E402
from thinktalk.weights.tiny import randomize_  # noqa: E402

FRAME_RATE = 12.5  # codec frames per second of speech


def sync():
    torch.cuda.synchronize()


def prompt_ids(cfg, n: int, seed: int) -> list[int]:
    """A user turn of random text tokens, then '<|im_start|>assistant\\n': n tokens in all."""
    head = [cfg.im_start_token_id, cfg.user_token_id, 198]
    tail = [cfg.get("im_end_token_id", 151645), 198, cfg.im_start_token_id, cfg.assistant_token_id, 198]
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(1000, 100000, (n - len(head) - len(tail),), generator=g).tolist()
    return head + body + tail


def spoken_request(cfg, n_prompt: int, n_answer: int, frames: int, seed: int, speaker: str = "Ethan") -> Request:
    ids = prompt_ids(cfg, n_prompt, seed)
    req = Request(prompt_ids=ids, positions=torch.arange(len(ids))[None].expand(3, -1).clone(), rope_delta=0,
                  sampling=SamplingParams(temperature=0.0, max_new_tokens=n_answer), speaker=speaker)
    req.speech_max_frames = frames
    return req


class Timer:
    """CUDA-event spans around engine steps (read once at the end)."""

    def __init__(self):
        self.spans = []

    def start(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, ev):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.spans.append((ev, end))

    def total(self) -> float:
        sync()
        return sum(a.elapsed_time(b) for a, b in self.spans) / 1000


def run_spoken(engine, stage, reqs, timer: Timer | None = None) -> dict:
    """Drive thinker + stage until every request has spoken; per-request timings."""
    t_add, arrivals = {}, {r.request_id: [] for r in reqs}
    sync()
    t0 = time.perf_counter()
    for r in reqs:
        t_add[r.request_id] = time.perf_counter()
        engine.add_request(r)
        stage.add(r, ignore_eos=True)
    first_token = {}
    steps = 0
    while engine.has_work() or stage.has_work():
        if engine.has_work():
            ev = timer.start() if timer else None
            engine.step()
            if timer:
                timer.stop(ev)
        for chunk in stage.step():
            if chunk.pcm.size:
                arrivals[chunk.request_id].append((time.perf_counter(), chunk.pcm.size))
        for r in reqs:
            if r.output_ids and r.request_id not in first_token:
                first_token[r.request_id] = time.perf_counter()
        steps += 1
    wall = time.perf_counter() - t0
    per = []
    for r in reqs:
        job = stage.pop(r.request_id)
        got = arrivals[r.request_id]
        samples = sum(n for _, n in got)
        audio_s = samples / SAMPLE_RATE
        start = t_add[r.request_id]
        first = got[0][0] - start if got else float("nan")
        last = got[-1][0] - start if got else float("nan")
        # playback from the first chunk on: an underrun is a chunk that arrives after what came before it has played
        played, underruns, worst = 0.0, 0, 0.0
        for t, n in got:
            due = got[0][0] + played
            if t > due + 1e-3:
                underruns += 1
                worst = max(worst, t - due)
            played += n / SAMPLE_RATE
        per.append(dict(first_audio_s=first, last_chunk_s=last, audio_s=audio_s, frames=len(job.frames),
                        rtf=last / audio_s if audio_s else float("nan"), underruns=underruns, worst_gap_s=worst,
                        ttft_s=first_token.get(r.request_id, float("nan")) - start, chunks=len(got)))
    return dict(wall_s=wall, steps=steps, per_request=per)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=float), q))


# -- correctness of the GPU backends ------------------------------------------------------------
CHECK_RUNS = (  # (name, backend, SpeechStage options); "graphs" runs last: it switches the talker to Triton kernels
    ("contiguous", "contiguous", {}),
    ("paged", "paged", {}),
    ("graphs", "graphs", {}),
    # the three need ~15 blocks of 16 tokens at once, each alone at most 6: on the CPU this pool makes
    # them wait 11 times and preempts one
    ("graphs_small_pool", "graphs", {"talker_kv_blocks": 7}),
)


def check_graphs(args, device: str = "cuda") -> dict:
    """Tiny float32 model: the paged backends' codes equal the reference contiguous backend's."""
    from thinktalk.weights.tiny_config import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict("instruct"))
    model = randomize_(build_model(cfg, device, torch.float32), 3)
    codes, out = {}, {}
    for name, backend, options in CHECK_RUNS:
        engine = Engine(model, eos_token_ids=[], capture_layer=cfg.talker_config.accept_hidden_layer)
        stage = SpeechStage(model, cfg, [cfg.get("im_end_token_id", 151645)], backend=backend, **options)
        reqs = [spoken_request(cfg, 30 + 7 * i, 10 + 5 * i, 20 + 10 * i, seed=i) for i in range(3)]
        jobs = []
        for r in reqs:
            engine.add_request(r)
            jobs.append(stage.add(r, ignore_eos=True))
        while engine.has_work() or stage.has_work():
            engine.step()
            stage.step()
        codes[name] = [j.codes().cpu() for j in jobs]
        if name == "contiguous":
            continue
        ref = codes["contiguous"]
        bm = stage.runner.block_manager
        steps = stage.runner.steps
        out[name] = {
            "codes_equal_reference": all(torch.equal(a, b) for a, b in zip(ref, codes[name])),
            "first_mismatch_frame": [int((a != b).any(0).float().argmax()) if a.shape == b.shape and not torch.equal(a, b)
                                     else (None if a.shape == b.shape else "length") for a, b in zip(ref, codes[name])],
            "frames": [c.shape[1] for c in codes[name]],
            "blocks_all_free": bm.num_free_blocks == bm.num_blocks, "num_blocks": bm.num_blocks,
            "kv_waits": stage.counts["kv_waits"], "preemptions": stage.counts["preemptions"],
            "decode_graphs": sorted(steps.graphs) if steps is not None else None,
        }
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    out["graphs_codes_equal_reference"] = all(v["codes_equal_reference"] for v in out.values())
    return out


# -- thinktalk ------------------------------------------------------------------------------------
def bench_thinktalk(args) -> dict:
    cfg = reference_config()
    t = time.perf_counter()
    model = randomize_(build_model(cfg, "cuda", torch.bfloat16), 0)
    sync()
    res = {"build_s": time.perf_counter() - t, "weights_gib": torch.cuda.memory_allocated() / 2**30}
    econf = json.loads(args.engine_config)
    layer = cfg.talker_config.accept_hidden_layer
    stage = SpeechStage(model, cfg, [cfg.get("im_end_token_id", 151645)], backend=args.backend,
                        max_active=max(64, max(args.concurrency, default=1)), profile=True,
                        compile_predictor=args.compile_predictor, talker_kv_gib=args.talker_kv_gib)
    res["compile_predictor"] = args.compile_predictor
    res["speech_backend"] = stage.backend_name
    bm = getattr(stage.runner, "block_manager", None)
    if bm is not None:
        res["talker_kv"] = {"blocks": bm.num_blocks, "block_size": bm.block_size,
                            "gib": sum(t.numel() * t.element_size() for t in stage.runner.pool.k + stage.runner.pool.v) / 2**30}

    def warm_up(engine):  # kernels, Triton compiles, CUDA graphs of the batch sizes used below
        for c in [1] + list(args.concurrency):
            run_spoken(engine, stage, [spoken_request(cfg, args.prompt_tokens, 6, 6, seed=1000 + i) for i in range(c)])

    t = time.perf_counter()
    stage.warmup([1] + list(args.concurrency))  # CUDA graphs, code2wav chunk shapes
    sync()
    res["stage_warmup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        engine = Engine(model, eos_token_ids=[], config=EngineConfig(**econf), capture_layer=layer)
        warm_up(engine)
    except Exception as exc:  # noqa: BLE001 - fall back to the reference engine, and say so
        print(f"engine config {econf} failed ({exc!r}); using the contiguous engine", flush=True)
        res["engine_config_failed"] = {"config": econf, "error": repr(exc)}
        econf = {"moe_kernel": "triton"}
        engine = None
        for job in list(stage.jobs):
            stage.cancel(job)
        stage.step()
        stage.finished.clear()
        engine = Engine(model, eos_token_ids=[], config=EngineConfig(**econf), capture_layer=layer)
        warm_up(engine)
    res["engine_config"] = econf
    sync()
    res["warmup_s"] = time.perf_counter() - t
    print(json.dumps({"warmup_s": res["warmup_s"]}), flush=True)

    # c = 1: first audio and real-time factor
    stage.collect_times()
    stage.times = {k: 0.0 for k in stage.times}
    timer = Timer()
    r = run_spoken(engine, stage, [spoken_request(cfg, args.prompt_tokens, args.answer_tokens, args.frames, seed=1)],
                   timer)
    times = stage.collect_times()
    one = r["per_request"][0]
    thinker_s = timer.total()
    speech_s = times["talker"] + times["predictor"] + times["code2wav"]
    res["c1"] = {
        "prompt_tokens": args.prompt_tokens, "answer_tokens": args.answer_tokens, "frames": one["frames"],
        "audio_s": one["audio_s"], "first_audio_ms": one["first_audio_s"] * 1000, "ttft_ms": one["ttft_s"] * 1000,
        "total_s": one["last_chunk_s"], "rtf": one["rtf"], "rtf_speech": speech_s / one["audio_s"],
        "split_s": {"thinker": thinker_s, **times}, "steps": r["steps"], "chunks": one["chunks"],
        "underruns": one["underruns"],
        "ms_per_frame": {k: 1000 * v / max(one["frames"], 1) for k, v in times.items()},
    }
    print(json.dumps({"c1": res["c1"]}), flush=True)

    # c concurrent spoken answers
    for c in args.concurrency:
        stage.collect_times()
        stage.times = {k: 0.0 for k in stage.times}
        timer = Timer()
        reqs = [spoken_request(cfg, args.prompt_tokens, args.answer_tokens, args.frames, seed=100 + i) for i in range(c)]
        counts = dict(stage.counts)
        r = run_spoken(engine, stage, reqs, timer)
        times = stage.collect_times()
        per = r["per_request"]
        audio = sum(p["audio_s"] for p in per)
        res[f"c{c}"] = {
            "talker_kv_waits": stage.counts["kv_waits"] - counts["kv_waits"],
            "talker_preemptions": stage.counts["preemptions"] - counts["preemptions"],
            "first_audio_ms_p50": pct([p["first_audio_s"] * 1000 for p in per], 50),
            "first_audio_ms_p90": pct([p["first_audio_s"] * 1000 for p in per], 90),
            "rtf_p50": pct([p["rtf"] for p in per], 50), "rtf_p90": pct([p["rtf"] for p in per], 90),
            "aggregate_rtf": r["wall_s"] / audio, "audio_s_per_s": audio / r["wall_s"], "wall_s": r["wall_s"],
            "underruns_total": sum(p["underruns"] for p in per),
            "worst_gap_ms": 1000 * max(p["worst_gap_s"] for p in per),
            "split_s": {"thinker": timer.total(), **times}, "steps": r["steps"],
        }
        print(json.dumps({f"c{c}": res[f"c{c}"]}), flush=True)
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del engine, stage, model
    gc.collect()
    torch.cuda.empty_cache()
    return res


# -- transformers ---------------------------------------------------------------------------------
def bench_transformers(args) -> dict:
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    cfg_path = Path(__file__).resolve().parents[1] / "thinktalk" / "assets" / "qwen3_omni" / "config_instruct.json"
    hf_cfg = Qwen3OmniMoeConfig(**json.loads(cfg_path.read_text()))
    t = time.perf_counter()
    with torch.device("cuda"):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    randomize_(model, 0)  # its own init leaves experts uninitialised
    sync()
    res = {"build_s": time.perf_counter() - t, "answer_tokens": args.hf_answer_tokens, "frames": args.hf_frames}
    spans = {"thinker": 0.0, "talker": 0.0, "code_predictor": 0.0, "code2wav": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spans[name] += time.perf_counter() - t0
            return out
        return wrapper

    model.thinker.generate = timed("thinker", model.thinker.generate)
    model.talker.generate = timed("talker", model.talker.generate)
    model.talker.code_predictor.generate = timed("code_predictor", model.talker.code_predictor.generate)
    model.code2wav.chunked_decode = timed("code2wav", model.code2wav.chunked_decode)
    ref = reference_config()

    def gen(n_answer, frames):
        ids = torch.tensor([prompt_ids(ref, args.prompt_tokens, 1)], device="cuda")
        for k in spans:
            spans[k] = 0.0
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            _, wav = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), speaker="Ethan", return_audio=True,
                thinker_max_new_tokens=n_answer, thinker_min_new_tokens=n_answer, thinker_do_sample=False,
                talker_do_sample=False, talker_max_new_tokens=frames + 1, talker_min_new_tokens=frames + 1,
            )
        sync()
        return time.perf_counter() - t0, wav

    gen(4, 4)  # warm-up
    total, wav = gen(args.hf_answer_tokens, args.hf_frames)
    audio_s = wav.numel() / SAMPLE_RATE
    talker_only = spans["talker"] - spans["code_predictor"]
    res["c1"] = {
        "total_s": total, "first_audio_ms": total * 1000, "audio_s": audio_s, "rtf": total / audio_s,
        "rtf_speech": (spans["talker"] + spans["code2wav"]) / audio_s,
        "split_s": {"thinker": spans["thinker"], "talker": talker_only, "predictor": spans["code_predictor"],
                    "code2wav": spans["code2wav"]},
        "ms_per_frame": {"talker": 1000 * talker_only / args.hf_frames,
                         "predictor": 1000 * spans["code_predictor"] / args.hf_frames},
    }
    print(json.dumps({"transformers": res["c1"]}), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine-config", default='{"kv_backend": "paged", "moe_kernel": "triton"}',
                    help="JSON of EngineConfig fields (falls back to the contiguous engine if it fails)")
    ap.add_argument("--backend", default="graphs", help="speech backend: graphs | paged | contiguous")
    ap.add_argument("--talker-kv-gib", type=float, default=None,
                    help="talker KV pool size (default: 2,048 tokens per request of max_active)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--answer-tokens", type=int, default=40)
    ap.add_argument("--frames", type=int, default=125, help="codec frames per answer (12.5 per second)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--compile-predictor", action="store_true", help="torch.compile the code predictor's frame loop")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--hf-answer-tokens", type=int, default=20)
    ap.add_argument("--hf-frames", type=int, default=40)
    args = ap.parse_args()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "versions": versions,
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": "Qwen3-Omni-30B-A3B (thinker + talker + code2wav), full-size random weights, bf16",
        "forced": {"prompt_tokens": args.prompt_tokens, "answer_tokens": args.answer_tokens, "frames": args.frames,
                   "audio_s": args.frames / FRAME_RATE},
    }
    t0 = time.perf_counter()

    def save():
        result["elapsed_s"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    if not args.skip_check:
        result["check"] = check_graphs(args)
        print(json.dumps({"check": result["check"]}), flush=True)
        save()
    result["thinktalk"] = bench_thinktalk(args)
    save()
    if not args.skip_transformers:
        try:
            result["transformers"] = bench_transformers(args)
        except Exception as exc:  # noqa: BLE001 - keep our figures when the comparison fails
            result["transformers"] = {"error": repr(exc)}
        save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
