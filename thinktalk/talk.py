"""`thinktalk talk`: a terminal voice client of a server's /v1/realtime.

    thinktalk talk [--url http://127.0.0.1:8000] [--input-wav speech.wav] [--output-dir replies/] [--voice Ethan]

Input: the local microphone (the optional extra `sounddevice`), or a WAV (any audio file PyAV
reads) streamed at real-time pace in its place, followed by silence so the server's VAD ends the
turn. Turns are found by the server (server VAD); speaking over an answer interrupts it.
Output: the answers are played (sounddevice) or, with --output-dir (or without a sound device),
saved as reply-N.wav (24 kHz). Both sides' transcripts and each turn's latency (end of speech to
first audio) are printed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IN_RATE = 16000  # what we send (the model's own rate: no resampling on the server)
OUT_RATE = 24000
CHUNK_MS = 40
TRAILING_SILENCE_S = 1.5  # after a WAV, so the VAD sees its end
SETTLE_S = 1.0  # quiet time after the last answer before a WAV session ends


def realtime_url(url: str) -> str:
    """http(s)://host[:port][/v1] or ws(s)://... -> the ws(s) URL of /v1/realtime."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/realtime"):
        path = (path if path.endswith("/v1") else path + "/v1") + "/realtime"
    query = urllib.parse.parse_qsl(parts.query)
    if not any(k == "api" for k, _ in query):
        query.append(("api", "ga"))
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, urllib.parse.urlencode(query), ""))


@dataclass
class Turn:
    n: int
    response_id: str
    audio: bytearray = field(default_factory=bytearray)
    transcript: str = ""
    first_audio_at: float | None = None


class Player:
    """Gap-free playback of pcm16 24 kHz through sounddevice; `clear()` drops what is queued."""

    def __init__(self):
        import sounddevice as sd

        self._buf = bytearray()
        self._lock = threading.Lock()
        self.stream = sd.RawOutputStream(samplerate=OUT_RATE, channels=1, dtype="int16", callback=self._callback)
        self.stream.start()

    def _callback(self, outdata, frames, time_info, status):
        n = frames * 2
        with self._lock:
            chunk = bytes(self._buf[:n])
            del self._buf[:n]
        outdata[: len(chunk)] = chunk
        if len(chunk) < n:
            outdata[len(chunk):] = b"\x00" * (n - len(chunk))

    def play(self, pcm: bytes) -> None:
        with self._lock:
            self._buf.extend(pcm)

    def clear(self) -> None:
        with self._lock:
            self._buf.clear()

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


