"""The OpenAI-compatible routes: models, chat completions (text and speech out), speech,
transcriptions and translations, plus /health, /metrics and the web page.

A chat request goes: validate (pydantic) -> admit (429 past capacity) -> content parts to our
messages (media.py) -> `Omni.make_request` in the CPU pool -> one engine request per choice ->
token events -> TextPipeline (detokenize, stop strings, reasoning, tool calls) -> speech (talker in
the speech pool) -> SSE chunks or one JSON body. Leaving early (client gone, stop string) aborts the
engine request, which frees its KV at once.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from .. import asr
from ..audio_out import MEDIA_TYPES, encode, to_pcm16
from ..errors import ContextLengthError, InputError, MediaError
from ..request import Request as EngineRequest
from ..request import sampling_from
from .app import SAMPLE_RATE, ServerState
from .async_engine import RequestStream
from .media import convert_messages, decode_audio, is_media_failure, too_large
from .outputs import ParsedToolCall, Pieces, TextPipeline
from .protocol import (
    TRANSCRIPT_FORMATS, APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceLogprobs, ChunkChoice, CompletionTokensDetails, Delta, DeltaAudio, MessageAudio, ModelCard, ModelList,
    PromptTokensDetails, ResponseFunction, ResponseMessage, ResponseToolCall, SpeechRequest,
    TokenLogprob, TopLogprob, Usage, bad_request, error_body, new_id, now,
)

log = logging.getLogger("thinktalk.server")
router = APIRouter()

WEB = Path(__file__).parent / "web"
AUDIO_CHUNK_S = 0.5  # streamed speech goes out in pieces of this length
AUDIO_EXPIRES_S = 3600


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def api(request: Request) -> ServerState:
    """Dependency of every /v1 route: the API key first, then readiness."""
    st = _state(request)
    st.check_auth(request)
    st.require_ready()
    return st


# -- plain routes -----------------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request):
    st = _state(request)
    return JSONResponse(st.health(), status_code=200 if st.status == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request):
    from .metrics import CONTENT_TYPE_LATEST

    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@lru_cache(maxsize=8)
def _web_file(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def index(request: Request):
    from ..api import RANDOM_WEIGHTS_NOTICE

    st = _state(request)
    banner = ""
    if st.random_weights:
        banner = (f'<div id="demo-banner" class="demo">DEMO MODEL &mdash; {RANDOM_WEIGHTS_NOTICE}. '
                  f'Start the server with <code>--model PATH</code> to serve a real checkpoint.</div>')
    html = _web_file("index.html").replace("<!--DEMO_BANNER-->", banner).replace("{{MODEL}}", escape(st.model_name))
    return HTMLResponse(html)


@router.get("/web/{name}")
async def web_asset(name: str):
    types = {"app.js": "text/javascript", "style.css": "text/css"}
    if name not in types:
        raise APIError(404, f"no such file {name!r}", type="not_found_error")
    return Response(_web_file(name), media_type=types[name])


def _model_card(st: ServerState) -> ModelCard:
    from ..api import RANDOM_WEIGHTS_NOTICE

    omni = st.omni
    extra = {"notice": RANDOM_WEIGHTS_NOTICE} if omni.random_weights else {}
    return ModelCard(
        id=st.model_name, created=st.created, root=str(st.model_path), random_weights=omni.random_weights,
        max_model_len=omni.engine.max_model_len, voices=omni.voices,
        input_modalities=["text", "image", "audio", "video"],
        output_modalities=["text", "audio"] if omni.can_speak else ["text"], **extra,
    )


@router.get("/v1/models")
async def list_models(st: ServerState = Depends(api)):
    return ModelList(data=[_model_card(st)]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, st: ServerState = Depends(api)):
    st.check_model(model_id)
    return _model_card(st).model_dump()


# -- shared pieces ------------------------------------------------------------------------------------
async def _make_request(st: ServerState, messages: list[dict], sampling, **kw) -> EngineRequest:
    """Omni.make_request in the CPU pool; media decoding failures are the client's (400)."""
    try:
        req = await st.run_cpu(st.omni.make_request, messages, sampling, **kw)
    except InputError as exc:
        exc.param = exc.param or "messages"
        raise
    except Exception as exc:
        if is_media_failure(exc):
            raise MediaError(f"cannot decode the media: {exc}", param="messages") from exc
        raise
    if len(req.prompt_ids) + 1 > st.omni.engine.max_model_len:
        raise ContextLengthError(
            f"the prompt is {len(req.prompt_ids)} tokens; the model's context is {st.omni.engine.max_model_len} tokens",
            param="messages")
    return req


