"""The server process: state, app factory, error handlers and the uvicorn run loop.

Life of the process:

    loading ──► ready ──► draining ──► (exit 0)        SIGTERM/SIGINT: finish what is running
       │          │                                     (new requests get 503), then stop
       └──────────┴────► broken ──► (exit 1)            the model failed to load or the engine
                                                        thread died: never hang, exit non-zero

The HTTP socket is open from the start, so /health answers "loading" while the model loads in a
background thread; /v1 routes answer 503 until ready.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, InputError, MediaError, MediaTooLargeError
from ..monitoring import register_system_metrics
from .async_engine import AsyncEngine, EngineDead
from .media import MB, MediaLimits, media_policy
from .metrics import Metrics
from .protocol import APIError, error_body

log = logging.getLogger("thinktalk.server")

DEMO_MODEL_NAME = "thinktalk-demo-tiny-random"
SAMPLE_RATE = 24000  # of the speech the model makes
_ENDPOINTS = ("/v1/chat/completions", "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
              "/v1/models", "/health", "/metrics", "/")


@dataclass
class ServeOptions:
    model: Path | None = None  # None: the demo model (tiny random weights)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    # browser origins allowed to call the API (CORS); empty: none besides the server's own pages
    cors_origins: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    device: str | None = None
    talker: bool = True
    max_queue: int = 64  # requests waiting for a place in the batch, beyond max_num_seqs
    max_num_seqs: int = 16
    allow_remote_media: bool = False
    allowed_local_media_path: Path | None = None
    max_request_mb: float = 128.0  # a request body (base64 media included)
    max_media_mb: float = 64.0  # one media item, decoded
    max_image_pixels: int = 50_000_000  # one image or video frame
    max_media_seconds: float = 3600.0  # one audio or video
    drain_timeout_s: float = 30.0
    max_speech_s: float | None = None  # cap on one spoken answer (None: the talker's own limit)
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU
    quantization: str | None = None  # fp8 | int8 | int4 (see weights/quant.py)
    kv_backend: str | None = None  # None: the engine's default
    max_model_len: int | None = None  # None: the model's
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + activations + KV
    max_prefill_tokens: int = 16384  # prompt tokens computed per step
    random_weights: bool = False  # full-size random weights, no checkpoint (benchmarks: --random-weights)


class ServerState:
    """Everything the routes share. Created before the model exists; `omni`/`engine` set when ready."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.demo = opts.model is None
        self.model_path: Path | None = opts.model
        if opts.served_model_name:
            self.model_name = opts.served_model_name
        elif opts.model is not None:
            self.model_name = Path(opts.model).resolve().name
        else:
            self.model_name = DEMO_MODEL_NAME
        self.created = int(time.time())
        self.status = "loading"
        self.broken_reason: str | None = None
        self.omni = None
        self.tokens = None  # token strings for logprobs, once the model is loaded
        self.engine: AsyncEngine | None = None
        self.metrics = Metrics(self.model_name)
        register_system_metrics(self.metrics.registry)  # GPU (NVML) and process gauges, read at scrape time
        self.media = media_policy(
            local_root=Path(opts.allowed_local_media_path).resolve() if opts.allowed_local_media_path else None,
            allow_remote=opts.allow_remote_media,
            limits=MediaLimits(max_bytes=int(opts.max_media_mb * MB), max_image_pixels=opts.max_image_pixels,
                               max_seconds=opts.max_media_seconds),
        )
        self.api_keys = [k for k in opts.api_keys if k]
        self.inflight = 0
        self.capacity = opts.max_num_seqs + opts.max_queue
        workers = max(2, min(4, os.cpu_count() or 2))
        self.cpu_pool = ThreadPoolExecutor(workers, thread_name_prefix="thinktalk-cpu")
        self.speech_pool = ThreadPoolExecutor(1, thread_name_prefix="thinktalk-speech")
        self.exit_code = 0
        self.uvicorn = None  # the uvicorn.Server, to stop it
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def max_speech_frames(self) -> int | None:
        if self.opts.max_speech_s is None or self.omni is None or self.omni.model.code2wav is None:
            return None
        frames_per_s = SAMPLE_RATE / self.omni.model.code2wav.total_upsample
        return max(1, math.ceil(self.opts.max_speech_s * frames_per_s))

    # -- state -----------------------------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        return self.omni.random_weights if self.omni is not None else self.demo

    def require_ready(self) -> None:
        if self.status == "ready":
            return
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry shortly", type="service_unavailable_error",
                           code="loading", headers={"Retry-After": "5"})
        if self.status == "draining":
            raise APIError(503, "the server is shutting down", type="service_unavailable_error", code="draining")
        raise APIError(503, f"the server is broken: {self.broken_reason}", type="service_unavailable_error",
                       code="broken")

    def check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not any(secrets.compare_digest(token.encode(), k.encode()) for k in self.api_keys):
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is None or name in (self.model_name, str(self.model_path or "")):
            return
        raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                       param="model", code="model_not_found")

    def admit(self, n: int = 1) -> Callable[[], None]:
        """Take n places of the queue or raise 429; returns the (idempotent) release function."""
        if self.inflight + n > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.capacity} requests in flight); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.inflight += n
        self.metrics.inflight.labels(self.model_name).set(self.inflight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight -= n
                self.metrics.inflight.labels(self.model_name).set(self.inflight)

        return release

    async def run_cpu(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Media decoding, tokenizing, audio encoding: off the event loop and off the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, lambda: fn(*args, **kwargs))

    async def run_speech(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.speech_pool, lambda: fn(*args))

    def health(self) -> dict[str, Any]:
        stats = dict(self.engine.stats) if self.engine is not None else {"running": 0, "waiting": 0, "kv_used_tokens": 0}
        out = {"status": self.status, "model": self.model_name, "random_weights": self.random_weights,
               "in_flight": self.inflight, **stats}
        if self.broken_reason:
            out["reason"] = self.broken_reason
        return out

    # -- transitions -----------------------------------------------------------------------------
    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        threading.Thread(target=self._load, name="thinktalk-load", daemon=True).start()

    def _load(self) -> None:
        from ..api import RANDOM_WEIGHTS_NOTICE, Omni
        from ..engine import EngineConfig

        opts = self.opts
        engine_config = EngineConfig(max_num_seqs=opts.max_num_seqs, max_model_len=opts.max_model_len,
                                     gpu_memory_utilization=opts.gpu_memory_utilization,
                                     max_prefill_tokens=opts.max_prefill_tokens)
        if opts.kv_backend is not None:
            engine_config.kv_backend = opts.kv_backend
        try:
            t0 = time.perf_counter()
            if opts.random_weights:
                from .random_model import load_random_omni

                omni = load_random_omni(device=opts.device, talker=opts.talker, engine_config=engine_config)
            else:
                omni = Omni.load(opts.model, device=opts.device, talker=opts.talker, engine_config=engine_config,
                                 dtype=opts.dtype, quantization=opts.quantization, progress=False)
        except BaseException as exc:  # noqa: BLE001 - any load failure ends the process, with its reason
            log.error("loading the model failed: %s", exc, exc_info=not isinstance(exc, (OSError, ValueError)))
            self.loop.call_soon_threadsafe(self.fail, f"loading the model failed: {exc}")
            return
        log.info("model loaded in %.1f s from %s", time.perf_counter() - t0, omni.path)
        if omni.can_speak and omni.device.type == "cuda":
            # capture the speech stage's CUDA graphs and code2wav chunk shapes now, not on the
            # first requests (each new chunk shape costs ~1 s the first time); the engine thread
            # has not started, so nothing else steps the stage meanwhile
            t1 = time.perf_counter()
            try:
                omni.speech_stage.warmup((1, 2, 4, 8, 16, 32))
                log.info("speech stage warmed up in %.1f s", time.perf_counter() - t1)
            except Exception:  # an optimisation only: serve without it rather than not at all
                log.exception("speech stage warm-up failed; the first requests will pay its costs")
        if omni.random_weights:
            log.warning("SERVING THE DEMO MODEL: %s", RANDOM_WEIGHTS_NOTICE)
        self.loop.call_soon_threadsafe(self._ready, omni)

    def _ready(self, omni) -> None:
        if self.status != "loading":
            return
        from .outputs import Tokens

        self.omni = omni
        self.model_path = omni.path
        self.tokens = Tokens(omni.processor)
        self.engine = AsyncEngine(
            omni.engine, speech=omni.speech_stage if omni.can_speak else None, on_stats=self.metrics.set_engine,
            on_fatal=lambda exc: self.loop.call_soon_threadsafe(self.fail, f"engine thread died: {exc!r}"),
        )
        self.engine.start(self.loop)
        self.status = "ready"
        voices = ", ".join(omni.voices) or "none (no talker)"
        log.info("ready: serving %r on http://%s:%s (voices: %s)", self.model_name, self.opts.host, self.opts.port, voices)

    def fail(self, reason: str) -> None:
        """Broken: report it on /health, stop soon with exit code 1 (a watchdog makes sure of it)."""
        if self.status == "broken":
            return
        self.status = "broken"
        self.broken_reason = reason
        self.exit_code = 1
        log.critical("server broken (%s); exiting", reason)
        _watchdog(15.0, 1)
        self.loop.call_later(1.0, self._stop_uvicorn)

    def start_draining(self) -> None:
        if self.status in ("draining", "broken"):
            return
        log.info("draining: %d request(s) in flight; new requests get 503", self.inflight)
        self.status = "draining"
        self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.opts.drain_timeout_s
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("drain timeout: %d request(s) still in flight", self.inflight)
        _watchdog(self.opts.drain_timeout_s + 15.0, self.exit_code)
        self._stop_uvicorn()

    def _stop_uvicorn(self) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self.speech_pool.shutdown(wait=False, cancel_futures=True)


def _watchdog(seconds: float, code: int) -> None:
    """Make sure the process ends even if something (a stuck connection, a thread) holds it up."""
    def kill():
        log.critical("exit watchdog: still running %.0f s after shutdown began; exiting now", seconds)
        os._exit(code or 1)

    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()


# -- app ------------------------------------------------------------------------------------------
class _RequestCounter:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would get in the way of disconnect handling)
    counting responses by endpoint and status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if endpoint not in ("/metrics", "/health"):
                self.state.metrics.count(endpoint, status["code"])


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while a body streams in past the limit; an HTTPException so that
    FastAPI's body parsing passes it on as it is (and the error handler answers 413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server's limit ({limit} bytes)")


