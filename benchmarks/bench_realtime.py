"""Realtime voice benchmark: end of the user's speech to the first audio byte of the answer.

    python benchmarks/bench_realtime.py --out benchmarks/results/realtime_h200.json
    python benchmarks/bench_realtime.py --url http://127.0.0.1:8000 --out r.json     # a running server

Without --url a server is started here: `thinktalk serve --random-weights` (the full-size model,
random weights: no checkpoint needed) or `--model PATH`. Each session streams a spoken question
(benchmarks/data/realtime_question_16k.wav, espeak-ng) as a microphone would: pcm16 16 kHz in
20 ms chunks at real-time pace, with silence between turns, the server's VAD ending each turn.
Sessions run concurrently (--concurrency 1 8), their turns staggered over one turn's length.

Per turn (client clock):
  commit_to_first_audio   input_audio_buffer.committed (the VAD's end of turn) -> first
                          response.output_audio.delta: the server's share of the latency
  speech_end_to_first_audio  last speech sample sent (the WAV trimmed of silence) -> first audio
                          delta: what a user waits (includes the VAD's silence_duration_ms)
  commit_to_first_text    committed -> first transcript delta
  commit_to_done          committed -> response.done

Random weights never say the end-of-answer token: --max-output-tokens and --max-speech-seconds
bound each answer. The server speaks through its streaming speech stage (first audio after a few
codec frames, while the thinker still writes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_WAV = ROOT / "benchmarks" / "data" / "realtime_question_16k.wav"
RATE = 16000
CHUNK_MS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "thinktalk.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-num-seqs", str(max(16, max(args.concurrency) * 2)),
           "--max-speech-seconds", str(args.max_speech_seconds)]
    cmd += ["--model", args.model] if args.model else ["--random-weights"]
    if args.device:
        cmd += ["--device", args.device]
    cmd += args.server_arg or []
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return proc, f"http://127.0.0.1:{port}", cmd


def wait_ready(url: str, proc, timeout: float, log_path: Path) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server was not ready after {timeout} s")


class Session:
    """One simulated speaker: turns of [silence, question, silence] at real-time pace."""

    def __init__(self, url: str, speech: bytes, args, index: int, api_key: str | None):
        self.url = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/v1/realtime?api=ga"
        self.speech, self.args, self.index, self.api_key = speech, args, index, api_key
        self.turns: list[dict] = []
        self.errors: list[str] = []
        self._current: dict | None = None
        self._done = asyncio.Event()

    async def run(self, turns: int, start_delay: float) -> None:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with connect(self.url, additional_headers=headers, max_size=None) as ws:
            await ws.recv()  # session.created
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "max_output_tokens": self.args.max_output_tokens,
                "instructions": "You are a helpful voice assistant. Answer briefly.",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                    "turn_detection": {"type": "server_vad",
                                                       "silence_duration_ms": self.args.silence_ms}}}}}))
            reader = asyncio.ensure_future(self._read(ws))
            try:
                await self._silence(ws, start_delay)
                for _ in range(turns):
                    turn = {"session": self.index}
                    self._current = turn
                    self._done.clear()
                    await self._stream(ws, self.speech)
                    turn["speech_end"] = time.monotonic()
                    # a microphone keeps sending: silence until the answer is done (and heard)
                    t_end = time.monotonic() + self.args.turn_timeout
                    while not self._done.is_set() and time.monotonic() < t_end:
                        await self._silence(ws, 0.1)
                    if not self._done.is_set():
                        self.errors.append("turn timed out")
                    else:
                        self.turns.append(turn)
                    await self._silence(ws, turn.get("audio_s", 0.0) + 0.3)  # listen to the answer
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _send_pcm(self, ws, pcm: bytes) -> None:
        step = RATE * CHUNK_MS // 1000 * 2
        t0 = time.monotonic()
        for k, start in enumerate(range(0, len(pcm), step)):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[start : start + step]).decode()}))
            delay = t0 + (k + 1) * CHUNK_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _stream(self, ws, pcm: bytes) -> None:
        await self._send_pcm(ws, b"\x00\x00" * int(0.4 * RATE) + pcm)

    async def _silence(self, ws, seconds: float) -> None:
        if seconds > 0:
            await self._send_pcm(ws, b"\x00\x00" * int(seconds * RATE))

    async def _read(self, ws) -> None:
        async for message in ws:
            ev = json.loads(message)
            kind = ev["type"]
            now = time.monotonic()
            turn = self._current
            if turn is None:
                continue
            if kind == "input_audio_buffer.speech_stopped":
                turn.setdefault("speech_stopped", now)
            elif kind == "input_audio_buffer.committed":
                turn.setdefault("committed", now)
            elif kind == "response.output_audio_transcript.delta":
                turn.setdefault("first_text", now)
            elif kind == "response.output_audio.delta":
                turn.setdefault("first_audio", now)
                turn["audio_s"] = turn.get("audio_s", 0.0) + len(base64.b64decode(ev["delta"])) / 2 / 24000
            elif kind == "response.done":
                turn["done"] = now
                turn["status"] = ev["response"]["status"]
                usage = ev["response"].get("usage") or {}
                turn["input_tokens"] = usage.get("input_tokens")
                turn["cached_tokens"] = (usage.get("input_token_details") or {}).get("cached_tokens")
                self._done.set()
            elif kind == "error":
                self.errors.append(ev["error"].get("message", "error"))


def stats(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
    return {"n": len(v), "mean_s": round(statistics.fmean(v), 4), "p50_s": round(pick(0.5), 4),
            "p90_s": round(pick(0.9), 4), "p99_s": round(pick(0.99), 4), "min_s": round(v[0], 4),
            "max_s": round(v[-1], 4)}


async def run_level(url: str, speech: bytes, args, c: int) -> dict:
    turn_s = 0.4 + len(speech) / 2 / RATE
    sessions = [Session(url, speech, args, i, args.api_key) for i in range(c)]
    t0 = time.monotonic()
    await asyncio.gather(*(s.run(args.turns, i * turn_s / c) for i, s in enumerate(sessions)))
    wall = time.monotonic() - t0
    turns = [t for s in sessions for t in s.turns if "committed" in t and "first_audio" in t]
    out = {
        "concurrency": c, "turns": len(turns), "wall_s": round(wall, 2),
        "errors": [e for s in sessions for e in s.errors],
        "commit_to_first_audio": stats([t["first_audio"] - t["committed"] for t in turns]),
        "speech_end_to_first_audio": stats([t["first_audio"] - t["speech_end"] for t in turns]),
        "commit_to_first_text": stats([t["first_text"] - t["committed"] for t in turns if "first_text" in t]),
        "commit_to_done": stats([t["done"] - t["committed"] for t in turns]),
        # each turn in order (session, turn): which turns are slow, not just how slow
        "per_turn_commit_to_first_audio_s": [round(t["first_audio"] - t["committed"], 4) for t in turns],
        # prompt tokens and how many of them came from the prefix cache, per turn in the same order
        "per_turn_prompt_cached_tokens": [(t.get("input_tokens"), t.get("cached_tokens")) for t in turns],
        "statuses": sorted({t.get("status", "?") for t in turns}),
        "answer_audio_s": stats([t.get("audio_s", 0.0) for t in turns]),
        "prompt_tokens_last_turn": max((t.get("input_tokens") or 0 for t in turns), default=0),
    }
    return out


def device_info() -> dict:
    info = {"host": platform.node(), "python": platform.python_version()}
    if shutil.which("nvidia-smi"):
        try:
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def load_speech(path: Path) -> bytes:
    from thinktalk.multimodal.audio import load_audio

    wave = load_audio(str(path), RATE)
    loud = np.flatnonzero(np.abs(wave) > 0.02)  # the file's own leading/trailing silence goes
    if len(loud):
        wave = wave[max(loud[0] - 160, 0) : loud[-1] + 160]
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one here)")
    ap.add_argument("--model", help="checkpoint folder for the server started here (default: --random-weights)")
    ap.add_argument("--device", help="the started server's --device")
    ap.add_argument("--api-key", default=os.environ.get("THINKTALK_API_KEY"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--turns", type=int, default=3, help="turns per session per concurrency level")
    ap.add_argument("--speech-wav", type=Path, default=DEFAULT_WAV)
    ap.add_argument("--max-output-tokens", type=int, default=48)
    ap.add_argument("--max-speech-seconds", type=float, default=3.0)
    ap.add_argument("--silence-ms", type=int, default=500, help="the VAD's silence_duration_ms")
    ap.add_argument("--turn-timeout", type=float, default=180.0)
    ap.add_argument("--startup-timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    ap.add_argument("--server-arg", action="append", help="an extra `serve` argument for the server started here "
                    "(repeat; e.g. --server-arg=--gpu-memory-utilization=0.95)")
    args = ap.parse_args()

    speech = load_speech(args.speech_wav)
    proc = None
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_realtime_server_{os.getpid()}.log"
    cmd = None
    url = args.url
    load_s = None
    if url is None:
        proc, url, cmd = start_server(args, log_path)
    try:
        load_s = wait_ready(url, proc, args.startup_timeout, log_path)
        # warm-up: one turn, not counted
        asyncio.run(run_level(url, speech, argparse.Namespace(**{**vars(args), "turns": 1}), 1))
        levels = [asyncio.run(run_level(url, speech, args, c)) for c in args.concurrency]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "benchmark": "realtime_first_audio",
        "command": " ".join([sys.executable, *sys.argv]),
        "server_command": " ".join(cmd) if cmd else f"(running at {url})",
        "device": device_info(),
        "weights": "random (full size)" if proc is not None and not args.model else (args.model or "server's"),
        "settings": {"turns_per_session": args.turns, "speech_s": round(len(speech) / 2 / RATE, 2),
                     "chunk_ms": CHUNK_MS, "input_rate": RATE, "max_output_tokens": args.max_output_tokens,
                     "max_speech_seconds": args.max_speech_seconds, "silence_duration_ms": args.silence_ms},
        "server_ready_s": round(load_s, 1) if load_s is not None else None,
        "levels": levels,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(lvl["turns"] for lvl in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