def _clone(req: EngineRequest, request_id: str, seed: int | None) -> EngineRequest:
    """An independent copy of a prepared request for another choice (n > 1)."""
    copy = dataclasses.replace(
        req, request_id=request_id, sampling=dataclasses.replace(req.sampling, seed=seed, stop=list(req.sampling.stop)),
        output_ids=[], output_logprobs=[], kv=None, capture=None, generator=None,
    )
    if hasattr(req, "mm_inputs"):
        copy.mm_inputs = req.mm_inputs
    return copy


def _logprobs(st: ServerState, entries: list[dict], eos: set[int]) -> list[TokenLogprob]:
    tokens = st.tokens
    out = []
    for e in entries:
        if e["token"] in eos:
            continue
        text, raw = tokens.get(e["token"])
        top = []
        for tid, lp in e.get("top", []):
            t, b = tokens.get(tid)
            top.append(TopLogprob(token=t, logprob=lp, bytes=b))
        out.append(TokenLogprob(token=text, logprob=e["logprob"], bytes=raw, top_logprobs=top))
    return out


async def _until_disconnect(request: Request, work):
    """Await `work`; if the client goes away first, cancel it (its cleanup aborts engine requests)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.info("client disconnected from %s; request aborted", request.url.path)
        return Response(status_code=499)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


def _observe_speech(st: ServerState, stream: RequestStream, arrival: float) -> None:
    """First-audio latency, real-time factor and seconds spoken of a finished spoken request."""
    m = st.metrics
    seconds = stream.audio_samples / SAMPLE_RATE
    if stream.first_audio_at is not None:
        m.first_audio.labels(m.model).observe(stream.first_audio_at - arrival)
    if seconds > 0:
        # the talker starts with the answer's first tokens: its time runs from the first token
        start = stream.first_token_at or arrival
        m.rtf.labels(m.model).observe(max(stream.last_audio_at - start, 0.0) / seconds)
        m.audio_seconds.labels(m.model).inc(seconds)


class _Stream(StreamingResponse):
    """A streamed body whose cleanup (abort, release) runs however it ends: finished, client gone
    (starlette cancels the sender), or never started."""

    def __init__(self, gen, cleanup, media_type: str = "text/event-stream", headers: dict | None = None):
        extra = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} if media_type == "text/event-stream" else {}
        super().__init__(gen, media_type=media_type, headers={**extra, **(headers or {})})
        self._gen, self._cleanup = gen, cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._gen.aclose()
            finally:
                self._cleanup()


def _sse(obj: Any) -> str:
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


def _error_event(exc: BaseException) -> dict:
    if isinstance(exc, APIError):
        return exc.body()
    if isinstance(exc, InputError):
        return error_body(str(exc), "invalid_request_error", exc.param)
    return error_body(f"the request failed: {exc}", "server_error")


# -- chat completions -------------------------------------------------------------------------------
@dataclass
class _Update:
    pieces: Pieces | None = None
    logprobs: list[dict] = field(default_factory=list)
    audio: bytes | None = None  # pcm16 chunk
    finish_reason: str | None = None


@dataclass
class _Choice:
    index: int
    stream: RequestStream
    pipe: TextPipeline
    finish_reason: str | None = None
    audio_id: str = field(default_factory=lambda: new_id("audio"))
    pcm: list[np.ndarray] = field(default_factory=list)  # the spoken answer (non-streaming)
    transcript_sent: int = 0  # characters of the answer sent as audio transcript (streaming)


@dataclass
class _Chat:
    st: ServerState
    body: ChatCompletionRequest
    id: str
    created: int
    arrival: float
    voice: str | None
    choices: list[_Choice]
    prompt_tokens: int
    by_modality: dict[str, int]
    closed: bool = False

    async def run_choice(self, ch: _Choice) -> AsyncIterator[_Update]:
        """Text updates as tokens arrive and (with speech) pcm16 chunks as the talker makes them,
        interleaved, then the finish reason once both are done."""
        try:
            async for ev in ch.stream:
                if ev.token_ids or ev.logprobs:
                    pieces = ch.pipe.feed(ev.token_ids)
                    if pieces or ev.logprobs:
                        yield _Update(pieces=pieces, logprobs=ev.logprobs)
                    if ch.pipe.stopped:
                        ch.stream.abort()  # the rest (text and speech) is dropped
                if ev.finish_reason is not None and not ch.pipe.stopped:
                    tail = ch.pipe.finish()
                    if tail:
                        yield _Update(pieces=tail)
                if ev.audio is not None and len(ev.audio) and not ch.pipe.stopped:
                    if self.body.stream:
                        yield _Update(audio=await self.st.run_cpu(to_pcm16, ev.audio))
                    else:
                        ch.pcm.append(ev.audio)
            if ch.pipe.stopped:
                tail = ch.pipe.finish()
                if tail:
                    yield _Update(pieces=tail)
            reason = "stop" if ch.pipe.stopped else ch.stream.finish_reason
            if ch.pipe.tool_calls:
                reason = "tool_calls"
            self.st.metrics.observe_stream(ch.stream, self.arrival)
            if self.voice is not None:
                _observe_speech(self.st, ch.stream, self.arrival)
            ch.finish_reason = reason
            yield _Update(finish_reason=reason)
        finally:
            ch.stream.abort()  # no-op when finished; frees the KV of a request left early

    def close(self, release):
        """The idempotent end of a chat: abort what still runs, give the places back, time it."""
        def cleanup():
            if self.closed:
                return
            self.closed = True
            for ch in self.choices:
                ch.stream.abort()
            release()
            m = self.st.metrics
            m.e2e.labels(m.model).observe(time.perf_counter() - self.arrival)

        return cleanup

    async def updates(self) -> AsyncIterator[tuple[int, _Update]]:
        """All choices' updates, interleaved as they come."""
        gens = [self.run_choice(ch) for ch in self.choices]
        if len(gens) == 1:
            try:
                async for upd in gens[0]:
                    yield 0, upd
            finally:
                await gens[0].aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, gen):
            try:
                async for upd in gen:
                    await queue.put((i, upd))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, exc))
            finally:
                await gen.aclose()
                await queue.put((i, done))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self) -> Usage:
        completion = sum(ch.stream.num_tokens for ch in self.choices)
        reasoning = sum(ch.pipe.reasoning_tokens for ch in self.choices)
        audio_frames = sum(ch.stream.frames for ch in self.choices if self.voice is not None)
        m = self.by_modality
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(
                text_tokens=m.get("text", 0), image_tokens=m.get("image", 0), audio_tokens=m.get("audio", 0),
                video_tokens=m.get("video", 0)),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning, audio_tokens=audio_frames),
        )


