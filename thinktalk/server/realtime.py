"""/v1/realtime: spoken (and seen) conversations over a WebSocket, in the OpenAI Realtime protocol.

One `RealtimeSession` per socket, all on the event loop:

    socket ──► reader ── input_audio_buffer.append ──► pcm16 → float → soxr (stream) → 16 kHz
                 │                                        ├──► input buffer (what a commit takes)
                 │                                        └──► VAD task: silero probabilities in a
                 │                                             thread → TurnDetector → speech_started
                 │                                             (barge-in: cancel the response) /
                 │                                             speech_stopped → commit → response
                 └── other client events (session.update, commit, item.create, response.create ...)

    response task: history → chat messages → Omni.make_request (CPU pool) → engine stream →
                   transcript deltas; a SpeechSource turns the request into pcm16 chunks, sent
                   paced to at most AUDIO_LEAD_S ahead of real time (so a barge-in stops the audio
                   within a chunk and the item is truncated to what was sent).

Each turn re-sends the whole conversation, rendered by the chat template exactly as the earlier
turns were (earlier answers as the assistant text that was heard), so an engine with prefix caching
reuses the KV of everything before the new turn (spoken answers too: the engine keeps the talker's
hidden states of cached blocks). The session's `MediaCache` keeps each earlier clip's mel features
and camera frame's patches, so a turn processes only its new media on the CPU.

The speech comes from a `SpeechSource`: an async iterator of pcm16 (24 kHz) chunks per request.
`StageSpeech` (used when the server's AsyncEngine has the streaming speech stage) carries the PCM
the engine stream yields while the thinker is still writing; `ReferenceSpeech` (the fallback) waits
for the text, runs Omni's reference speech path in the speech pool and yields the waveform.

Dialects (beta / GA event names) and the extensions are described in realtime_protocol.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

import numpy as np
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..audio_out import to_pcm16
from ..errors import ContextLengthError, InputError
from ..multimodal.media_cache import MediaCache
from ..request import sampling_from
from .async_engine import EngineDead
from .protocol import APIError, error_body
from .realtime_protocol import (
    BETA, CLIENT_EVENTS, GA, OUTPUT_RATE, Item, ProtocolError, SessionConfig, apply_session_update,
    dialect_of_session, error_event, event_name, new_id, truncate_text,
)
from .vad import SileroVAD, TurnDetector

log = logging.getLogger("thinktalk.server.realtime")
router = APIRouter()

WEB = Path(__file__).parent / "web"
MODEL_RATE = 16000  # the audio encoder's rate
AUDIO_CHUNK_MS = 100  # audio deltas carry this much speech
AUDIO_LEAD_S = 0.5  # audio is sent at most this far ahead of real-time playback
DEFAULT_MAX_TOKENS = 1024  # per answer, when the session says "inf"
MAX_BUFFER_S = 300  # longest input audio buffer
IDLE_KEEP_S = 2.0  # while nobody speaks (server VAD), the buffer keeps only this much
MAX_FRAMES_PER_TURN = 1  # camera frames attached to a user turn: the latest
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MIN_COMMIT_MS = 100
TAIL_MS = 150  # audio kept after the end of speech in a VAD turn
SUBPROTOCOL_KEY = "openai-insecure-api-key."
SUBPROTOCOL_BETA = "openai-beta.realtime-v1"
TRANSCRIBE_PROMPT = "Transcribe the audio into text."

_VAD_POOL = ThreadPoolExecutor(2, thread_name_prefix="thinktalk-vad")


# -- speech sources ------------------------------------------------------------------------------------
class SpeechSource(Protocol):
    def stream(self, req, text_done: asyncio.Future) -> AsyncIterator[bytes]:
        """pcm16 24 kHz chunks of the spoken answer of engine request `req`. `text_done` resolves
        (to the finish reason) when the thinker has finished the request; a non-streaming source
        waits for it, a streaming one may start at once. Closing the iterator stops the speech."""
        ...


class ReferenceSpeech:
    """Omni's reference speech path (talker + code2wav over the finished answer) in the speech pool."""

    def __init__(self, st):
        self.st = st

    async def stream(self, req, text_done: asyncio.Future) -> AsyncIterator[bytes]:
        reason = await text_done
        if reason in ("abort", "error") or not req.output_ids:
            return
        st = self.st
        t0 = time.perf_counter()
        try:
            _, wav = await st.run_speech(lambda: st.omni.speak(req, max_frames=st.max_speech_frames))
        except InputError as exc:
            log.info("no speech for %s: %s", req.request_id, exc)
            return
        seconds = len(wav) / OUTPUT_RATE
        if seconds > 0:
            m = st.metrics
            m.rtf.labels(m.model).observe((time.perf_counter() - t0) / seconds)
            m.audio_seconds.labels(m.model).inc(seconds)
            yield await st.run_cpu(to_pcm16, np.asarray(wav, dtype=np.float32))


class StageSpeech:
    """PCM of the engine's streaming speech stage: the response loop `feed`s what the request's
    stream yields (audio events beside its tokens), `stream` hands it on; None ends it."""

    def __init__(self):
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def feed(self, pcm: bytes | None) -> None:
        self.queue.put_nowait(pcm)

    async def stream(self, req, text_done: asyncio.Future) -> AsyncIterator[bytes]:
        while (pcm := await self.queue.get()) is not None:
            yield pcm


class Pacer:
    """Sends no more than `lead_s` ahead of a listener who started playing at the first chunk."""

    def __init__(self, lead_s: float = AUDIO_LEAD_S, rate: int = OUTPUT_RATE):
        self.lead_s, self.rate = lead_s, rate
        self.t0: float | None = None
        self.sent = 0  # samples

    async def wait(self, samples: int) -> None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        ahead = self.sent / self.rate - (now - self.t0)
        if ahead < 0:  # the listener ran dry: playback restarts with this chunk
            self.t0 = now - self.sent / self.rate
        elif ahead > self.lead_s:
            await asyncio.sleep(ahead - self.lead_s)
        self.sent += samples


