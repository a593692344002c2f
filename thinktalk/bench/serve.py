"""`thinktalk bench serve`: load a running server the way users do and measure what they feel.

Two ways to apply load, each swept over a list of levels:

- `--request-rate 1,2,4,inf`: open loop, arrivals at that mean rate (Poisson, or gamma with
  `--burstiness` < 1 for burstier traffic; inf sends everything at once), optionally capped by
  `--max-concurrency`.
- `--concurrency 1,4,16`: closed loop, that many users each sending the next request as soon as
  their last one finished.

Every request is a streamed chat completion (`stream_options.include_usage`), a `--speech-ratio`
share of them asking for spoken answers (`modalities: ["text", "audio"]`, pcm16). Per request:

- TTFT: send -> first text delta; first audio: send -> first audio delta
- TPOT: (last text delta - first text delta) / (output tokens - 1); ITL: gaps between text deltas
- E2E: send -> end of stream
- RTF (client side): (last audio delta - send) / seconds of audio received; under 1 the speech
  arrives faster than it plays
- goodput: completed requests per second that meet every `--slo` given (ttft, tpot, itl, e2e,
  first_audio in ms; rtf as a ratio)

Each level also samples the server's /metrics (queue, running batch, KV, GPU memory) and keeps
the peaks, so a latency knee can be read against what the server was doing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import BenchPrompt

SAMPLE_RATE = 24000
LATENCY_METRICS = ("ttft", "first_audio", "tpot", "itl", "e2e")  # seconds internally, ms in results
PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "itl", "e2e", "first_audio", "rtf")


@dataclass
class RequestResult:
    kind: str
    speech: bool
    ok: bool = False
    error: str | None = None
    sent_at: float = 0.0  # seconds since the level began
    ttft: float | None = None
    first_audio: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    audio_seconds: float = 0.0
    last_token: float | None = None  # since send
    last_audio: float | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.last_token is None or self.output_tokens < 2:
            return None
        return (self.last_token - self.ttft) / (self.output_tokens - 1)

    @property
    def rtf(self) -> float | None:
        if self.last_audio is None or self.audio_seconds <= 0:
            return None
        return self.last_audio / self.audio_seconds


@dataclass
class BenchConfig:
    url: str
    model: str | None = None
    api_key: str | None = None
    mode: str = "concurrency"  # or "rate"
    levels: list[float] = field(default_factory=lambda: [1.0])
    num_prompts: int = 32  # per level
    max_concurrency: int | None = None  # rate mode cap
    burstiness: float = 1.0
    speech_ratio: float = 0.0
    voice: str = "Ethan"
    temperature: float | None = 0.0
    warmup: int = 1
    seed: int = 0
    slos: dict[str, float] = field(default_factory=dict)  # ms (rtf: ratio)
    timeout: float = 600.0
    sample_metrics: bool = True


# -- one request ----------------------------------------------------------------------------------
async def send_chat(client, cfg: BenchConfig, prompt: BenchPrompt, speech: bool, origin: float) -> RequestResult:
    res = RequestResult(prompt.kind, speech)
    body: dict[str, Any] = {"messages": prompt.messages, "max_tokens": prompt.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    if cfg.model:
        body["model"] = cfg.model
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    if speech:
        body["modalities"] = ["text", "audio"]
        body["audio"] = {"voice": cfg.voice, "format": "pcm16"}
    start = time.perf_counter()
    res.sent_at = start - origin
    last_text = None
    chunks = 0
    audio_bytes = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                res.error = f"HTTP {resp.status_code}: {text[:300]}"
                res.e2e = time.perf_counter() - start
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - start
                ev = json.loads(data)
                if ev.get("error"):
                    res.error = str(ev["error"].get("message", ev["error"]))
                    break
                if ev.get("usage"):
                    res.output_tokens = int(ev["usage"].get("completion_tokens") or 0)
                    res.prompt_tokens = int(ev["usage"].get("prompt_tokens") or 0)
                for choice in ev.get("choices") or []:
                    delta = choice.get("delta") or {}
                    audio = delta.get("audio") or {}
                    text = delta.get("content") or delta.get("reasoning_content") or audio.get("transcript")
                    if text:
                        chunks += 1
                        if res.ttft is None:
                            res.ttft = now
                        else:
                            res.itl.append(now - last_text)
                        last_text = now
                    if audio.get("data"):
                        n = len(base64.b64decode(audio["data"]))
                        if n:
                            audio_bytes += n
                            res.first_audio = res.first_audio if res.first_audio is not None else now
                            res.last_audio = now
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
    res.e2e = time.perf_counter() - start
    res.last_token = last_text
    res.output_tokens = res.output_tokens or chunks
    res.audio_seconds = audio_bytes / 2 / SAMPLE_RATE
    if res.error is None:
        res.ok = res.ttft is not None or res.output_tokens > 0 or audio_bytes > 0
        if not res.ok:
            res.error = "empty stream"
    return res


# -- server metrics sampler ------------------------------------------------------------------------
_SAMPLED = {
    "thinktalk_num_requests_running": "running",
    "thinktalk_num_requests_waiting": "waiting",
    "thinktalk_kv_cache_used_tokens": "kv_used_tokens",
    "thinktalk_gpu_memory_used_bytes": "gpu_memory_used_bytes",
    "thinktalk_gpu_utilization_percent": "gpu_utilization_percent",
    "thinktalk_process_resident_memory_bytes": "server_rss_bytes",
}


def parse_metrics(text: str) -> dict[str, float]:
    """The sampled gauges of one /metrics page (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = _SAMPLED.get(s.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + s.value
            if s.name == "thinktalk_gpu_info":  # GPU names, or "no GPU"
                name = s.labels.get("name", "")
                gpus = out.get("gpu")
                out["gpu"] = name if not gpus else gpus if name in gpus.split(" + ") else f"{gpus} + {name}"
    return out


async def sample_server(client, stop: asyncio.Event, every: float = 0.5) -> dict[str, Any]:
    peaks: dict[str, Any] = {}
    while not stop.is_set():
        try:
            resp = await client.get("/metrics", timeout=5)
            if resp.status_code == 200:
                for k, v in parse_metrics(resp.text).items():
                    peaks[k] = v if isinstance(v, str) else max(v, peaks.get(k, v))
        except Exception:  # noqa: BLE001 - sampling is a bonus
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
    return {f"peak_{k}" if not isinstance(v, str) else k: v for k, v in peaks.items()}


# -- one level ------------------------------------------------------------------------------------
def arrival_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Gaps between request sends: gamma(shape=burstiness, mean 1/rate); burstiness 1 is Poisson."""
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


async def run_level(client, cfg: BenchConfig, prompts: list[BenchPrompt], level: float,
                    on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    rng = random.Random(cfg.seed + int(level * 1000) if not math.isinf(level) else cfg.seed)
    # exactly round(ratio * n) spoken answers, spread evenly (the same share at every level)
    speech_flags = [math.floor((i + 1) * cfg.speech_ratio + 1e-9) > math.floor(i * cfg.speech_ratio + 1e-9)
                    for i in range(len(prompts))]
    results: list[RequestResult] = []
    origin = time.perf_counter()

    async def one(i: int):
        r = await send_chat(client, cfg, prompts[i], speech_flags[i], origin)
        results.append(r)
        if on_done:
            on_done(r)

    if cfg.mode == "concurrency":
        users = max(1, int(level))
        next_i = iter(range(len(prompts)))

        async def user():
            for i in next_i:
                await one(i)

        await asyncio.gather(*(user() for _ in range(users)))
    else:
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def gated(i: int):
            if gate is None:
                return await one(i)
            async with gate:
                return await one(i)

        tasks = []
        for i, gap in enumerate(arrival_gaps(len(prompts), level, cfg.burstiness, rng)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(gated(i)))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - origin


def _pct(values: list[float], scale: float) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * scale
    return {"mean": round(float(arr.mean()), 4), **{f"p{p}": round(float(np.percentile(arr, p)), 4) for p in PERCENTILES}}


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.ok:
        return False
    for key, limit in slos.items():
        if key == "rtf":
            value = r.rtf
        elif key == "itl":
            value = max(r.itl) * 1000 if r.itl else None
        else:
            v = getattr(r, key)
            value = None if v is None else v * 1000
        if value is not None and value > limit:
            return False
        if value is None and key in ("ttft",):
            return False
    return True


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    audio = sum(r.audio_seconds for r in ok)
    good = sum(1 for r in ok if meets_slos(r, slos))
    duration = max(duration, 1e-9)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(out_tokens / duration, 3),
        "total_token_throughput": round((out_tokens + in_tokens) / duration, 3),
        "audio_throughput": round(audio / duration, 4),  # seconds of speech per second
        "total_output_tokens": out_tokens, "total_input_tokens": in_tokens, "total_audio_s": round(audio, 3),
        "goodput": round(good / duration, 4) if slos else None,
        "slo_attainment": round(good / len(results), 4) if slos and results else None,
    }
    for name in LATENCY_METRICS:
        if name == "itl":
            values = [g for r in ok for g in r.itl]
        else:
            values = [v for r in ok if (v := getattr(r, name)) is not None]
        summary[f"{name}_ms"] = _pct(values, 1000.0)
    summary["rtf"] = _pct([v for r in ok if (v := r.rtf) is not None], 1.0)
    kinds = sorted({r.kind for r in results})
    summary["by_kind"] = {k: {"completed": sum(1 for r in ok if r.kind == k),
                              "ttft_ms_p50": _pct([r.ttft for r in ok if r.kind == k and r.ttft is not None], 1000.0)["p50"]}
                          for k in kinds}
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    summary["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    return summary


# -- the whole run --------------------------------------------------------------------------------
async def _run(cfg: BenchConfig, prompts: list[BenchPrompt], progress: bool, save_requests: bool) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    top = max(int(x) for x in cfg.levels) if cfg.mode == "concurrency" else (cfg.max_concurrency or 256)
    limits = httpx.Limits(max_connections=top + 4, max_keepalive_connections=top + 4)
    base = cfg.url.rstrip("/").removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=cfg.timeout, limits=limits) as client:
        server = await _server_info(client)
        if cfg.model is None and server.get("model"):
            cfg.model = server["model"]
        for i in range(cfg.warmup):
            r = await send_chat(client, cfg, prompts[i % len(prompts)], False, time.perf_counter())
            if not r.ok:
                raise RuntimeError(f"warm-up request failed: {r.error}")
        levels = []
        view = _Progress(progress, len(cfg.levels) * cfg.num_prompts)
        with view:
            for level in cfg.levels:
                batch = [prompts[(i + len(levels) * cfg.num_prompts) % len(prompts)] for i in range(cfg.num_prompts)]
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_server(client, stop)) if cfg.sample_metrics else None
                view.level(cfg.mode, level)
                results, duration = await run_level(client, cfg, batch, level, view.done)
                stop.set()
                peaks = await sampler if sampler else {}
                entry = {"level": _level_value(level), **summarize(results, duration, cfg.slos), "server": peaks}
                if save_requests:
                    entry["requests"] = [_request_row(r) for r in results]
                levels.append(entry)
    return {
        "kind": "thinktalk-bench-serve",
        "version": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "client": {"python": platform.python_version(), "host": platform.node()},
        "server": server,
        "config": {k: _level_value(v) if k != "levels" else [_level_value(x) for x in v]
                   for k, v in asdict(cfg).items() if k != "api_key"},
        "prompts": {"count": len(prompts), "kinds": sorted({p.kind for p in prompts})},
        "levels": levels,
    }


def _level_value(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _request_row(r: RequestResult) -> dict[str, Any]:
    row = {k: v for k, v in asdict(r).items() if k != "itl"}
    row["tpot"], row["rtf"] = r.tpot, r.rtf
    return row


async def _server_info(client) -> dict[str, Any]:
    info: dict[str, Any] = {"url": str(client.base_url)}
    try:
        resp = await client.get("/v1/models", timeout=30)
        if resp.status_code == 200:
            data = resp.json().get("data") or []
            if data:
                info["model"] = data[0].get("id")
        elif resp.status_code == 401:
            raise RuntimeError("the server wants an API key: give --api-key")
    except RuntimeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"cannot reach {client.base_url}: {exc}") from None
    try:
        resp = await client.get("/health", timeout=10)
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("application/json"):
            info["health"] = resp.json()
        resp = await client.get("/metrics", timeout=10)
        if resp.status_code == 200:
            gpu = parse_metrics(resp.text).get("gpu")
            if gpu:
                info["gpu"] = gpu
    except Exception:  # noqa: BLE001
        pass
    return info


class _Progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self.p = None
        self.task = None
        self.errors = 0

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("{task.fields[err]}"), console=Console(stderr=True))
            self.p.__enter__()
            self.task = self.p.add_task("bench", total=self.total, err="")
        return self

    def level(self, mode: str, level: float) -> None:
        if self.p:
            name = "concurrency" if mode == "concurrency" else "rate"
            self.p.update(self.task, description=f"{name} {_level_value(level)}")

    def done(self, r: RequestResult) -> None:
        if not r.ok:
            self.errors += 1
        if self.p:
            self.p.update(self.task, advance=1, err=f"[red]{self.errors} failed[/red]" if self.errors else "")

    def __exit__(self, *exc):
        if self.p:
            self.p.__exit__(*exc)


def run_bench(cfg: BenchConfig, prompts: list[BenchPrompt], *, progress: bool = True,
              save_requests: bool = False) -> dict[str, Any]:
    """Run every level of `cfg` against the server; the results as a JSON-ready dict."""
    if not prompts:
        raise ValueError("no prompts")
    return asyncio.run(_run(cfg, prompts, progress, save_requests))


def parse_levels(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        value = math.inf if part in ("inf", "infinity") else float(part)
        if value <= 0:
            raise ValueError(f"levels must be > 0, got {part}")
        out.append(value)
    if not out:
        raise ValueError("no levels given")
    return out


def parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items or []:
        key, sep, value = item.partition("=") if "=" in item else item.partition(":")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo {item!r}: use NAME=VALUE with NAME one of {', '.join(SLO_KEYS)} (ms; rtf a ratio)")
        slos[key] = float(value)
    return slos


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
