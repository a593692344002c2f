"""The engine (and the speech stage) in a thread of their own, fed by a thread-safe queue, read
through asyncio queues.

`Engine` and `SpeechStage` are not thread-safe, so exactly one thread (started here) touches
them: it takes adds, aborts and calls from `_inbox`, runs `engine.step()` and then `stage.step()`
while either has work, and hands each step's new tokens and speech to the event loop with one
`call_soon_threadsafe` per step. HTTP handlers never wait on the engine and the engine never waits
on HTTP.

A spoken request streams its PCM as the talker makes it, while the thinker is still writing:
its `RequestStream` yields token events and audio events in the order they were made, and ends
when both the text and the speech are finished.

If the engine thread dies, every open stream gets the error, `error` is set and `on_fatal` is
called (the server then reports broken and exits); nothing is left waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..request import Request

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine thread has stopped; no request can run any more."""


@dataclass
class EngineEvent:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None  # the text is finished
    error: BaseException | None = None
    audio: np.ndarray | None = None  # new float32 24 kHz PCM of a spoken request
    speech_finish_reason: str | None = None  # the speech is finished ("stop", "length", "empty", "abort")
    frames: int = 0  # codec frames spoken so far


class RequestStream:
    """The outputs of one engine request, consumed on the event loop with `async for`."""

    def __init__(self, engine: "AsyncEngine", req: Request, speak: bool = False, max_frames: int | None = None):
        self.engine = engine
        self.req = req
        self.speak = speak
        self.max_frames = max_frames
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.finish_reason: str | None = None
        self.speech_finish_reason: str | None = None if speak else "none"
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.first_audio_at: float | None = None
        self.last_audio_at: float | None = None
        self.num_tokens = 0
        self.audio_samples = 0
        self.frames = 0
        self._abort_sent = False

    @property
    def done(self) -> bool:
        """Nothing more will come: the text is finished, and the speech too if there is any."""
        return self.finish_reason is not None and self.speech_finish_reason is not None

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineEvent:
        if self.done:
            raise StopAsyncIteration
        ev = await self.queue.get()
        if ev.error is not None:
            self.finish_reason = self.finish_reason or "error"
            self.speech_finish_reason = self.speech_finish_reason or "error"
            raise ev.error
        t = time.perf_counter()
        if ev.token_ids:
            self.first_token_at = self.first_token_at or t
            self.last_token_at = t
            self.num_tokens += len(ev.token_ids)
        if ev.audio is not None and len(ev.audio):
            self.first_audio_at = self.first_audio_at or t
            self.last_audio_at = t
            self.audio_samples += len(ev.audio)
        self.frames = max(self.frames, ev.frames)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
        if ev.speech_finish_reason is not None:
            self.speech_finish_reason = ev.speech_finish_reason
        return ev

    def abort(self) -> None:
        """Stop generating and speaking (client gone, stop string seen); frees the request's KV in
        the engine and the talker.

        The stream ends when the engine confirms (finish events with reason "abort", or the
        request's own finish if it came first); iterate on to wait for that, or just drop the stream.
        """
        if not self.done and not self._abort_sent:
            self._abort_sent = True
            self.engine.abort(self.req.request_id)