# -- audio input -------------------------------------------------------------------------------------
class AudioBuffer:
    """16 kHz float32 samples; positions are absolute (samples since the session began)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.start = 0  # absolute position of the first kept sample
        self.end = 0  # absolute position after the last sample

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, x: np.ndarray) -> None:
        if len(x):
            self.chunks.append(x)
            self.end += len(x)

    def _joined(self) -> np.ndarray:
        if len(self.chunks) != 1:
            self.chunks = [np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)]
        return self.chunks[0]

    def take(self, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Samples [start, end) (clamped to what is kept); everything before `end` is dropped."""
        start = self.start if start is None else max(start, self.start)
        end = self.end if end is None else min(max(end, start), self.end)
        data = self._joined()
        out = data[start - self.start : end - self.start].copy()
        self.drop_before(end)
        return out

    def drop_before(self, pos: int) -> None:
        pos = min(max(pos, self.start), self.end)
        if pos == self.start:
            return
        data = self._joined()
        self.chunks = [data[pos - self.start :]]
        self.start = pos

    def clear(self) -> None:
        self.chunks = []
        self.start = self.end


def pcm16_to_float(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


# -- responses ---------------------------------------------------------------------------------------
@dataclass
class ResponseParams:
    instructions: str
    audio_out: bool
    voice: str | None
    max_tokens: int
    temperature: float


@dataclass
class RealtimeResponse:
    id: str
    params: ResponseParams
    created_at: float = field(default_factory=time.perf_counter)
    task: asyncio.Task | None = None
    item: Item | None = None
    status: str = "in_progress"
    status_details: dict | None = None
    finished: bool = False  # no event of this response is sent any more (done or cancelled)
    text: str = ""  # the whole answer so far
    audio_made: int = 0  # samples the speech source gave
    audio_sent: int = 0  # samples sent to the client
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, found in the engine's prefix cache
    by_modality: dict = field(default_factory=dict)
    output_tokens: int = 0
    first_audio_at: float | None = None


# -- the session -------------------------------------------------------------------------------------
class RealtimeSession:
    def __init__(self, ws: WebSocket, st, dialect: str, dialect_fixed: bool, speech: SpeechSource | None = None):
        self.ws, self.st = ws, st
        self.dialect, self.dialect_fixed = dialect, dialect_fixed
        self.id = new_id("sess")
        omni = st.omni
        voices = omni.voices
        default_voice = "Ethan" if "Ethan" in voices else (voices[0] if voices else None)
        self.cfg = SessionConfig(voice=default_voice, audio_out=omni.can_speak, temperature=0.6)
        self.items: list[Item] = []
        self.buffer = AudioBuffer()
        self.images: list[bytes] = []
        # each earlier clip's mel features and camera frame's patches, made once (every turn re-sends them)
        self.media_cache = MediaCache()
        self.speech_override = speech  # a SpeechSource given here wins over the engine's speech stage
        self.speech = speech or ReferenceSpeech(st)
        self.response: RealtimeResponse | None = None
        self._send_lock = asyncio.Lock()
        self._resampler = None
        self._resampler_rate = None
        self._vad: SileroVAD | None = None
        self._detector: TurnDetector | None = None
        self._vad_origin = 0  # absolute sample where the detector's stream began
        self._vad_queue: asyncio.Queue | None = None
        self._vad_task: asyncio.Task | None = None
        self._turn_start: int | None = None  # absolute sample where the current spoken turn begins
        self._turn_item_id: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._after: asyncio.Task | None = None  # a response waiting for the current one to end
        self.closed = False

    # -- plumbing ------------------------------------------------------------------------------
    async def send(self, event: dict) -> None:
        if self.closed:
            return
        event.setdefault("event_id", new_id("event"))
        event["type"] = event_name(event["type"], self.dialect)
        data = json.dumps(event, ensure_ascii=False)
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                return
            try:
                await self.ws.send_text(data)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.closed = True

    async def emit(self, resp: RealtimeResponse, event: dict) -> None:
        """An event of `resp`, unless the response was cancelled meanwhile."""
        if not resp.finished:
            await self.send(event)

    async def error(self, exc: ProtocolError | str, event_id: str | None = None, **kw) -> None:
        if isinstance(exc, ProtocolError):
            await self.send(error_event(exc.message, type=exc.type, code=exc.code, param=exc.param,
                                        event_id=exc.event_id or event_id))
        else:
            await self.send(error_event(exc, event_id=event_id, **kw))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def session_dump(self) -> dict:
        return self.cfg.dump(self.dialect, session_id=self.id, model=self.st.model_name)

    # -- the socket loop --------------------------------------------------------------------------
    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.session_dump()})
        self._configure_vad()
        try:
            while not self.closed:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    try:
                        text = message["bytes"].decode("utf-8")
                    except UnicodeDecodeError:
                        await self.error("binary messages must be UTF-8 JSON events", code="invalid_json")
                        continue
                await self.handle(text or "")
        except WebSocketDisconnect:
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closed and not self._tasks and self._vad_task is None:
            return
        resp = self.response
        if resp is not None and not resp.finished:
            resp.finished = True
            resp.status = "cancelled"
            if resp.task is not None:
                resp.task.cancel()
        self.closed = True
        tasks = [t for t in [*self._tasks, self._vad_task, self._after, resp.task if resp else None] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._vad_task = None

    async def handle(self, text: str) -> None:
        try:
            event = json.loads(text)
        except json.JSONDecodeError as exc:
            await self.error(f"the message is not valid JSON: {exc.msg} (at character {exc.pos})", code="invalid_json")
            return
        if not isinstance(event, dict):
            await self.error("an event must be a JSON object with a 'type'", code="invalid_event")
            return
        kind = event.get("type")
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        if not isinstance(kind, str) or kind not in CLIENT_EVENTS:
            await self.error(f"unknown event type {kind!r}; expected one of {', '.join(CLIENT_EVENTS)}",
                             event_id=event_id, code="invalid_event", param="type")
            return
        handler = getattr(self, "on_" + kind.replace(".", "_"))
        try:
            await handler(event)
        except ProtocolError as exc:
            exc.event_id = exc.event_id or event_id
            await self.error(exc)
        except (APIError, InputError) as exc:
            message = exc.message if isinstance(exc, APIError) else str(exc)
            await self.error(message, event_id=event_id, param=getattr(exc, "param", None),
                             code=getattr(exc, "code", None))
        except EngineDead as exc:
            await self.error(str(exc), event_id=event_id, type="server_error", code="broken")
        except Exception as exc:  # noqa: BLE001 - a bug costs the event, not the session
            log.exception("realtime %s: %s failed", self.id, kind, exc_info=exc)
            await self.error(f"internal server error ({type(exc).__name__})", event_id=event_id, type="server_error")

    # -- session ----------------------------------------------------------------------------------
    def _check_voice(self, name: Any, param: str) -> str:
        omni = self.st.omni
        if not isinstance(name, str):
            raise ProtocolError(f"{param} must be a string", param=param)
        if not omni.can_speak:
            raise ProtocolError("this server has no talker: audio output is not available", param=param)
        for v in omni.voices:
            if v.lower() == name.lower():
                return v
        raise ProtocolError(f"unknown voice {name!r}; choose one of {', '.join(omni.voices)}", param=param,
                            code="invalid_voice")

    async def on_session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ProtocolError("session.update needs a 'session' object", param="session")
        dialect = self.dialect
        if not self.dialect_fixed:
            dialect = dialect_of_session(session) or dialect
        cfg = apply_session_update(self.cfg, session, dialect, self._check_voice)
        if cfg.audio_out and not self.st.omni.can_speak:
            raise ProtocolError("this server has no talker: ask for text output only", param="session")
        self.dialect = dialect
        rate_changed = cfg.input_rate != self.cfg.input_rate
        vad_changed = (cfg.turn_detection is None) != (self.cfg.turn_detection is None)
        self.cfg = cfg
        if rate_changed:
            self._resampler = None
        if vad_changed:
            self._configure_vad()
        elif self._detector is not None and cfg.turn_detection is not None:
            self._detector.threshold = cfg.turn_detection.threshold
            self._detector.neg_threshold = max(cfg.turn_detection.threshold - 0.15, 0.01)
            fresh = TurnDetector(cfg.turn_detection.threshold, cfg.turn_detection.prefix_padding_ms,
                                 cfg.turn_detection.silence_duration_ms)
            self._detector.prefix = fresh.prefix
            self._detector.silence_frames = fresh.silence_frames
        await self.send({"type": "session.updated", "session": self.session_dump()})

    # -- audio in ------------------------------------------------------------------------------------
    def _resample(self, x: np.ndarray) -> np.ndarray:
        rate = self.cfg.input_rate
        if rate == MODEL_RATE:
            return x
        import soxr

        if self._resampler is None or self._resampler_rate != rate:
            self._resampler = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32")
            self._resampler_rate = rate
        return self._resampler.resample_chunk(x)

    async def on_input_audio_buffer_append(self, event: dict) -> None:
        raw = _b64(event.get("audio"), "audio")
        if len(raw) % 2:
            raise ProtocolError("pcm16 audio must have an even number of bytes", param="audio")
        if len(self.buffer) / MODEL_RATE > MAX_BUFFER_S:
            raise ProtocolError(f"the input audio buffer holds more than {MAX_BUFFER_S} s; commit or clear it",
                                code="input_audio_buffer_full")
        if len(raw) > 256 * 1024:
            x = await asyncio.to_thread(lambda: self._resample(pcm16_to_float(raw)))
        else:
            x = self._resample(pcm16_to_float(raw))
        x = np.asarray(x, dtype=np.float32)
        self.buffer.append(x)
        if self._vad_queue is not None:
            self._vad_queue.put_nowait(x)

    async def on_input_audio_buffer_clear(self, event: dict) -> None:
        self.buffer.clear()
        self._resampler = None
        if self._detector is not None:
            self._detector.reset()
        self._turn_start = None
        self._turn_item_id = None
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_input_audio_buffer_commit(self, event: dict) -> None:
        if self._resampler is not None:  # what the resampler still holds belongs to this turn
            self.buffer.append(np.asarray(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True),
                                          dtype=np.float32))
            self._resampler = None
        ms = len(self.buffer) * 1000 // MODEL_RATE
        if ms < MIN_COMMIT_MS:
            raise ProtocolError(f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, but the buffer "
                                f"holds {ms} ms", code="input_audio_buffer_commit_empty")
        start = self._turn_start if self._turn_start is not None else None
        audio = self.buffer.take(start)
        item_id = self._turn_item_id or new_id("item")
        if self._detector is not None:
            self._detector.reset()
        self._turn_start = self._turn_item_id = None
        await self._commit(audio, item_id)

    async def _commit(self, audio: np.ndarray, item_id: str) -> Item:
        item = Item(id=item_id, role="user", audio=audio, images=self._take_images())
        previous = self.items[-1].id if self.items else None
        self.items.append(item)
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item.id})
        await self._item_created(item, previous)
        if self.cfg.transcribe_input:
            self.spawn(self._transcribe(item))
        return item

    async def _item_created(self, item: Item, previous: str | None) -> None:
        await self.send({"type": "conversation.item.created", "previous_item_id": previous,
                         "item": item.dump(self.dialect)})

    def _take_images(self) -> list[bytes]:
        images, self.images = self.images[-MAX_FRAMES_PER_TURN:], []
        return images

    async def on_input_image_buffer_append(self, event: dict) -> None:
        raw = _b64(event.get("image"), "image")
        if len(raw) > MAX_IMAGE_BYTES:
            raise ProtocolError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param="image")
        if not (raw[:3] == b"\xff\xd8\xff" or raw[:8] == b"\x89PNG\r\n\x1a\n"):
            raise ProtocolError("the image must be a JPEG (or PNG) file, base64-encoded", param="image",
                                code="invalid_image")
        self.images = (self.images + [raw])[-MAX_FRAMES_PER_TURN:]

    # -- server VAD ------------------------------------------------------------------------------------
    def _configure_vad(self) -> None:
        td = self.cfg.turn_detection
        if self._vad_task is not None:
            self._vad_task.cancel()
            self._vad_task = None
        self._vad_queue = None
        self._detector = None
        self._turn_start = self._turn_item_id = None
        if td is None:
            return
        self._detector = TurnDetector(td.threshold, td.prefix_padding_ms, td.silence_duration_ms)
        self._vad_origin = self.buffer.end
        self._vad_queue = asyncio.Queue()
        self._vad_task = asyncio.ensure_future(self._vad_loop(self._vad_queue, self._detector))

    async def _vad_loop(self, queue: asyncio.Queue, detector: TurnDetector) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._vad is None:
                self._vad = await loop.run_in_executor(_VAD_POOL, SileroVAD)
            else:
                await loop.run_in_executor(_VAD_POOL, self._vad.reset)
            while True:
                chunks = [await queue.get()]
                while not queue.empty():
                    chunks.append(queue.get_nowait())
                x = np.concatenate(chunks)
                probs = await loop.run_in_executor(_VAD_POOL, self._vad, x)
                if detector is not self._detector:
                    return
                for ev in detector.push(probs):
                    if ev.kind == "start":
                        await self._speech_started(self._vad_origin + ev.sample)
                    else:
                        await self._speech_stopped(self._vad_origin + ev.sample)
                if not detector.speaking and self._turn_start is None:
                    self.buffer.drop_before(self.buffer.end - int(IDLE_KEEP_S * MODEL_RATE))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - VAD failure is reported; manual turns still work
            log.exception("realtime %s: VAD failed", self.id, exc_info=exc)
            await self.error(f"voice activity detection failed: {exc}", type="server_error", code="vad_failed")

    async def _speech_started(self, start: int) -> None:
        self._turn_start = start
        self._turn_item_id = new_id("item")
        await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": start * 1000 // MODEL_RATE,
                         "item_id": self._turn_item_id})
        td = self.cfg.turn_detection
        if td is not None and td.interrupt_response:
            await self.cancel_response("turn_detected")

    async def _speech_stopped(self, end: int) -> None:
        item_id = self._turn_item_id or new_id("item")
        start = self._turn_start if self._turn_start is not None else self.buffer.start
        self._turn_start = self._turn_item_id = None
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end * 1000 // MODEL_RATE,
                         "item_id": item_id})
        audio = self.buffer.take(start, end + TAIL_MS * MODEL_RATE // 1000)
        if len(audio) * 1000 // MODEL_RATE < MIN_COMMIT_MS:
            return
        await self._commit(audio, item_id)
        td = self.cfg.turn_detection
        if td is not None and td.create_response:
            self._start_response_when_free(None)

    def _start_response_when_free(self, overrides: dict | None) -> None:
        """A VAD turn's response; if one is still running (interrupt_response off) it follows it."""
        resp = self.response
        if resp is None or resp.finished:
            self._create_response(overrides)
            return
        previous = resp.task

        async def later():
            await asyncio.gather(previous, return_exceptions=True)
            if not self.closed and (self.response is None or self.response.finished):
                self._create_response(overrides)

        self._after = self.spawn(later())

    # -- items ---------------------------------------------------------------------------------------
    async def on_conversation_item_create(self, event: dict) -> None:
        item = await self._parse_item(event.get("item"))
        previous = event.get("previous_item_id")
        if previous is None or previous == "root":
            index = 0 if previous == "root" else len(self.items)
        else:
            ids = [i.id for i in self.items]
            if previous not in ids:
                raise ProtocolError(f"previous_item_id {previous!r} is not in the conversation",
                                    param="previous_item_id", code="item_not_found")
            index = ids.index(previous) + 1
        if any(i.id == item.id for i in self.items):
            raise ProtocolError(f"an item with id {item.id!r} already exists", param="item.id",
                                code="duplicate_item_id")
        if item.role == "user" and self.images:
            item.images = self._take_images() + item.images
        self.items.insert(index, item)
        await self._item_created(item, self.items[index - 1].id if index > 0 else None)
        if item.role == "user" and item.audio is not None and self.cfg.transcribe_input:
            self.spawn(self._transcribe(item))

    async def _parse_item(self, raw: Any) -> Item:
        if not isinstance(raw, dict):
            raise ProtocolError("conversation.item.create needs an 'item' object", param="item")
        if raw.get("type", "message") != "message":
            raise ProtocolError(f"item type {raw.get('type')!r} is not supported; use 'message'", param="item.type")
        role = raw.get("role")
        if role not in ("user", "assistant", "system"):
            raise ProtocolError("item.role must be 'user', 'assistant' or 'system'", param="item.role")
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("item.content must be a non-empty list of content parts", param="item.content")
        item_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else new_id("item")
        item = Item(id=item_id, role=role)
        texts: list[str] = []
        audio: list[np.ndarray] = []
        for j, part in enumerate(content):
            param = f"item.content.{j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if role == "assistant":
                if kind in ("text", "output_text"):
                    texts.append(_str(part.get("text"), f"{param}.text"))
                elif kind in ("audio", "output_audio"):
                    texts.append(_str(part.get("transcript") or "", f"{param}.transcript"))
                    item.spoken = True
                else:
                    raise ProtocolError(f"assistant content type {kind!r} is not supported", param=f"{param}.type")
                continue
            if kind in ("input_text", "text"):
                texts.append(_str(part.get("text"), f"{param}.text"))
            elif kind == "input_audio" and role == "user":
                raw_audio = _b64(part.get("audio"), f"{param}.audio")
                if len(raw_audio) % 2:
                    raise ProtocolError("pcm16 audio must have an even number of bytes", param=f"{param}.audio")
                audio.append(await asyncio.to_thread(_to_model_rate, raw_audio, self.cfg.input_rate))
                if isinstance(part.get("transcript"), str):
                    item.transcript = part["transcript"]
            elif kind == "input_image" and role == "user":
                url = part.get("image_url")
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise ProtocolError("input_image needs image_url as a base64 data: URL", param=f"{param}.image_url")
                _, _, payload = url.partition(",")
                item.images.append(_b64(payload, f"{param}.image_url"))
            else:
                raise ProtocolError(f"{role} content type {kind!r} is not supported", param=f"{param}.type")
        item.text = "".join(texts)
        if audio:
            item.audio = np.concatenate(audio)
        return item

    async def on_conversation_item_delete(self, event: dict) -> None:
        item_id = event.get("item_id")
        for i, item in enumerate(self.items):
            if item.id == item_id:
                del self.items[i]
                await self.send({"type": "conversation.item.deleted", "item_id": item_id})
                return
        raise ProtocolError(f"no item {item_id!r} in the conversation", param="item_id", code="item_not_found")

    async def on_conversation_item_retrieve(self, event: dict) -> None:
        item = self._item(event.get("item_id"))
        await self.send({"type": "conversation.item.retrieved", "item": item.dump(self.dialect)})

    def _item(self, item_id: Any) -> Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise ProtocolError(f"no item {item_id!r} in the conversation", param="item_id", code="item_not_found")

    async def on_conversation_item_truncate(self, event: dict) -> None:
        """The client heard only `audio_end_ms` of an answer: the rest leaves the conversation."""
        item = self._item(event.get("item_id"))
        if item.role != "assistant" or not item.spoken:
            raise ProtocolError("only spoken assistant items can be truncated", param="item_id")
        end = event.get("audio_end_ms")
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            raise ProtocolError("audio_end_ms must be a non-negative integer", param="audio_end_ms")
        resp = self.response
        if resp is not None and resp.item is item and not resp.finished:
            await self.cancel_response("client_cancelled")
        if end < item.audio_ms:
            heard = end / item.audio_ms if item.audio_ms else 0.0
            item.text = truncate_text(item.text, heard)
            item.audio_ms = end
            item.truncated = True
        await self.send({"type": "conversation.item.truncated", "item_id": item.id,
                         "content_index": event.get("content_index", 0), "audio_end_ms": item.audio_ms})

    async def on_output_audio_buffer_clear(self, event: dict) -> None:
        await self.cancel_response("client_cancelled")
        await self.send({"type": "output_audio_buffer.cleared", "response_id": self.response.id if self.response else None})

    # -- responses -------------------------------------------------------------------------------------
    async def on_response_create(self, event: dict) -> None:
        overrides = event.get("response")
        if overrides is not None and not isinstance(overrides, dict):
            raise ProtocolError("response must be an object", param="response")
        resp = self.response
        if resp is not None and not resp.finished:
            raise ProtocolError(f"the conversation already has an active response ({resp.id}); cancel it first",
                                code="conversation_already_has_active_response")
        self._create_response(overrides)

    def _params(self, overrides: dict | None) -> ResponseParams:
        cfg = self.cfg
        o = overrides or {}
        audio_out = cfg.audio_out
        mods = o.get("output_modalities", o.get("modalities"))
        if mods is not None:
            if not isinstance(mods, list) or any(m not in ("text", "audio") for m in mods) or not mods:
                raise ProtocolError("response.output_modalities must be a list of 'text' / 'audio'",
                                    param="response.output_modalities")
            audio_out = "audio" in mods
        voice = cfg.voice
        v = o.get("voice")
        audio = o.get("audio")
        if v is None and isinstance(audio, dict) and isinstance(audio.get("output"), dict):
            v = audio["output"].get("voice")
        if v is not None:
            voice = self._check_voice(v, "response.voice")
        if audio_out and (voice is None or not self.st.omni.can_speak):
            raise ProtocolError("this server has no talker: ask for text output only", param="response")
        max_tokens = cfg.max_output_tokens
        raw_max = o.get("max_output_tokens", o.get("max_response_output_tokens"))
        if raw_max is not None:
            max_tokens = None if raw_max == "inf" else _int(raw_max, "response.max_output_tokens", 1, 1_000_000)
        temperature = cfg.temperature
        if o.get("temperature") is not None:
            t = o["temperature"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2:
                raise ProtocolError("response.temperature must be in [0, 2]", param="response.temperature")
            temperature = float(t)
        instructions = cfg.instructions
        if isinstance(o.get("instructions"), str):
            instructions = o["instructions"]
        return ResponseParams(instructions, audio_out, voice, max_tokens or DEFAULT_MAX_TOKENS, temperature)

    def _create_response(self, overrides: dict | None) -> RealtimeResponse | None:
        try:
            params = self._params(overrides)
        except ProtocolError as exc:
            self.spawn(self.error(exc))
            return None
        resp = RealtimeResponse(id=new_id("resp"), params=params)
        self.response = resp
        resp.task = asyncio.ensure_future(self._run_response(resp))
        return resp

    def _messages(self, params: ResponseParams, skip: int = 0) -> list[dict]:
        messages = []
        if params.instructions:
            messages.append({"role": "system", "content": params.instructions})
        for item in self.items[skip:]:
            msg = item.message()
            if msg is not None:
                messages.append(msg)
        return messages

    def _response_dump(self, resp: RealtimeResponse) -> dict:
        p = resp.params
        out = {"id": resp.id, "object": "realtime.response", "status": resp.status,
               "status_details": resp.status_details, "output": [resp.item.dump(self.dialect)] if resp.item else [],
               "conversation_id": self.id, "usage": self._usage(resp) if resp.status != "in_progress" else None,
               "metadata": None}
        max_tokens = p.max_tokens
        if self.dialect == BETA:
            out.update(modalities=["text", "audio"] if p.audio_out else ["text"], voice=p.voice,
                       output_audio_format="pcm16", temperature=p.temperature, max_output_tokens=max_tokens)
        else:
            out.update(output_modalities=["audio"] if p.audio_out else ["text"], max_output_tokens=max_tokens,
                       audio={"output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": p.voice}})
        return out

    def _usage(self, resp: RealtimeResponse) -> dict:
        m = resp.by_modality
        frames = resp.audio_made * 25 // (2 * OUTPUT_RATE)  # codec frames at 12.5/s
        return {"total_tokens": resp.prompt_tokens + resp.output_tokens + frames, "input_tokens": resp.prompt_tokens,
                "output_tokens": resp.output_tokens + frames,
                "input_token_details": {"text_tokens": m.get("text", 0), "audio_tokens": m.get("audio", 0),
                                        "image_tokens": m.get("image", 0) + m.get("video", 0),
                                        "cached_tokens": resp.cached_tokens},
                "output_token_details": {"text_tokens": resp.output_tokens, "audio_tokens": frames}}

    def _part(self, resp: RealtimeResponse) -> dict:
        if resp.params.audio_out:
            return {"type": "audio" if self.dialect == BETA else "output_audio", "transcript": resp.text}
        return {"type": "text" if self.dialect == BETA else "output_text", "text": resp.text}

    def _ids(self, resp: RealtimeResponse) -> dict:
        return {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0, "content_index": 0}

    def _streams_speech(self) -> bool:
        """Speak through the engine's streaming speech stage (audio while the thinker writes),
        unless a SpeechSource was given; without a stage, the reference path after the text."""
        return self.st.engine.speech is not None and self.speech_override is None

    async def _make_request(self, resp: RealtimeResponse, sampling, speaker: str | None):
        """The conversation as one engine request; the oldest turns go when it does not fit."""
        st = self.st
        omni = st.omni
        limit = omni.engine.max_model_len
        skip = 0
        while True:
            messages = self._messages(resp.params, skip)
            if not any(m["role"] == "user" for m in messages):
                raise ProtocolError("there is no user turn to answer: commit audio or create a user item first",
                                    code="no_user_input")
            try:
                # per-clip audio features: earlier turns' clips stay as they were, so their KV is reused;
                # the media cache processes only the clips and frames not seen in earlier turns
                req = await st.run_cpu(omni.make_request, messages, sampling, speaker=speaker, audio_per_clip=True,
                                       media_cache=self.media_cache)
            except InputError:
                raise
            except Exception as exc:  # media the decoders refuse (a corrupt camera frame)
                raise InputError(f"cannot decode the media of the conversation: {exc}") from exc
            if len(req.prompt_ids) + min(64, sampling.max_new_tokens) <= limit:
                return req
            if skip >= len(self.items) - 1:
                raise ContextLengthError(f"the latest turn alone is {len(req.prompt_ids)} tokens; the model's "
                                         f"context is {limit} tokens")
            skip += 1

    async def _run_response(self, resp: RealtimeResponse) -> None:
        st = self.st
        p = resp.params
        release = None
        stream = None
        audio_task = None
        try:
            await self.emit(resp, {"type": "response.created", "response": self._response_dump(resp)})
            st.require_ready()  # draining or broken: no new answers
            release = st.admit(1)
            item = Item(id=new_id("item"), role="assistant", status="in_progress", spoken=p.audio_out)
            sampling = sampling_from("conversational", temperature=p.temperature, max_new_tokens=p.max_tokens)
            req = await self._make_request(resp, sampling, p.voice if p.audio_out else None)
            req.request_id = resp.id
            req.speech_max_frames = st.max_speech_frames
            resp.prompt_tokens = len(req.prompt_ids)
            resp.by_modality = omni_counts(st.omni, req.prompt_ids)
            st.metrics.prompt_tokens.labels(st.model_name).inc(len(req.prompt_ids))
            if resp.finished:
                return
            previous = self.items[-1].id if self.items else None
            self.items.append(item)
            resp.item = item
            await self.emit(resp, {"type": "response.output_item.added", "response_id": resp.id, "output_index": 0,
                                   "item": item.dump(self.dialect)})
            await self.emit(resp, {"type": "conversation.item.created", "previous_item_id": previous,
                                   "item": item.dump(self.dialect)})
            await self.emit(resp, {"type": "response.content_part.added", **self._ids(resp), "part": self._part(resp)})
            staged = None
            if p.audio_out and self._streams_speech():
                staged = StageSpeech()
                stream = st.engine.add(req, speak=True, max_frames=st.max_speech_frames)
            else:
                stream = st.engine.add(req)
            text_done: asyncio.Future = asyncio.get_running_loop().create_future()
            if p.audio_out:
                audio_task = asyncio.ensure_future(self._send_audio(resp, req, text_done, staged or self.speech))
            from .outputs import TextPipeline

            processor = st.omni.processor
            pipe = TextPipeline(lambda ids: processor.decode(ids, skip_special_tokens=True), [], parse_tools=False)
            delta_type = "response.output_audio_transcript.delta" if p.audio_out else "response.output_text.delta"
            async for ev in stream:
                if staged is not None and ev.audio is not None and len(ev.audio):
                    staged.feed(to_pcm16(ev.audio))
                if not ev.token_ids:
                    continue
                pieces = pipe.feed(ev.token_ids)
                if pieces.content:
                    resp.text += pieces.content
                    item.text = resp.text
                    await self.emit(resp, {"type": delta_type, **self._ids(resp), "delta": pieces.content})
            if staged is not None:
                staged.feed(None)
            tail = pipe.finish()
            if tail.content:
                resp.text += tail.content
                item.text = resp.text
                await self.emit(resp, {"type": delta_type, **self._ids(resp), "delta": tail.content})
            resp.output_tokens = stream.num_tokens
            resp.cached_tokens = req.num_cached_tokens or 0
            st.metrics.observe_stream(stream, resp.created_at)
            text_done.set_result(stream.finish_reason)
            if audio_task is not None:
                await audio_task
            resp.text = resp.text.strip()
            item.text = resp.text
            item.status = "completed"
            if p.audio_out:
                item.audio_ms = resp.audio_sent * 1000 // OUTPUT_RATE
                await self.emit(resp, {"type": "response.output_audio.done", **self._ids(resp)})
                await self.emit(resp, {"type": "response.output_audio_transcript.done", **self._ids(resp),
                                       "transcript": resp.text})
            else:
                await self.emit(resp, {"type": "response.output_text.done", **self._ids(resp), "text": resp.text})
            await self.emit(resp, {"type": "response.content_part.done", **self._ids(resp), "part": self._part(resp)})
            await self.emit(resp, {"type": "response.output_item.done", "response_id": resp.id, "output_index": 0,
                                   "item": item.dump(self.dialect)})
            if resp.finished:
                return
            resp.status = "completed" if stream.finish_reason != "length" else "incomplete"
            if resp.status == "incomplete":
                resp.status_details = {"type": "incomplete", "reason": "max_output_tokens"}
            await self._finish(resp)
        except asyncio.CancelledError:
            raise
        except (ProtocolError, APIError, InputError, EngineDead, Exception) as exc:  # noqa: BLE001
            if resp.finished:
                return
            if isinstance(exc, ProtocolError):
                code, message, kind = exc.code, exc.message, exc.type
            elif isinstance(exc, APIError):
                code, message, kind = exc.code, exc.message, exc.type
            elif isinstance(exc, InputError):
                code, message, kind = ("context_length_exceeded" if isinstance(exc, ContextLengthError) else None,
                                       str(exc), "invalid_request_error")
            else:
                if not isinstance(exc, EngineDead):
                    log.exception("realtime response %s failed", resp.id, exc_info=exc)
                code, message, kind = "server_error", f"the response failed: {exc}", "server_error"
            await self.send(error_event(message, type=kind, code=code))
            if resp.item is not None:
                resp.item.status = "incomplete"
            resp.status = "failed"
            resp.status_details = {"type": "failed", "error": {"type": kind, "code": code, "message": message}}
            await self._finish(resp)
        finally:
            if audio_task is not None and not audio_task.done():
                audio_task.cancel()
                await asyncio.gather(audio_task, return_exceptions=True)
            if stream is not None:
                stream.abort()
            if release is not None:
                release()

    async def _finish(self, resp: RealtimeResponse) -> None:
        if resp.finished:
            return
        resp.finished = True
        await self.send({"type": "response.done", "response": self._response_dump(resp)})
        m = self.st.metrics
        m.e2e.labels(m.model).observe(time.perf_counter() - resp.created_at)

    async def _send_audio(self, resp: RealtimeResponse, req, text_done: asyncio.Future, speech: SpeechSource) -> None:
        pacer = Pacer()
        step = OUTPUT_RATE * AUDIO_CHUNK_MS // 1000 * 2  # bytes
        source = speech.stream(req, text_done)
        try:
            async for pcm in source:
                resp.audio_made += len(pcm) // 2
                for start in range(0, len(pcm), step):
                    piece = pcm[start : start + step]
                    await pacer.wait(len(piece) // 2)
                    if resp.finished:
                        return
                    if resp.first_audio_at is None:
                        resp.first_audio_at = time.perf_counter()
                        m = self.st.metrics
                        m.first_audio.labels(m.model).observe(resp.first_audio_at - resp.created_at)
                    await self.emit(resp, {"type": "response.output_audio.delta", **self._ids(resp),
                                           "delta": base64.b64encode(piece).decode("ascii")})
                    resp.audio_sent += len(piece) // 2
                    resp.item.audio_ms = resp.audio_sent * 1000 // OUTPUT_RATE
        finally:
            await source.aclose()

    async def cancel_response(self, reason: str) -> bool:
        """Stop the response in progress now: no more of its events, its engine request aborted,
        its answer truncated to the audio sent. Returns False when none was in progress."""
        resp = self.response
        if resp is None or resp.finished:
            return False
        resp.finished = True
        resp.status = "cancelled"
        resp.status_details = {"type": "cancelled", "reason": reason}
        if resp.task is not None:
            resp.task.cancel()
        item = resp.item
        if item is not None:
            item.status = "incomplete"
            if item.spoken:
                heard = resp.audio_sent / resp.audio_made if resp.audio_made else 0.0
                item.text = truncate_text(resp.text, heard)
                item.audio_ms = resp.audio_sent * 1000 // OUTPUT_RATE
                item.truncated = True
                await self.send({"type": "conversation.item.truncated", "item_id": item.id, "content_index": 0,
                                 "audio_end_ms": item.audio_ms})
            await self.send({"type": "response.output_item.done", "response_id": resp.id, "output_index": 0,
                             "item": item.dump(self.dialect)})
        await self.send({"type": "response.done", "response": self._response_dump(resp)})
        return True

    async def on_response_cancel(self, event: dict) -> None:
        wanted = event.get("response_id")
        resp = self.response
        if resp is None or resp.finished or (wanted and wanted != resp.id):
            raise ProtocolError("there is no response in progress to cancel", code="response_cancel_not_active")
        await self.cancel_response("client_cancelled")

    # -- input transcription ---------------------------------------------------------------------------
    async def _transcribe(self, item: Item) -> None:
        st = self.st
        release = None
        stream = None
        try:
            release = st.admit(1)
            messages = [{"role": "user", "content": [{"type": "audio", "audio": item.audio},
                                                     {"type": "text", "text": TRANSCRIBE_PROMPT}]}]
            sampling = sampling_from(None, temperature=0.0, max_new_tokens=int(32 + 10 * item.audio_seconds))
            req = await st.run_cpu(st.omni.make_request, messages, sampling)
            req.request_id = new_id("transcribe")
            stream = st.engine.add(req)
            ids: list[int] = []
            async for ev in stream:
                ids.extend(ev.token_ids)
            eos = st.omni.engine.eos_token_ids
            text = st.omni.processor.decode([t for t in ids if t not in eos], skip_special_tokens=True).strip()
            item.transcript = text
            await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                             "content_index": 0, "transcript": text})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the item's transcription failure
            message = exc.message if isinstance(exc, APIError) else str(exc)
            await self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item.id,
                             "content_index": 0, "error": {"type": "transcription_error", "code": None,
                                                           "message": message, "param": None}})
        finally:
            if stream is not None:
                stream.abort()
            if release is not None:
                release()