def _tool_call_deltas(calls: list[ParsedToolCall], start: int) -> list[ResponseToolCall]:
    return [
        ResponseToolCall(index=start + k, id=c.id, type="function", function=ResponseFunction(name=c.name, arguments=c.arguments))
        for k, c in enumerate(calls)
    ]


def _sampling(body: ChatCompletionRequest, **overrides):
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    values = dict(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        max_new_tokens=body.max_completion_tokens or body.max_tokens, seed=body.seed, stop=body.stop or None,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    values.update(overrides)
    return sampling_from(body.preset, **values)


def _check_max_tokens(st: ServerState, value: int | None, param: str) -> None:
    """A limit the context can never hold is a mistake to report, not to clamp silently."""
    limit = st.omni.engine.max_model_len
    if value is not None and value > limit:
        raise bad_request(f"{param}={value} is more than the model's context ({limit} tokens)", param=param)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, st: ServerState = Depends(api)):
    arrival = time.perf_counter()
    st.check_model(body.model)
    omni = st.omni
    sampling = _sampling(body)
    _check_max_tokens(st, body.max_completion_tokens or body.max_tokens,
                      "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    voice = None
    if body.modalities and "audio" in body.modalities:
        if not omni.can_speak:
            raise bad_request("this server has no talker (a Thinking model or --no-talker): audio output is not "
                              "available", param="modalities")
        if body.audio is None:
            raise bad_request("modalities includes 'audio': give audio={'voice': ..., 'format': ...}", param="audio")
        try:
            voice = omni.check_speaker(body.audio.voice)
        except InputError as exc:
            raise bad_request(str(exc), param="audio.voice") from None
        if body.stream and body.audio.format != "pcm16":
            raise bad_request("streamed audio is sent as pcm16: set audio.format to 'pcm16'", param="audio.format")
    tools = body.template_tools()
    enable_thinking = body.enable_thinking
    if enable_thinking is None and body.chat_template_kwargs is not None:
        enable_thinking = body.chat_template_kwargs.enable_thinking

    release = st.admit(body.n)
    try:
        messages = await convert_messages(body.messages, st.media)
        req = await _make_request(st, messages, sampling, speaker=voice, use_audio_in_video=body.use_audio_in_video,
                                  enable_thinking=enable_thinking, tools=tools)
        by_modality = await st.run_cpu(omni.count_modalities, req.prompt_ids)
        chat_id = new_id("chatcmpl")
        reqs = [_clone(req, f"{chat_id}-{i}", None if body.seed is None else body.seed + i) for i in range(body.n)]
        decode = _decoder(omni)
        choices = []
        for i, r in enumerate(reqs):
            stream = st.engine.add(r, speak=voice is not None, max_frames=st.max_speech_frames)
            choices.append(_Choice(i, stream, TextPipeline(decode, body.stop or [], tools is not None)))
        st.metrics.prompt_tokens.labels(st.model_name).inc(len(req.prompt_ids))
        chat = _Chat(st, body, chat_id, now(), arrival, voice, choices, len(req.prompt_ids), by_modality)
    except BaseException:
        release()
        raise
    if body.stream:
        return _Stream(_stream_chat(chat), chat.close(release))
    try:
        return await _until_disconnect(request, _complete_chat(chat))
    finally:
        chat.close(release)()


def _decoder(omni):
    processor = omni.processor

    def decode(ids: list[int]) -> str:
        return processor.decode(ids, skip_special_tokens=True)

    return decode


async def _complete_chat(chat: _Chat) -> JSONResponse:
    st, body = chat.st, chat.body
    logprobs: dict[int, list[dict]] = {ch.index: [] for ch in chat.choices}
    async for i, upd in chat.updates():
        logprobs[i].extend(upd.logprobs)
    eos = set(st.omni.engine.eos_token_ids)
    out = []
    for ch in chat.choices:
        pipe = ch.pipe
        calls = pipe.tool_calls
        content = pipe.all_content
        if calls and not content.strip():
            content = None
        msg = ResponseMessage(content=content, reasoning_content=pipe.all_reasoning or None,
                              tool_calls=_tool_call_deltas(calls, 0) or None)
        for tc in msg.tool_calls or []:
            tc.index = None
        if chat.voice is not None:
            data = await st.run_cpu(_encode_b64, ch.pcm, body.audio.format)
            msg.audio = MessageAudio(id=ch.audio_id, data=data, transcript=pipe.all_content,
                                     expires_at=now() + AUDIO_EXPIRES_S)
        lp = ChoiceLogprobs(content=_logprobs(st, logprobs[ch.index], eos)) if body.logprobs else None
        out.append(Choice(index=ch.index, message=msg, finish_reason=ch.finish_reason, logprobs=lp))
    resp = ChatCompletion(id=chat.id, created=chat.created, model=st.model_name, choices=out, usage=chat.usage())
    data = resp.model_dump(exclude_none=True)
    for c, dumped in zip(out, data["choices"]):  # the explicit nulls of OpenAI's schema
        dumped["finish_reason"] = c.finish_reason
        dumped["message"]["content"] = c.message.content
    return JSONResponse(data)


def _pcm(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def _encode_b64(chunks: list[np.ndarray], fmt: str) -> str:
    return base64.b64encode(encode(_pcm(chunks), SAMPLE_RATE, fmt)).decode("ascii")


async def _stream_chat(chat: _Chat) -> AsyncIterator[str]:
    st, body = chat.st, chat.body
    eos = set(st.omni.engine.eos_token_ids)
    n_calls = {ch.index: 0 for ch in chat.choices}
    expires = now() + AUDIO_EXPIRES_S

    def audio_delta(ch: _Choice, data: bytes | None) -> Delta:
        """An audio delta with the answer text written since the last one as its transcript."""
        text = ch.pipe.all_content[ch.transcript_sent :]
        ch.transcript_sent += len(text)
        return Delta(audio=DeltaAudio(id=ch.audio_id, data=None if data is None else base64.b64encode(data).decode(),
                                      transcript=text or None, expires_at=expires))

    def chunk(index: int, delta: Delta, finish: str | None = None, logprobs=None) -> str:
        c = ChatCompletionChunk(id=chat.id, created=chat.created, model=st.model_name,
                                choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])
        return _sse(c)

    try:
        for ch in chat.choices:
            yield chunk(ch.index, Delta(role="assistant", content=""))
        async for i, upd in chat.updates():
            ch = chat.choices[i]
            if upd.pieces is not None or upd.logprobs:
                p = upd.pieces or Pieces()
                delta = Delta(content=p.content or None, reasoning_content=p.reasoning or None)
                if p.tool_calls:
                    delta.tool_calls = _tool_call_deltas(p.tool_calls, n_calls[i])
                    n_calls[i] += len(p.tool_calls)
                lp = None
                if body.logprobs and upd.logprobs:
                    lp = ChoiceLogprobs(content=_logprobs(st, upd.logprobs, eos))
                if delta.content is None and delta.reasoning_content is None and not delta.tool_calls and lp is None:
                    continue
                yield chunk(i, delta, logprobs=lp)
            elif upd.audio is not None:
                yield chunk(i, audio_delta(ch, upd.audio))
            elif upd.finish_reason is not None:
                if chat.voice is not None and ch.transcript_sent < len(ch.pipe.all_content):
                    yield chunk(i, audio_delta(ch, None))  # the transcript's last words
                yield chunk(i, Delta(), finish=upd.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = ChatCompletionChunk(id=chat.id, created=chat.created, model=st.model_name, choices=[],
                                        usage=chat.usage())
            yield _sse(usage)
    except (APIError, InputError, Exception) as exc:  # noqa: BLE001 - reported in the stream; headers are sent
        if not isinstance(exc, (APIError, InputError)):
            log.exception("chat stream %s failed", chat.id, exc_info=exc)
        yield _sse(_error_event(exc))
    yield "data: [DONE]\n\n"


# -- speech -----------------------------------------------------------------------------------------
@router.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request, st: ServerState = Depends(api)):
    arrival = time.perf_counter()
    st.check_model(body.model)
    omni = st.omni
    if not omni.can_speak:
        raise bad_request("this server has no talker (a Thinking model or --no-talker): speech is not available",
                          param="model")
    try:
        voice = omni.check_speaker(body.voice)
    except InputError as exc:
        raise bad_request(str(exc), param="voice") from None
    if body.speed != 1.0:
        raise bad_request("only speed=1.0 is supported", param="speed")
    fmt = body.response_format
    release = st.admit(1)
    try:
        from .. import tts

        req = await st.run_cpu(tts.speech_request, omni, body.input, voice, instructions=body.instructions)
        if len(req.prompt_ids) + 1 > omni.engine.max_model_len:
            raise ContextLengthError(f"the text is too long ({len(req.prompt_ids)} tokens with its prompt)",
                                     param="input")
        req.request_id = new_id("speech")
        gone = await _until_disconnect(request, st.engine.call(lambda: tts.forced_prefill(omni, req)))
        if isinstance(gone, Response):
            release()
            return gone
        stream = st.engine.speak(req, max_frames=st.max_speech_frames)
    except BaseException:
        release()
        raise

    def cleanup():
        stream.abort()
        release()
        st.metrics.e2e.labels(st.model_name).observe(time.perf_counter() - arrival)
        _observe_speech(st, stream, arrival)

    headers = {"Content-Disposition": f'inline; filename="speech.{_ext(fmt)}"'}
    if fmt == "pcm":  # raw samples go out as the talker makes them
        async def pcm_chunks():
            async for ev in stream:
                if ev.audio is not None and len(ev.audio):
                    yield await st.run_cpu(to_pcm16, ev.audio)

        return _Stream(pcm_chunks(), cleanup, media_type=MEDIA_TYPES[fmt], headers=headers)
    try:
        chunks = await _until_disconnect(request, _collect_audio(stream))
        if isinstance(chunks, Response):
            return chunks
        data = await st.run_cpu(encode, _pcm(chunks), SAMPLE_RATE, fmt)
    finally:
        cleanup()
    return Response(data, media_type=MEDIA_TYPES[fmt], headers=headers)


async def _collect_audio(stream: RequestStream) -> list[np.ndarray]:
    return [ev.audio async for ev in stream if ev.audio is not None and len(ev.audio)]


def _ext(fmt: str) -> str:
    return {"opus": "ogg", "pcm": "pcm"}.get(fmt, fmt)


# -- transcriptions / translations ------------------------------------------------------------------
@router.post("/v1/audio/transcriptions")
@router.post("/v1/audio/translations")
async def audio_to_text(
    request: Request,
    file: UploadFile = File(...),
    model: str | None = Form(None),
    language: str | None = Form(None),
    prompt: str | None = Form(None),
    response_format: str = Form("json"),
    temperature: float = Form(0.0),
    max_tokens: int | None = Form(None),
    stream: bool = Form(False),
    st: ServerState = Depends(api),
):
    """Transcription, or translation into English, with the model card's prompts (asr.py)."""
    arrival = time.perf_counter()
    task = "translate" if request.url.path.endswith("/translations") else "transcribe"
    st.check_model(model)
    if response_format not in TRANSCRIPT_FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}", param="response_format")
    if stream:
        raise bad_request("streamed transcription is not supported; leave stream unset", param="stream")
    if not 0 <= temperature <= 2:
        raise bad_request("temperature must be in [0, 2]", param="temperature")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request("max_tokens must be >= 1", param="max_tokens")
    _check_max_tokens(st, max_tokens, "max_tokens")
    lang = asr.language_name(language)
    limits = st.media.limits
    if file.size is not None and file.size > limits.max_bytes:
        raise too_large("the uploaded file", f"{limits.max_bytes} bytes", "file")
    audio = await file.read()
    if not audio:
        raise bad_request("the uploaded file is empty", param="file")
    audio = await st.run_cpu(decode_audio, audio, limits, "file")
    omni = st.omni
    messages: list[dict] = [{"role": "system", "content": prompt}] if prompt else []
    messages.append({"role": "user", "content": [
        {"type": "audio", "audio": audio}, {"type": "text", "text": asr.asr_instruction(task, lang)}]})
    release = st.admit(1)

    async def work():
        sampling = sampling_from(None, temperature=temperature, max_new_tokens=max_tokens or 1, logprobs=0)
        req = await _make_request(st, messages, sampling)  # the model card's ASR usage: default template
        seconds = asr.input_audio_seconds(req, omni.processor)
        if max_tokens is None:  # room for fast speech: ~10 tokens per second of audio
            req.sampling.max_new_tokens = int(64 + 10 * seconds)
        req.request_id = new_id(task)
        stream_ = st.engine.add(req)
        pipe = TextPipeline(_decoder(omni), [], parse_tools=False)
        lps: list[float] = []
        try:
            async for ev in stream_:
                pipe.feed(ev.token_ids)
                lps.extend(e["logprob"] for e in ev.logprobs)
        finally:
            stream_.abort()
        pipe.finish()
        m = st.metrics
        if stream_.first_token_at is not None:
            m.ttft.labels(m.model).observe(stream_.first_token_at - arrival)
        m.generation_tokens.labels(m.model).inc(stream_.num_tokens)
        m.prompt_tokens.labels(m.model).inc(len(req.prompt_ids))
        text = (pipe.all_content or pipe.all_reasoning).strip()
        return text, seconds, req, lps

    try:
        result = await _until_disconnect(request, work())
    finally:
        release()
    if isinstance(result, Response):
        return result
    text, seconds, req, lps = result
    st.metrics.e2e.labels(st.model_name).observe(time.perf_counter() - arrival)
    if response_format in asr.TEXT_FORMATS:
        return PlainTextResponse(asr.transcript_text(text, response_format, seconds),
                                 media_type=asr.TEXT_FORMATS[response_format])
    return asr.transcript_json(text, response_format, seconds, len(req.prompt_ids), req.output_ids, task=task,
                               language=lang, temperature=temperature, logprobs=lps)


LANGUAGES, asr_instruction = asr.LANGUAGES, asr.asr_instruction  # (imported from here by others)