class Talk:
    def __init__(self, url: str, *, input_wav: Path | None, output_dir: Path | None, voice: str | None,
                 api_key: str | None, instructions: str | None, max_output_tokens: int | None,
                 out=print):
        self.url = realtime_url(url)
        self.input_wav, self.output_dir = input_wav, output_dir
        self.voice, self.api_key, self.instructions = voice, api_key, instructions
        self.max_output_tokens = max_output_tokens
        self.out = out
        self.turns: dict[str, Turn] = {}
        self.saved: list[Path] = []
        self.player: Player | None = None
        self.active: str | None = None  # response in progress
        self.speaking = False
        self.speech_end_at: float | None = None
        self.committed = 0
        self.last_activity = time.monotonic()
        self.errors: list[str] = []

    # -- events ---------------------------------------------------------------------------------
    def on_event(self, ev: dict) -> None:
        kind = ev.get("type", "")
        self.last_activity = time.monotonic()
        if kind == "input_audio_buffer.speech_started":
            self.speaking = True
            if self.player is not None:
                self.player.clear()
        elif kind == "input_audio_buffer.speech_stopped":
            self.speaking = False
            self.speech_end_at = time.monotonic()
        elif kind == "input_audio_buffer.committed":
            self.committed += 1
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.out(f"you: {ev.get('transcript', '').strip()}")
        elif kind == "response.created":
            rid = ev["response"]["id"]
            self.active = rid
            self.turns[rid] = Turn(len(self.turns) + 1, rid)
        elif kind in ("response.output_audio.delta", "response.audio.delta"):
            turn = self.turns.get(ev.get("response_id"))
            pcm = base64.b64decode(ev["delta"])
            if turn is not None:
                if turn.first_audio_at is None:
                    turn.first_audio_at = time.monotonic()
                turn.audio.extend(pcm)
            if self.player is not None:
                self.player.play(pcm)
        elif kind in ("response.output_audio_transcript.delta", "response.audio_transcript.delta",
                      "response.output_text.delta", "response.text.delta"):
            turn = self.turns.get(ev.get("response_id"))
            if turn is not None:
                turn.transcript += ev.get("delta", "")
        elif kind == "response.done":
            resp = ev["response"]
            turn = self.turns.get(resp["id"])
            if self.active == resp["id"]:
                self.active = None
            if turn is not None:
                self._done(turn, resp.get("status", "?"))
        elif kind == "error":
            err = ev.get("error") or {}
            self.errors.append(err.get("message", "error"))
            self.out(f"error: {err.get('message')} ({err.get('code')})")

    def _done(self, turn: Turn, status: str) -> None:
        latency = ""
        if turn.first_audio_at is not None and self.speech_end_at is not None:
            latency = f", first audio {turn.first_audio_at - self.speech_end_at:.2f} s after end of speech"
        seconds = len(turn.audio) / 2 / OUT_RATE
        note = "" if status == "completed" else f" [{status}]"
        self.out(f"assistant: {turn.transcript.strip()}{note}")
        where = ""
        if self.output_dir is not None and turn.audio:
            from .audio_out import write_wav

            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"reply-{turn.n}.wav"
            write_wav(path, np.frombuffer(bytes(turn.audio), dtype="<i2").astype(np.float32) / 32768.0, OUT_RATE)
            self.saved.append(path)
            where = f" -> {path}"
        self.out(f"  ({seconds:.2f} s of speech{latency}){where}")

    # -- the session ----------------------------------------------------------------------------
    def session(self) -> dict:
        audio_out: dict = {}
        if self.voice:
            audio_out["voice"] = self.voice
        session = {
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": IN_RATE},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                                "transcription": {"model": "default"}},
                      "output": audio_out},
        }
        if self.instructions:
            session["instructions"] = self.instructions
        if self.max_output_tokens:
            session["max_output_tokens"] = self.max_output_tokens
        return session

    async def run(self) -> int:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            ws = await connect(self.url, additional_headers=headers, max_size=None, open_timeout=30)
        except InvalidStatus as exc:
            self.out(f"error: the server refused the connection: HTTP {exc.response.status_code} "
                     f"{exc.response.body.decode(errors='replace')[:300]}")
            return 2
        except OSError as exc:
            self.out(f"error: cannot connect to {self.url}: {exc}")
            return 2
        async with ws:
            created = json.loads(await ws.recv())
            if created.get("type") != "session.created":
                self.out(f"error: unexpected first event {created.get('type')!r}")
                return 2
            await ws.send(json.dumps({"type": "session.update", "session": self.session()}))
            reader = asyncio.ensure_future(self._read(ws))
            try:
                if self.input_wav is not None:
                    await self._send_wav(ws, reader)
                else:
                    await self._send_mic(ws, reader)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                if self.player is not None:
                    self.player.close()
        return 1 if self.errors and not self.turns else 0

    async def _read(self, ws) -> None:
        async for message in ws:
            self.on_event(json.loads(message))

    async def _append(self, ws, pcm: bytes) -> None:
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))

    async def _send_wav(self, ws, reader: asyncio.Task) -> None:
        from .audio_out import to_pcm16
        from .multimodal.audio import load_audio

        if self.output_dir is None:
            self.player = _try_player(self.out)
            if self.player is None:
                self.output_dir = Path(".")
        wave = await asyncio.to_thread(load_audio, str(self.input_wav), IN_RATE)
        pcm = to_pcm16(wave)
        pcm += b"\x00\x00" * int(TRAILING_SILENCE_S * IN_RATE)
        step = IN_RATE * CHUNK_MS // 1000 * 2
        t0 = time.monotonic()
        for k, start in enumerate(range(0, len(pcm), step)):  # real-time pace, as a microphone would
            await self._append(ws, pcm[start : start + step])
            delay = t0 + (k + 1) * CHUNK_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if reader.done():
                break
        await asyncio.sleep(0.3)
        if self.committed == 0 and not self.speaking and not reader.done():
            # the VAD heard no speech in the file: send it as one manual turn instead
            self.out("(no speech detected by the server's VAD: sending the file as one turn)")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
            for start in range(0, len(pcm), 64 * 1024):
                await self._append(ws, pcm[start : start + 64 * 1024])
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            self.speech_end_at = time.monotonic()
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not reader.done():
            idle = time.monotonic() - self.last_activity
            if self.active is None and not self.speaking and self.turns and idle > SETTLE_S:
                break
            await asyncio.sleep(0.1)
        if self.player is not None:  # let the last answer play out
            while self.player._buf:
                await asyncio.sleep(0.1)

    async def _send_mic(self, ws, reader: asyncio.Task) -> None:
        try:
            import sounddevice as sd
        except ImportError:
            raise SystemExit("the microphone needs the optional extra: pip install 'thinktalk[mic]' "
                             "(sounddevice); or give --input-wav FILE")
        if self.output_dir is None:
            self.player = _try_player(self.out)
            if self.player is None:
                self.output_dir = Path(".")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def callback(indata, frames, time_info, status):
            loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

        blocksize = IN_RATE * CHUNK_MS // 1000
        with sd.RawInputStream(samplerate=IN_RATE, channels=1, dtype="int16", blocksize=blocksize, callback=callback):
            self.out("listening; speak (Ctrl+C to quit)")
            while not reader.done():
                await self._append(ws, await queue.get())


def _try_player(out) -> Player | None:
    try:
        return Player()
    except Exception as exc:  # noqa: BLE001 - no sounddevice, no PortAudio or no output device
        out(f"(no audio playback: {exc}; saving the answers as WAV files instead)")
        return None


def run_talk(url: str, *, input_wav: Path | None = None, output_dir: Path | None = None, voice: str | None = None,
             api_key: str | None = None, instructions: str | None = None, max_output_tokens: int | None = None) -> int:
    if input_wav is not None and not Path(input_wav).is_file():
        print(f"error: --input-wav {input_wav}: no such file", file=sys.stderr)
        return 2
    talk = Talk(url, input_wav=input_wav, output_dir=output_dir, voice=voice, api_key=api_key,
                instructions=instructions, max_output_tokens=max_output_tokens,
                out=lambda s: print(s, flush=True))
    try:
        return asyncio.run(talk.run())
    except KeyboardInterrupt:
        return 0