class _BodyLimit:
    """Pure ASGI middleware: a request body larger than `limit` bytes is a 413, refused from its
    Content-Length before it is read, or as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            exc = BodyTooLarge(self.limit)
            response = _json_error(413, error_body(exc.detail, "invalid_request_error", None, "request_too_large"),
                                   {"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counting_receive, send)


def _json_error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python[json=int,python=int]"}


def _param_from_loc(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's dotted param, without union branch names
    ('str', 'list[...]') or a tagged union's tag (the 'image_url' of image_url.image_url.url)."""
    parts: list[str] = []
    for p in loc:
        p = str(p)
        if p in ("body", "query", "form") and not parts:
            continue
        if p in _TYPE_TAGS or "[" in p or (parts and parts[-1] == p):
            continue
        parts.append(p)
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _json_error(exc.status, exc.body(), exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else (
            "media_too_large" if isinstance(exc, MediaTooLargeError) else
            "invalid_media" if isinstance(exc, MediaError) else None)
        return _json_error(400, error_body(str(exc), "invalid_request_error", exc.param, code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # of a union's failed branches, the one that got furthest says best what is wrong
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
        loc = tuple(first.get("loc", ()))
        param = _param_from_loc(loc)
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            param = None
        else:
            message = f"{param or 'request'}: {first['msg']}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more error(s))"
        return _json_error(400, error_body(message, "invalid_request_error", param, None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        code = "request_too_large" if isinstance(exc, BodyTooLarge) else None
        return _json_error(exc.status_code, error_body(message, kind, None, code), getattr(exc, "headers", None))

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, exc: EngineDead):
        return _json_error(503, error_body(str(exc), "service_unavailable_error", None, "broken"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(500, error_body(f"internal server error ({type(exc).__name__})", "server_error"))


def create_app(opts: ServeOptions) -> FastAPI:
    from contextlib import asynccontextmanager

    from . import openai as routes

    state = ServerState(opts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="thinktalk", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(routes.router)
    from .realtime import router as realtime_router  # /v1/realtime and the /voice page
    app.include_router(realtime_router)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(_BodyLimit, limit=int(opts.max_request_mb * MB))
    app.add_middleware(_RequestCounter, state=state)
    if opts.cors_origins:  # outermost, so preflights are answered before the limits and the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(opts.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False, max_age=600)
    return app


_ERROR_SCHEMA = {
    "title": "ErrorResponse", "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with the errors this server really sends: 400 in OpenAI's shape where
    FastAPI documents its own 422 validation error."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {"description": "Invalid request", "content": {"application/json": {"schema": ref}}}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components["ErrorResponse"] = _ERROR_SCHEMA
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    from .. import __version__

    return __version__


# -- running --------------------------------------------------------------------------------------
def serve(opts: ServeOptions) -> int:
    """Run the server until stopped; returns the process exit code."""
    import uvicorn

    app = create_app(opts)
    state: ServerState = app.state.server

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # first signal: drain (finish in-flight requests, refuse new ones); second: stop now
            if state.status in ("ready", "loading") and state.loop is not None and not self.should_exit:
                state.loop.call_soon_threadsafe(state.start_draining)
                return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="info", access_log=True,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = _Server(config)
    state.uvicorn = server
    what = "the DEMO model (tiny random weights: its text and speech are meaningless)" if state.demo else str(opts.model)
    log.info("starting thinktalk server for %s as %r at http://%s:%s", what, state.model_name, opts.host, opts.port)
    server.run()
    if not server.started and state.exit_code == 0:
        return 1  # e.g. the port was taken
    return state.exit_code
