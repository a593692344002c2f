"""bench serve without a server: prompts, arrivals, metrics, goodput, results, plot, compare."""

from __future__ import annotations

import base64
import io
import json
import math
import random

import numpy as np
import pytest

from thinktalk.bench import report
from thinktalk.bench.data import load_jsonl, synthetic_prompts
from thinktalk.bench.serve import (RequestResult, arrival_gaps, meets_slos, parse_levels, parse_metrics, parse_slos,
                                   summarize)


def test_synthetic_prompts_have_decodable_media():
    import av
    from PIL import Image

    prompts = synthetic_prompts(8, ["text", "image", "audio", "video"], seed=1, image_size=(64, 48),
                                audio_seconds=0.5, video_seconds=1.0, max_tokens=7)
    assert sorted(p.kind for p in prompts) == ["audio"] * 2 + ["image"] * 2 + ["text"] * 2 + ["video"] * 2
    assert all(p.max_tokens == 7 for p in prompts)
    for p in prompts:
        parts = p.messages[0]["content"]
        assert parts[-1]["type"] == "text" and parts[-1]["text"]
        if p.kind == "image":
            raw = base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])
            assert Image.open(io.BytesIO(raw)).size == (64, 48)
        elif p.kind == "audio":
            raw = base64.b64decode(parts[0]["input_audio"]["data"])
            assert raw[:4] == b"RIFF" and parts[0]["input_audio"]["format"] == "wav"
        elif p.kind == "video":
            raw = base64.b64decode(parts[0]["video_url"]["url"].split(",", 1)[1])
            with av.open(io.BytesIO(raw)) as c:
                assert c.streams.video and c.streams.audio
                assert sum(1 for _ in c.decode(video=0)) >= 2
    # seeded: the same prompts again
    again = synthetic_prompts(8, ["text", "image", "audio", "video"], seed=1, image_size=(64, 48),
                              audio_seconds=0.5, video_seconds=1.0, max_tokens=7)
    assert [p.messages for p in again] == [p.messages for p in prompts]
    with pytest.raises(ValueError):
        synthetic_prompts(2, ["smell"])


def test_jsonl_prompts(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text("\n".join([
        json.dumps({"prompt": "hi", "max_tokens": 5}),
        json.dumps({"prompt": "what", "image": "a.png"}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}},
                                                              {"type": "text", "text": "x"}]}]}),
    ]))
    prompts = load_jsonl(tmp_path / "p.jsonl", max_tokens=9)
    assert [p.kind for p in prompts] == ["text", "image", "audio"]
    assert [p.max_tokens for p in prompts] == [5, 9, 9]
    assert prompts[1].messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_poisson_and_bursty_arrivals():
    rng = random.Random(0)
    gaps = arrival_gaps(4000, 8.0, 1.0, rng)
    assert abs(np.mean(gaps) - 1 / 8) < 0.01
    assert abs(np.std(gaps) - 1 / 8) < 0.015  # exponential: std = mean
    bursty = arrival_gaps(4000, 8.0, 0.25, random.Random(0))
    assert abs(np.mean(bursty) - 1 / 8) < 0.02 and np.std(bursty) > 1.5 * np.std(gaps)
    assert arrival_gaps(3, math.inf, 1.0, rng) == [0.0, 0.0, 0.0]


def _req(ttft, tokens, step, speech=False, ok=True, audio=0.0, audio_done=None):
    r = RequestResult("text", speech, ok=ok, error=None if ok else "HTTP 500: x")
    if ok:
        r.ttft = ttft
        r.output_tokens = tokens
        r.itl = [step] * (tokens - 1)
        r.last_token = ttft + step * (tokens - 1)
        r.e2e = r.last_token + 0.01
        r.prompt_tokens = 10
        if speech:
            r.first_audio = ttft + 0.2
            r.audio_seconds = audio
            r.last_audio = audio_done
    return r