def omni_counts(omni, ids: list[int]) -> dict:
    try:
        return omni.count_modalities(ids)
    except Exception:  # noqa: BLE001 - counts are informative only
        return {}


def _b64(value: Any, param: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{param} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{param} is not valid base64 ({exc})", param=param, code="invalid_base64") from None


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{param} must be a string", param=param)
    return value


def _int(value: Any, param: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{param} must be an integer in [{lo}, {hi}]", param=param)
    return value


def _to_model_rate(raw: bytes, rate: int) -> np.ndarray:
    x = pcm16_to_float(raw)
    if rate == MODEL_RATE:
        return x
    import soxr

    return soxr.resample(x, rate, MODEL_RATE).astype(np.float32)


# -- the socket route ------------------------------------------------------------------------------
def _offered_subprotocols(ws: WebSocket) -> list[str]:
    header = ws.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in header.split(",") if p.strip()]


def _api_key(ws: WebSocket, offered: list[str]) -> str | None:
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for p in offered:
        if p.startswith(SUBPROTOCOL_KEY) and len(p) > len(SUBPROTOCOL_KEY):
            return p[len(SUBPROTOCOL_KEY):]
    return None


async def _deny(ws: WebSocket, status: int, message: str, kind: str, code: str | None,
                headers: dict | None = None) -> None:
    """Refuse the handshake with an HTTP error (where the server can send one), else close 1008."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(error_body(message, kind, None, code), status_code=status,
                                                   headers=headers))
    else:
        await ws.close(code=1008 if status in (401, 403) else 1013, reason=message[:120])


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    st = ws.app.state.server
    offered = _offered_subprotocols(ws)
    if st.api_keys:
        key = _api_key(ws, offered)
        if key is None:
            return await _deny(ws, 401, "missing API key: send 'Authorization: Bearer <key>' or the subprotocol "
                               f"'{SUBPROTOCOL_KEY}<key>'", "authentication_error", "invalid_api_key")
        if not any(secrets.compare_digest(key.encode(), k.encode()) for k in st.api_keys):
            return await _deny(ws, 401, "invalid API key", "authentication_error", "invalid_api_key")
    if st.status != "ready":
        return await _deny(ws, 503, f"the server is {st.status}; retry shortly", "service_unavailable_error",
                           st.status, {"Retry-After": "5"})
    model = ws.query_params.get("model")
    if model and model not in (st.model_name, str(st.model_path or "")):
        return await _deny(ws, 404, f"the model {model!r} does not exist; this server serves {st.model_name!r}",
                           "invalid_request_error", "model_not_found")
    api = ws.query_params.get("api", "").lower()
    if api and api not in (GA, BETA):
        return await _deny(ws, 400, "the api query parameter must be 'ga' or 'beta'", "invalid_request_error", None)
    fixed = bool(api)
    if not api:
        beta = ws.headers.get("openai-beta", "").replace(" ", "").lower() == "realtime=v1" or SUBPROTOCOL_BETA in offered
        api = BETA if beta else GA
        fixed = beta
    subprotocol = "realtime" if "realtime" in offered else None
    await ws.accept(subprotocol=subprotocol)
    session = RealtimeSession(ws, st, api, fixed)
    log.info("realtime session %s opened (%s dialect)", session.id, api)
    try:
        await session.run()
    finally:
        log.info("realtime session %s closed", session.id)
        if ws.application_state == WebSocketState.CONNECTED:
            try:
                await ws.close()
            except (RuntimeError, OSError, WebSocketDisconnect):  # the client left first: nothing to close
                pass


# -- the voice page ----------------------------------------------------------------------------------
_ASSETS = {"voice.js": "text/javascript", "voice-worklet.js": "text/javascript", "voice.css": "text/css"}


def _web(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


@router.get("/voice", response_class=HTMLResponse)
async def voice_page(request: Request):
    from ..api import RANDOM_WEIGHTS_NOTICE

    st = request.app.state.server
    banner = ""
    if st.random_weights:
        banner = (f'<div id="demo-banner" class="demo">DEMO MODEL &mdash; {RANDOM_WEIGHTS_NOTICE}: what you hear '
                  f'is noise, not an answer. Start the server with <code>--model PATH</code> to talk to a real '
                  f'checkpoint.</div>')
    html = _web("voice.html").replace("<!--DEMO_BANNER-->", banner).replace("{{MODEL}}", escape(st.model_name))
    return HTMLResponse(html)


@router.get("/voice/{name}")
async def voice_asset(name: str):
    if name not in _ASSETS:
        raise APIError(404, f"no such file {name!r}", type="not_found_error")
    return Response(_web(name), media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})


__all__ = ["router", "RealtimeSession", "SpeechSource", "ReferenceSpeech", "Pacer", "AudioBuffer"]