class AsyncEngine:
    """engine: `Engine`; speech: the `SpeechStage` that speaks requests added with speak=True (or None)."""

    def __init__(self, engine, *, speech=None, on_stats: Callable[[dict], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.speech = speech
        self.on_stats = on_stats
        self.on_fatal = on_fatal
        self.error: BaseException | None = None
        self.stats: dict[str, int] = {"running": 0, "waiting": 0, "kv_used_tokens": 0}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only: text still coming
        self._speaking: dict[str, RequestStream] = {}  # engine thread only: speech still coming
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- any thread / event loop -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._publish_stats()  # the engine thread is not running yet: safe to read here
        self._thread = threading.Thread(target=self._run, name="thinktalk-engine", daemon=True)
        self._thread.start()

    def add(self, req: Request, *, speak: bool = False, max_frames: int | None = None) -> RequestStream:
        """Generate `req`; with speak=True the speech stage speaks it (req.speaker) as it is written."""
        self._check_alive()
        if speak and self.speech is None:
            raise InputError("this server has no streaming speech stage", param="speaker")
        stream = RequestStream(self, req, speak, max_frames)
        self._inbox.put(("add", stream))
        return stream

    def speak(self, req: Request, *, max_frames: int | None = None) -> RequestStream:
        """Speak a request whose answer is already complete (req.capture filled, finish_reason set),
        e.g. a forced answer (tts.py); the stream yields its audio."""
        self._check_alive()
        if self.speech is None:
            raise InputError("this server has no streaming speech stage", param="speaker")
        stream = RequestStream(self, req, True, max_frames)
        stream.finish_reason = req.finish_reason or "stop"
        self._inbox.put(("speak", stream))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between two steps (work on the thinker that is no request)."""
        self._check_alive()
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", fn, fut))
        return await fut

    def stop(self, timeout: float = 5.0) -> None:
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self.error is not None or self._thread is None or not self._thread.is_alive():
            raise EngineDead("the engine has stopped")

    # -- engine thread ---------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return self.engine.has_work() or (self.speech is not None and self.speech.has_work())

    def _run(self) -> None:
        try:
            while self._drain(block=not self._has_work()):
                if self.engine.has_work():
                    self._deliver(self.engine.step())
                if self.speech is not None and self.speech.has_work():
                    self._deliver_speech(self.speech.step())
                self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - the thread must report any death
            self.error = exc
            log.critical("engine thread died: %r", exc, exc_info=exc)
            try:
                if self.on_fatal is not None:  # first, so the server says broken before clients hear of it
                    self.on_fatal(exc)
            finally:
                self._fail_all(exc)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = item[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(item[1])
            elif kind == "speak":
                self._start_speech(item[1])
            elif kind == "abort":
                self._abort(item[1])
            elif kind == "call":
                fn, fut = item[1], item[2]
                try:
                    result = fn()
                except Exception as exc:  # goes to the caller; a failed call leaves the engine intact
                    self._resolve(fut, None, exc)
                else:
                    self._resolve(fut, result, None)

    def _add(self, stream: RequestStream) -> None:
        req = stream.req
        try:
            self.engine.add_request(req)
        except Exception as exc:  # noqa: BLE001 - refused before it joined: the engine is intact
            if not isinstance(exc, InputError):
                log.exception("engine refused request %s", req.request_id)
            self._post([(stream, EngineEvent(error=exc))])
            return
        self._streams[req.request_id] = stream
        if stream.speak and not self._start_speech(stream):
            self._streams.pop(req.request_id, None)
            self.engine.abort(req.request_id)

    def _start_speech(self, stream: RequestStream) -> bool:
        try:
            self.speech.add(stream.req, max_frames=stream.max_frames)
        except Exception as exc:  # noqa: BLE001 - e.g. no assistant turn to speak: that request only
            if not isinstance(exc, InputError):
                log.exception("speech stage refused request %s", stream.req.request_id)
            self._post([(stream, EngineEvent(error=exc))])
            return False
        self._speaking[stream.req.request_id] = stream
        return True

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._post([(stream, EngineEvent(finish_reason="abort"))])
        if self.speech is not None and request_id in self._speaking:
            self.speech.cancel(request_id)  # its final chunk (reason "abort") comes from the next step

    def _deliver(self, outputs) -> None:
        items = []
        for out in outputs:
            req = out.request
            stream = self._streams.get(req.request_id)
            if stream is None:
                continue
            if out.new_token is None:  # refused while running (Engine._refuse_out_of_memory)
                if out.finished and req.error is not None:
                    del self._streams[req.request_id]
                    items.append((stream, EngineEvent(error=req.error)))
                    if req.request_id in self._speaking:
                        self.speech.cancel(req.request_id)
                continue
            ev = EngineEvent(token_ids=[out.new_token])
            if req.sampling.logprobs is not None and req.output_logprobs:
                ev.logprobs = [req.output_logprobs[-1]]
            if out.finished:
                ev.finish_reason = req.finish_reason
                del self._streams[req.request_id]
            items.append((stream, ev))
        if items:
            self._post(items)

    def _deliver_speech(self, chunks) -> None:
        items = []
        for chunk in chunks:
            stream = self._speaking.get(chunk.request_id)
            if stream is None:
                continue
            ev = EngineEvent(audio=chunk.pcm, frames=chunk.frames)
            if chunk.finished:
                ev.speech_finish_reason = chunk.finish_reason or "stop"
                del self._speaking[chunk.request_id]
                self.speech.pop(chunk.request_id)
            items.append((stream, ev))
        if items:
            self._post(items)

    def _publish_stats(self) -> None:
        eng = self.engine
        stats = {
            "running": len(eng.running),
            "waiting": len(eng.waiting) + self._inbox.qsize(),
            "kv_used_tokens": sum(_kv_len(r) for r in eng.running),
        }
        stats.update(_kv_blocks(eng))
        if self.speech is not None:
            stats["speaking"] = len(self.speech.jobs)
            stats["talker_kv_tokens"] = self.speech.kv_tokens()
        self.stats = stats
        if self.on_stats is not None:
            self.on_stats(stats)

    def _post(self, items: list[tuple[RequestStream, EngineEvent]]) -> None:
        def dispatch():
            for stream, ev in items:
                stream.queue.put_nowait(ev)

        self._loop.call_soon_threadsafe(dispatch)

    def _resolve(self, fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        def settle():
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    def _fail_all(self, exc: BaseException) -> None:
        dead = EngineDead(f"the engine stopped: {exc!r}")
        streams = {id(s): s for s in [*self._streams.values(), *self._speaking.values()]}
        self._post([(s, EngineEvent(error=dead)) for s in streams.values()])
        self._streams.clear()
        self._speaking.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] in ("add", "speak"):
                self._post([(item[1], EngineEvent(error=dead))])
            elif item[0] == "call":
                self._resolve(item[2], None, dead)


def _kv_len(req: Request) -> int:
    kv = req.kv
    if kv is None:
        return 0
    length = getattr(kv, "length", None)
    if isinstance(length, int):
        return length
    return getattr(kv, "num_tokens", 0) or 0


def _kv_blocks(engine) -> dict[str, int]:
    """Free/total KV blocks where the engine has a paged cache that reports them."""
    bm = getattr(engine, "block_manager", None)
    free = getattr(bm, "num_free_blocks", None)
    total = getattr(bm, "num_blocks", None)
    if isinstance(free, int) and isinstance(total, int):
        return {"kv_free_blocks": free, "kv_total_blocks": total}
    return {}