def test_metrics_and_goodput():
    results = [_req(0.1, 11, 0.02), _req(0.3, 11, 0.05), _req(0.2, 5, 0.03, speech=True, audio=2.0, audio_done=1.0),
               _req(0, 0, 0, ok=False)]
    assert results[0].tpot == pytest.approx(0.02)
    assert results[2].rtf == pytest.approx(0.5)
    s = summarize(results, 2.0, {"ttft": 250, "tpot": 40})
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["request_throughput"] == 1.5
    assert s["output_throughput"] == pytest.approx(27 / 2)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(298, abs=1)
    assert s["first_audio_ms"]["p50"] == pytest.approx(400.0)
    assert s["rtf"]["p50"] == pytest.approx(0.5)
    assert s["audio_throughput"] == pytest.approx(1.0)
    # in SLO: the first (100 ms, 20 ms/token) and the third (200 ms, 30 ms/token); not the slow one or the failure
    assert s["goodput"] == pytest.approx(1.0) and s["slo_attainment"] == 0.5
    assert s["errors"] == {"HTTP 500: x": 1}
    assert meets_slos(results[2], {"rtf": 0.6}) and not meets_slos(results[2], {"rtf": 0.4})
    assert meets_slos(results[0], {"first_audio": 1})  # no audio asked: the audio SLO does not apply
    assert summarize(results, 2.0, {})["goodput"] is None


def test_parsing_options():
    assert parse_levels("1, 2,inf") == [1.0, 2.0, math.inf]
    with pytest.raises(ValueError):
        parse_levels("0")
    assert parse_slos(["ttft=500", "first-audio=800", "rtf:0.5"]) == {"ttft": 500, "first_audio": 800, "rtf": 0.5}
    with pytest.raises(ValueError):
        parse_slos(["latency=3"])


def test_parse_server_metrics():
    text = "\n".join([
        '# TYPE thinktalk_num_requests_running gauge', 'thinktalk_num_requests_running{model_name="m"} 3.0',
        '# TYPE thinktalk_num_requests_waiting gauge', 'thinktalk_num_requests_waiting{model_name="m"} 7.0',
        '# TYPE thinktalk_gpu_info gauge',
        'thinktalk_gpu_info{gpu="none",name="no GPU",status="no GPU: NVML Shared Library Not Found"} 1.0',
        '# TYPE thinktalk_gpu_memory_used_bytes gauge',
        'thinktalk_gpu_memory_used_bytes{gpu="0",name="H100"} 5.0', 'thinktalk_gpu_memory_used_bytes{gpu="1",name="H100"} 6.0',
    ])
    m = parse_metrics(text)
    assert m["running"] == 3 and m["waiting"] == 7 and m["gpu_memory_used_bytes"] == 11 and m["gpu"] == "no GPU"


def _results(mode="concurrency", scale=1.0, levels=(1, 2, 4)):
    out = {"kind": "thinktalk-bench-serve", "version": 1, "server": {"model": "demo", "url": "http://x", "gpu": "no GPU"},
           "config": {"mode": mode, "num_prompts": 8, "speech_ratio": 0.25}, "levels": []}
    for i, lv in enumerate(levels):
        reqs = [_req(0.05 * (i + 1) * scale, 9, 0.01 * (i + 1) * scale, speech=(k == 0), audio=1.5,
                     audio_done=0.9 * scale) for k in range(8)]
        out["levels"].append({"level": lv, **summarize(reqs, 1.0 + i, {"ttft": 120}), "server": {}})
    return out


@pytest.mark.parametrize("mode,levels", [("concurrency", (1, 2, 4, 16)), ("rate", (0.5, 2, "inf"))])
def test_plot(tmp_path, mode, levels):
    from PIL import Image

    path = report.plot(_results(mode, levels=levels), tmp_path / "plot.png")
    with Image.open(path) as im:
        assert im.size == (1100, 750)
    assert path.stat().st_size < 200_000


def test_compare_directions(tmp_path):
    a, b = _results(), _results(scale=0.5)  # b: everything twice as fast
    (tmp_path / "a.json").write_text(json.dumps(a))
    rows = report.compare(report.load(tmp_path / "a.json"), b)
    ttft = next(r for r in rows if r["level"] == "1" and r["metric"] == "TTFT p50")
    assert ttft["change_pct"] == pytest.approx(-50.0) and ttft["better"] is True
    thr = next(r for r in rows if r["metric"] == "request throughput")
    assert thr["change_pct"] == pytest.approx(0.0) and thr["better"] is None
    worse = report.compare(b, a)
    assert next(r for r in worse if r["metric"] == "TTFT p50")["better"] is False
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120)
    report.print_compare(a, b, "a", "b", console=console)
    report.print_table(a, console=console)
    text = console.file.getvalue()
    assert "-50.0%" in text and "TTFT p50 (ms)" in text
    with pytest.raises(ValueError):
        (tmp_path / "x.json").write_text("{}")
        report.load(tmp_path / "x.json")
