"""The engine in a thread of its own, fed by a thread-safe queue, read through asyncio queues.

`Engine` is not thread-safe, so exactly one thread (started here) touches it: it takes adds,
aborts and calls from `_inbox`, runs `engine.step()` while there is work, and hands each step's new
tokens to the event loop with one `call_soon_threadsafe` per step. HTTP handlers never wait on the
engine and the engine never waits on HTTP.

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

from ..errors import InputError
from ..request import Request

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine thread has stopped; no request can run any more."""


@dataclass
class EngineEvent:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class RequestStream:
    """The outputs of one engine request, consumed on the event loop with `async for`."""

    def __init__(self, engine: "AsyncEngine", req: Request):
        self.engine = engine
        self.req = req
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self._abort_sent = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineEvent:
        if self.done:
            raise StopAsyncIteration
        ev = await self.queue.get()
        if ev.error is not None:
            self.finish_reason = "error"
            raise ev.error
        if ev.token_ids:
            t = time.perf_counter()
            self.first_token_at = self.first_token_at or t
            self.last_token_at = t
            self.num_tokens += len(ev.token_ids)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
        return ev

    def abort(self) -> None:
        """Stop generating (client gone, stop string seen); frees the request's KV in the engine.

        The stream ends when the engine confirms (an "abort" finish event, or the request's own
        finish if it came first); iterate on to wait for that, or just drop the stream.
        """
        if not self.done and not self._abort_sent:
            self._abort_sent = True
            self.engine.abort(self.req.request_id)


class AsyncEngine:
    def __init__(self, engine, *, on_stats: Callable[[dict], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_stats = on_stats
        self.on_fatal = on_fatal
        self.error: BaseException | None = None
        self.stats: dict[str, int] = {"running": 0, "waiting": 0, "kv_used_tokens": 0}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- any thread / event loop -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._publish_stats()  # the engine thread is not running yet: safe to read here
        self._thread = threading.Thread(target=self._run, name="thinktalk-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def add(self, req: Request) -> RequestStream:
        self._check_alive()
        stream = RequestStream(self, req)
        self._inbox.put(("add", stream))
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
    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_work()):
                if self.engine.has_work():
                    self._deliver(self.engine.step())
                self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - the thread must report any death
            self.error = exc
            log.critical("engine thread died: %r", exc, exc_info=exc)
            self._fail_all(exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)

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
                stream = item[1]
                try:
                    self.engine.add_request(stream.req)
                except Exception as exc:  # noqa: BLE001 - refused before it joined: the engine is intact
                    if not isinstance(exc, InputError):
                        log.exception("engine refused request %s", stream.req.request_id)
                    self._post([(stream, EngineEvent(error=exc))])
                    continue
                self._streams[stream.req.request_id] = stream
            elif kind == "abort":
                self.engine.abort(item[1])
                stream = self._streams.pop(item[1], None)
                if stream is not None:
                    self._post([(stream, EngineEvent(finish_reason="abort"))])
            elif kind == "call":
                fn, fut = item[1], item[2]
                try:
                    result = fn()
                except Exception as exc:  # goes to the caller; a failed call leaves the engine intact
                    self._resolve(fut, None, exc)
                else:
                    self._resolve(fut, result, None)

    def _deliver(self, outputs) -> None:
        items = []
        for out in outputs:
            req = out.request
            stream = self._streams.get(req.request_id)
            if stream is None or out.new_token is None:
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

    def _publish_stats(self) -> None:
        eng = self.engine
        stats = {
            "running": len(eng.running),
            "waiting": len(eng.waiting) + self._inbox.qsize(),
            "kv_used_tokens": sum(_kv_len(r) for r in eng.running),
        }
        stats.update(_kv_blocks(eng))
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
        self._post([(s, EngineEvent(error=dead)) for s in self._streams.values()])
        self._streams.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "add":
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
