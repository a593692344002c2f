"""Soak test: a server under mixed traffic with clients that vanish, for a long while.

    python benchmarks/soak.py --duration 600                         # starts `thinktalk serve --demo` itself
    python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 3600 --concurrency 8

Workers send, back to back until --duration runs out, a random mix of: chat text, streamed chat,
chat with an image, chat with audio in, chat with speech out (whole and streamed), /v1/audio/speech
and /v1/audio/transcriptions. A share of them (--disconnect-rate) is dropped on purpose: a stream
after its first chunks, any other request after a random moment. A deliberate drop is not an
error; an error is any other failure: a non-2xx status, a broken or incomplete answer (no finish
reason, no [DONE], empty audio), a client exception.

Reported (and written as JSON, by default to benchmarks/results/soak_<host>.json): requests served,
dropped and failed per kind; the server's resident memory (RSS, from /metrics) before the first
request, after warm-up and at the end; its free KV blocks before and at the end (after it went
idle) and a sample of both every --sample-every seconds. Exit status 1 when anything failed, or
when the KV blocks or the running count did not come back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
import wave
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("chat_text", "chat_stream", "chat_image", "chat_audio_in", "chat_speech_out", "chat_speech_stream",
         "speech", "transcription")


# -- the server ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "thinktalk.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "soak", "--kv-backend", "paged", "--max-speech-seconds", str(args.max_speech_seconds),
           "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--model", args.model] if args.model else ["--demo"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return proc, f"http://127.0.0.1:{port}", cmd


def wait_ready(url: str, proc, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout} s")


async def server_state(http, url: str) -> dict:
    """/health (running, waiting, in flight, KV) and the process RSS from /metrics."""
    health = (await http.get(f"{url}/health", timeout=10)).json()
    text = (await http.get(f"{url}/metrics", timeout=10)).text
    match = re.search(r"^thinktalk_process_resident_memory_bytes (\S+)$", text, re.M)
    return {"t": time.time(), "rss_mb": round(float(match.group(1)) / 2**20, 1) if match else None,
            **{k: health.get(k) for k in ("running", "waiting", "in_flight", "kv_used_tokens", "kv_free_blocks",
                                          "kv_total_blocks", "speaking", "talker_kv_tokens")}}


async def wait_idle(http, url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = await server_state(http, url)
        idle = not (s["running"] or s["waiting"] or s["in_flight"] or s["kv_used_tokens"] or s["speaking"])
        if idle and s["kv_free_blocks"] == s["kv_total_blocks"]:
            return s
        if time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.2)


# -- the requests ---------------------------------------------------------------------------------------
def make_media() -> dict[str, str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    img = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(img, "PNG")
    t = np.arange(16000) / 16000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    return {"png": base64.b64encode(img.getvalue()).decode(), "wav": buf.getvalue()}


class Failure(Exception):
    pass


class Soak:
    def __init__(self, args, url: str, model: str, voice: str | None):
        self.args, self.url, self.model, self.voice = args, url, model, voice
        self.media = make_media()
        self.served: Counter = Counter()
        self.dropped: Counter = Counter()
        self.failed: Counter = Counter()
        self.errors: list[str] = []
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def kinds(self) -> list[str]:
        return [k for k in KINDS if self.voice is not None or "speech" not in k]

    def chat_body(self, kind: str, rng: random.Random) -> dict:
        content: list | str = f"Tell me something about the number {rng.randint(0, 10**6)}."
        if kind == "chat_image":
            content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + self.media["png"]}},
                       {"type": "text", "text": "What is in this picture?"}]
        elif kind == "chat_audio_in":
            content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(self.media["wav"]).decode(),
                                                               "format": "wav"}},
                       {"type": "text", "text": "What do you hear?"}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": rng.randint(4, self.args.max_tokens), "temperature": 0.7, "seed": rng.randint(0, 1000)}
        if kind in ("chat_stream", "chat_speech_stream"):
            body["stream"] = True
        if kind == "chat_speech_out":
            body.update(modalities=["text", "audio"], audio={"voice": self.voice, "format": "wav"})
        if kind == "chat_speech_stream":
            body.update(modalities=["text", "audio"], audio={"voice": self.voice, "format": "pcm16"})
        return body

    async def one(self, http, kind: str, rng: random.Random, drop: bool) -> None:
        """One request; raises Failure for anything wrong. A drop hangs up early (returns quietly)."""
        if kind in ("chat_stream", "chat_speech_stream"):
            return await self.stream(http, kind, rng, drop)
        if drop:  # hang up after a random moment (before or after the server starts on it)
            try:
                await asyncio.wait_for(self.whole(http, kind, rng), timeout=rng.uniform(0.01, 1.0))
            except asyncio.TimeoutError:
                pass
            return
        await self.whole(http, kind, rng)

    async def whole(self, http, kind: str, rng: random.Random) -> None:
        if kind == "speech":
            r = await http.post(f"{self.url}/v1/audio/speech", headers=self.headers, json={
                "model": self.model, "input": f"Number {rng.randint(0, 999)}.", "voice": self.voice,
                "response_format": "wav"})
            check(r, kind)
            if len(r.content) <= 44:
                raise Failure(f"{kind}: no audio ({len(r.content)} bytes)")
            return
        if kind == "transcription":
            r = await http.post(f"{self.url}/v1/audio/transcriptions", headers=self.headers,
                                files={"file": ("tone.wav", self.media["wav"], "audio/wav")},
                                data={"model": self.model, "max_tokens": str(rng.randint(2, 12))})
            check(r, kind)
            if "text" not in r.json():
                raise Failure(f"{kind}: no text in {r.text[:200]}")
            return
        r = await http.post(f"{self.url}/v1/chat/completions", headers=self.headers, json=self.chat_body(kind, rng))
        check(r, kind)
        choice = r.json()["choices"][0]
        if choice.get("finish_reason") not in ("stop", "length"):
            raise Failure(f"{kind}: finish_reason {choice.get('finish_reason')!r}")
        if kind == "chat_speech_out" and not (choice["message"].get("audio") or {}).get("data"):
            raise Failure(f"{kind}: no audio in the answer")

    async def stream(self, http, kind: str, rng: random.Random, drop: bool) -> None:
        keep = rng.randint(1, 4) if drop else None  # chunks read before hanging up
        finish, done, chunks = None, False, 0
        async with http.stream("POST", f"{self.url}/v1/chat/completions", headers=self.headers,
                               json=self.chat_body(kind, rng)) as r:
            if r.status_code != 200:
                await r.aread()
                check(r, kind)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    raise Failure(f"{kind}: error event {event['error']}")
                chunks += 1
                for choice in event.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                if keep is not None and chunks >= keep:
                    return  # leaving the block closes the connection mid-stream
        if not done or finish not in ("stop", "length"):
            raise Failure(f"{kind}: stream ended without a finish ({finish!r}) or [DONE] ({done})")

    async def worker(self, index: int, deadline: float) -> None:
        import httpx

        rng = random.Random(self.args.seed * 1000 + index)
        kinds = self.kinds()
        async with httpx.AsyncClient(timeout=self.args.request_timeout) as http:
            while time.monotonic() < deadline:
                kind = rng.choice(kinds)
                drop = rng.random() < self.args.disconnect_rate
                t0 = time.perf_counter()
                try:
                    await self.one(http, kind, rng, drop)
                except Failure as exc:
                    self.fail(kind, str(exc))
                    continue
                except Exception as exc:  # noqa: BLE001 - a client-side failure is a soak error too
                    self.fail(kind, f"{kind}: {type(exc).__name__}: {exc}")
                    continue
                if drop:
                    self.dropped[kind] += 1
                else:
                    self.served[kind] += 1
                    self.latency[kind].append(time.perf_counter() - t0)

    def fail(self, kind: str, message: str) -> None:
        self.failed[kind] += 1
        if len(self.errors) < 20:
            self.errors.append(message[:500])


def check(r, kind: str) -> None:
    if r.status_code != 200:
        raise Failure(f"{kind}: HTTP {r.status_code} {r.text[:300]}")


# -- the run ------------------------------------------------------------------------------------------
async def run(args, url: str) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=30) as http:
        card = (await http.get(f"{url}/v1/models", headers=headers)).json()["data"][0]
        voices = card.get("voices") or []
        soak = Soak(args, url, card["id"], voices[0] if voices else None)
        start = await wait_idle(http, url)
        samples = [start]
        t0 = time.monotonic()
        deadline = t0 + args.duration
        workers = [asyncio.create_task(soak.worker(i, deadline)) for i in range(args.concurrency)]
        warm = None
        while not all(w.done() for w in workers):
            await asyncio.sleep(min(args.sample_every, max(0.1, deadline - time.monotonic())))
            s = await server_state(http, url)
            samples.append(s)
            if warm is None and time.monotonic() - t0 >= min(60.0, args.duration / 4):
                warm = s
        await asyncio.gather(*workers)
        end = await wait_idle(http, url)
        samples.append(end)
    elapsed = time.monotonic() - t0
    served, dropped, failed = sum(soak.served.values()), sum(soak.dropped.values()), sum(soak.failed.values())
    back = (end["kv_free_blocks"] == start["kv_free_blocks"] and not end["running"] and not end["in_flight"])
    return {
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency, "disconnect_rate": args.disconnect_rate, "seed": args.seed,
        "kinds": soak.kinds(),
        "requests_served": served, "requests_dropped_on_purpose": dropped, "errors": failed,
        "served_by_kind": dict(soak.served), "dropped_by_kind": dict(soak.dropped), "errors_by_kind": dict(soak.failed),
        "error_samples": soak.errors,
        "latency_s_median_by_kind": {k: round(float(np.median(v)), 3) for k, v in soak.latency.items()},
        "rss_mb": {"start": start["rss_mb"], "after_warmup": (warm or end)["rss_mb"], "end": end["rss_mb"],
                   "max": max(s["rss_mb"] for s in samples if s["rss_mb"] is not None)},
        "kv_free_blocks": {"start": start["kv_free_blocks"], "end": end["kv_free_blocks"],
                           "total": start["kv_total_blocks"],
                           "min": min(s["kv_free_blocks"] for s in samples if s["kv_free_blocks"] is not None)},
        "end_state": end,
        "back_to_baseline": back,
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `thinktalk serve --demo` here)")
    ap.add_argument("--model", help="checkpoint for the server started here (default: the demo model)")
    ap.add_argument("--api-key", default=os.environ.get("THINKTALK_API_KEY"))
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--disconnect-rate", type=float, default=0.25, help="share of requests dropped on purpose")
    ap.add_argument("--max-tokens", type=int, default=24, help="longest text answer asked for")
    ap.add_argument("--max-speech-seconds", type=float, default=1.0, help="(server started here)")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="(server started here)")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS/KV samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device-note", default=None, help="what the server runs on, for the JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/soak_<host>.json)")
    args = ap.parse_args()

    proc, log_path, cmd = None, Path(f"/tmp/thinktalk-soak-{os.getpid()}.log"), None
    url = args.url
    if url is None:
        proc, url, cmd = start_server(args, log_path)
        print(f"starting {' '.join(cmd[1:])} (log: {log_path})", flush=True)
        wait_ready(url, proc, 600, log_path)
    try:
        result = asyncio.run(run(args, url.rstrip("/")))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if proc is not None:
        log = log_path.read_text(errors="replace")
        result["server_tracebacks"] = log.count("Traceback")
        result["server_exit_code"] = proc.returncode
    result.update(
        url=args.url or "started here", server_command=" ".join(cmd[1:]) if cmd else None,
        device=args.device_note or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                                   f"({'demo model' if not args.model and not args.url else 'see server_command'})",
        host=platform.node(), python=platform.python_version(), when=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    out = args.out or ROOT / "benchmarks" / "results" / f"soak_{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result[k] for k in ("duration_s", "requests_served", "requests_dropped_on_purpose", "errors",
                                      "rss_mb", "kv_free_blocks", "back_to_baseline")}
    print(json.dumps(summary, indent=1))
    for e in result["error_samples"][:5]:
        print("error:", e)
    print(f"wrote {out}")
    ok = result["errors"] == 0 and result["back_to_baseline"] and result.get("server_tracebacks", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
