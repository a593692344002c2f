"""Batch jobs in the OpenAI Batch file format, on the engine in this process or against a server.

    thinktalk batch requests.jsonl -o results.jsonl                 # in-process (demo model, or --model)
    thinktalk batch requests.jsonl -o results.jsonl --url http://host:8000 --api-key KEY

Input: one JSON object per line, as for OpenAI's Batch API:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}
    {"custom_id": "t1", "method": "POST", "url": "/v1/audio/speech", "body": {"input": "Hi", "voice": "Ethan"}}
    {"custom_id": "a1", "method": "POST", "url": "/v1/audio/transcriptions", "body": {"file": "rec/a.wav"}}

(/v1/audio/translations works as transcriptions do.) The transcription body holds the form fields of the HTTP endpoint; its `file` is a path (relative to
the input file's folder), a file:// URL or a data: URL. Local media paths in chat messages are
read relative to the input file's folder too.

Output: one line per input line, in the shape of OpenAI's batch output:

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "...",
     "body": {...the endpoint's JSON...}}, "error": null}
    {"id": "batch_req_...", "custom_id": "q7", "response": null, "error": {"code": "...", "message": "..."}}

A line that cannot be read (bad JSON, no custom_id, unknown url) gets an error line too, with
`error.line` set (and custom_id null when it has none); the job goes on. Audio (spoken chat
answers, /v1/audio/speech) is written to files in `<output stem>.audio/` beside the output and
referenced from the line by its path relative to the output's folder: chat answers carry
`message.audio.file` in place of base64 `data`; speech bodies are `{"file", "format", "duration_s"}`.
Non-JSON transcription formats (text, srt, vtt) come back as `{"content": "..."}`.

Resuming: the output is opened for appending and every custom_id (and unreadable line number)
already there is skipped, so a job stopped by Ctrl-C, a crash or a lost server goes on where it
stopped with nothing done twice. A half-written last line is cut off first. With
`retry_failed`, items whose line is an error are taken out of the output and done again. A
server that cannot be reached (after retries) stops the job without writing error lines for the
items it could not send, so that a re-run does them.

In-process, every item goes to the engine as soon as it is prepared (up to `window` at once), so
the engine's continuous batching keeps its batch full: a short answer leaves and the next item
takes its place at once. Media decoding runs in a thread beside the step loop, and the talker in
another, so neither stalls the thinker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import mimetypes
import os
import queue
import re
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

log = logging.getLogger(__name__)

CHAT, SPEECH = "/v1/chat/completions", "/v1/audio/speech"
TRANSCRIBE, TRANSLATE = "/v1/audio/transcriptions", "/v1/audio/translations"
ENDPOINTS = (CHAT, SPEECH, TRANSCRIBE, TRANSLATE)
SAMPLE_RATE = 24000
RANDOM_WEIGHTS_SPEECH_S = 3.0  # default cap on a spoken answer of a random-weight (demo) model
_URL_ALIASES = {u.removeprefix("/v1"): u for u in ENDPOINTS}


# -- items and errors -------------------------------------------------------------------------------
@dataclass
class BatchItem:
    line: int  # 1-based line of the input file (0: made in memory)
    custom_id: str
    url: str
    body: dict[str, Any]
    base_dir: Path = field(default_factory=Path.cwd)  # relative media paths are read from here


class ItemError(Exception):
    """One item failed; it becomes an error line and the job goes on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class LineError:
    line: int
    custom_id: str | None
    error: ItemError


def parse_line(text: str, line_no: int, base_dir: Path) -> BatchItem:
    """One input line -> BatchItem; raises LineErrorWrap (ItemError + custom_id when known)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineFailure(None, ItemError("invalid_json", f"line {line_no}: not valid JSON ({exc.msg})")) from None
    if not isinstance(obj, dict):
        raise _LineFailure(None, ItemError("invalid_request", f"line {line_no}: not a JSON object"))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise _LineFailure(None, ItemError("missing_custom_id", f"line {line_no}: 'custom_id' must be a non-empty string"))
    method = obj.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        raise _LineFailure(cid, ItemError("invalid_method", f"line {line_no}: method must be POST, not {method!r}"))
    url = obj.get("url")
    url = _URL_ALIASES.get(url, url) if isinstance(url, str) else url
    if url not in ENDPOINTS:
        raise _LineFailure(cid, ItemError(
            "invalid_url", f"line {line_no}: url must be one of {', '.join(ENDPOINTS)}, not {obj.get('url')!r}"))
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _LineFailure(cid, ItemError("invalid_request", f"line {line_no}: 'body' must be a JSON object"))
    return BatchItem(line_no, cid, url, body, base_dir)


class _LineFailure(Exception):
    def __init__(self, custom_id: str | None, error: ItemError):
        super().__init__(error.message)
        self.custom_id, self.error = custom_id, error


# -- where results go -------------------------------------------------------------------------------
class Sink(Protocol):
    def result(self, item: BatchItem, body: dict[str, Any], request_id: str | None = None) -> None: ...
    def error(self, custom_id: str | None, error: ItemError, line: int | None = None) -> None: ...
    def save_audio(self, item: BatchItem, data: bytes, fmt: str, index: int | None = None) -> str: ...


def _safe_name(custom_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", custom_id)[:80].lstrip(".") or "item"
    if name != custom_id:  # two ids that clean to the same name must not share a file
        name += "-" + uuid.uuid5(uuid.NAMESPACE_URL, custom_id).hex[:8]
    return name


AUDIO_EXT = {"opus": "ogg", "pcm": "pcm", "pcm16": "pcm"}


class OutputFile:
    """The output JSONL, appended to line by line, plus its audio folder; knows what is already done."""

    def __init__(self, path: str | Path, *, retry_failed: bool = False):
        self.path = Path(path)
        self.retry_failed = retry_failed
        self.dropped = 0  # failed items taken out of the file to be done again (retry_failed)
        stem = self.path.name[: -len(".jsonl")] if self.path.name.endswith(".jsonl") else self.path.stem
        self.audio_dir = self.path.parent / f"{stem}.audio"
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()
        self.previous = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _scan(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a line cut short by a crash: drop it, it is redone
            keep = raw.rfind(b"\n") + 1
            log.warning("%s: dropping a half-written last line", self.path)
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
            raw = raw[:keep]
        kept: list[str] = []
        for text in raw.decode("utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                kept.append(text)
                continue
            if not isinstance(obj, dict):
                kept.append(text)
                continue
            if self.retry_failed and obj.get("error") and isinstance(obj.get("custom_id"), str):
                self.dropped += 1  # a failed item: done again (bad lines would only fail again)
                continue
            kept.append(text)
            self.previous += 1
            if isinstance(obj.get("custom_id"), str):
                self.done_ids.add(obj["custom_id"])
            elif isinstance(obj.get("error"), dict) and isinstance(obj["error"].get("line"), int):
                self.done_lines.add(obj["error"]["line"])
        if self.dropped:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def _write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def result(self, item: BatchItem, body: dict[str, Any], request_id: str | None = None) -> None:
        self._write({
            "id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": request_id or body.get("id") or uuid.uuid4().hex,
                         "body": body},
            "error": None,
        })

    def error(self, custom_id: str | None, error: ItemError, line: int | None = None) -> None:
        err: dict[str, Any] = {"code": error.code, "message": error.message}
        if line:
            err["line"] = line
        self._write({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": None, "error": err})

    def save_audio(self, item: BatchItem, data: bytes, fmt: str, index: int | None = None) -> str:
        """Write the audio file first (atomically), so a line never names a missing file."""
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        name = _safe_name(item.custom_id) + (f"-{index}" if index else "") + "." + AUDIO_EXT.get(fmt, fmt)
        target = self.audio_dir / name
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target.relative_to(self.path.parent).as_posix()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class MemorySink:
    """Results kept in memory (custom_id -> body or ItemError), for `thinktalk transcribe`."""

    def __init__(self):
        self.results: dict[str, dict[str, Any] | ItemError] = {}
        self._lock = threading.Lock()

    def result(self, item: BatchItem, body: dict[str, Any], request_id: str | None = None) -> None:
        with self._lock:
            self.results[item.custom_id] = body

    def error(self, custom_id: str | None, error: ItemError, line: int | None = None) -> None:
        with self._lock:
            self.results[custom_id or f"line-{line}"] = error

    def save_audio(self, item: BatchItem, data: bytes, fmt: str, index: int | None = None) -> str:
        raise ItemError("unsupported", "audio output is not kept in memory")


# -- progress ---------------------------------------------------------------------------------------
@dataclass
class Stats:
    total: int = 0
    done: int = 0
    errors: int = 0
    skipped: int = 0
    tokens: int = 0  # generated tokens
    audio_seconds: float = 0.0  # speech made
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.elapsed, 1e-9)


class ProgressView:
    """A rich progress bar: items done/total, ETA, tokens/s, audio seconds made, errors."""

    def __init__(self, stats: Stats, enabled: bool = True, description: str = "batch"):
        self.stats = stats
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._last = 0.0
        self.description = description

    def __enter__(self) -> "ProgressView":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn("eta"), TimeRemainingColumn(compact=True, elapsed_when_finished=True),
                TextColumn("{task.fields[tps]:.1f} tok/s"), TextColumn("{task.fields[audio]:.1f} s audio"),
                TextColumn("{task.fields[err]}"),
                console=Console(stderr=True), refresh_per_second=4, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.stats.total, tps=0.0, audio=0.0, err="")
        return self

    def update(self, force: bool = False) -> None:
        if self._progress is None:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        s = self.stats
        self._progress.update(self._task, completed=s.done + s.errors, total=s.total, tps=s.tokens_per_s,
                              audio=s.audio_seconds, err=f"[red]{s.errors} errors[/red]" if s.errors else "")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self.update(force=True)
            self._progress.__exit__(*exc)


class CountingSink:
    """Wraps a sink: counts results/errors into Stats and refreshes the progress bar."""

    def __init__(self, sink: Sink, stats: Stats, view: ProgressView | None):
        self.sink, self.stats, self.view = sink, stats, view

    def result(self, item, body, request_id=None):
        self.sink.result(item, body, request_id)
        self.stats.done += 1
        self.tick()

    def error(self, custom_id, error, line=None):
        self.sink.error(custom_id, error, line)
        self.stats.errors += 1
        self.tick()

    def save_audio(self, item, data, fmt, index=None):
        return self.sink.save_audio(item, data, fmt, index)

    def tick(self, force: bool = False):
        if self.view is not None:
            self.view.update(force)


# -- reading the input ------------------------------------------------------------------------------
def read_items(path: Path, done_ids: set[str], done_lines: set[int]) -> Iterator[BatchItem | LineError]:
    """Items (or unreadable lines) of the input not yet in the output, lazily, in file order."""
    base = path.parent.resolve()
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                item = parse_line(text, line_no, base)
            except _LineFailure as fail:
                if fail.custom_id is not None:
                    if fail.custom_id in done_ids or fail.custom_id in seen:
                        continue
                    seen.add(fail.custom_id)
                elif line_no in done_lines:
                    continue
                yield LineError(line_no, fail.custom_id, fail.error)
                continue
            if item.custom_id in done_ids:
                continue
            if item.custom_id in seen:
                # the first one's result carries this id; a second line gets the error (line-numbered)
                if line_no in done_lines:
                    continue
                yield LineError(line_no, None, ItemError(
                    "duplicate_custom_id", f"line {line_no}: custom_id {item.custom_id!r} was used on an earlier line"))
                continue
            seen.add(item.custom_id)
            yield item


def count_todo(path: Path, done_ids: set[str], done_lines: set[int]) -> int:
    return sum(1 for _ in read_items(path, done_ids, done_lines))


# -- media references ---------------------------------------------------------------------------------
def _is_local(url: str) -> bool:
    head = url[:16].lower()
    return not head.startswith(("data:", "http://", "https://")) and ("://" not in head or head.startswith("file://"))


def _local_path(url: str, base: Path) -> Path:
    if url[:7].lower() == "file://":
        url = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    p = Path(url).expanduser()
    return p if p.is_absolute() else base / p


def read_media(ref: Any, base: Path, param: str) -> bytes:
    """Bytes of a media reference in a batch body: a path, a file:// URL, a data: URL (or bytes)."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise ItemError("invalid_request_error", f"{param}: give a file path, a file:// URL or a data: URL")
    ref = ref.strip()
    if ref[:5].lower() == "data:":
        header, sep, payload = ref[5:].partition(",")
        if not sep:
            raise ItemError("invalid_request_error", f"{param}: malformed data: URL")
        try:
            if "base64" in header.lower():
                return base64.b64decode(urllib.parse.unquote(payload), validate=False)
            return urllib.parse.unquote_to_bytes(payload)
        except ValueError as exc:
            raise ItemError("invalid_request_error", f"{param}: bad base64 ({exc})") from None
    if not _is_local(ref):
        raise ItemError("invalid_request_error", f"{param}: only local files and data: URLs are read here, not {ref[:40]!r}")
    path = _local_path(ref, base)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ItemError("media_error", f"{param}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if not data:
        raise ItemError("media_error", f"{param}: {str(path)!r} is empty")
    return data


_MEDIA_KEYS = {"image_url": "image", "video_url": "video", "audio_url": "audio"}


def rewrite_local_media(body: dict[str, Any], base: Path, inline: bool) -> dict[str, Any]:
    """Chat messages with local media paths made absolute (in-process) or inlined as data: URLs (server)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    out_msgs = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out_msgs.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            key = part.get("type") if isinstance(part, dict) else None
            if key in _MEDIA_KEYS and part.get(key) is not None:
                ref = part[key]
                url = ref if isinstance(ref, str) else ref.get("url") if isinstance(ref, dict) else None
                if isinstance(url, str) and url.strip() and _is_local(url.strip()):
                    path = _local_path(url.strip(), base)
                    if inline:
                        data = read_media(str(path), base, f"messages.{i}.content.{j}.{key}")
                        mime = mimetypes.guess_type(path.name)[0] or f"{_MEDIA_KEYS[key]}/octet-stream"
                        new = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
                    else:
                        new = str(path)
                    part = {**part, key: {**ref, "url": new} if isinstance(ref, dict) else new}
            parts.append(part)
        out_msgs.append({**msg, "content": parts})
    return {**body, "messages": out_msgs}


def audio_seconds_of(data: bytes, fmt: str) -> float:
    """Duration of encoded audio (0 when it cannot be read)."""
    if fmt in ("pcm", "pcm16"):
        return len(data) / 2 / SAMPLE_RATE
    import io

    try:
        import av

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(stream))
            return samples / (stream.rate or SAMPLE_RATE)
    except Exception:  # noqa: BLE001 - a duration is for the progress bar only
        return 0.0


# -- backends -----------------------------------------------------------------------------------------
class Backend(Protocol):
    def run(self, items: Iterable[BatchItem | LineError], sink: CountingSink, stats: Stats) -> None: ...


class BatchAborted(RuntimeError):
    """The job cannot go on (the server is gone); what is done is saved, a re-run resumes."""


def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    backend: Backend,
    *,
    progress: bool = True,
    retry_failed: bool = False,
) -> Stats:
    """Run every item of `input_path` not yet in `output_path` on `backend`; returns the counts.

    retry_failed: items whose line in the output is an error are taken out and done again.
    Raises BatchAborted when the backend cannot go on; the output keeps everything done so far.
    """
    input_path, out = Path(input_path), OutputFile(output_path, retry_failed=retry_failed)
    stats = Stats()
    stats.skipped = len(out.done_ids) + len(out.done_lines)
    try:
        stats.total = count_todo(input_path, out.done_ids, out.done_lines)
        with ProgressView(stats, enabled=progress) as view:
            sink = CountingSink(out, stats, view)
            backend.run(read_items(input_path, out.done_ids, out.done_lines), sink, stats)
    finally:
        out.close()
    return stats


# ---- in-process ----
@dataclass
class _Job:
    item: BatchItem
    kind: str
    reqs: list[Any] = field(default_factory=list)
    pipes: list[Any] = field(default_factory=list)
    open: int = 0
    voice: str | None = None
    audio_format: str = "wav"
    response_format: str = "json"
    audio_in_seconds: float = 0.0
    prompt_tokens: int = 0
    by_modality: dict[str, int] = field(default_factory=dict)
    waves: dict[int, Any] = field(default_factory=dict)
    frames: dict[int, int] = field(default_factory=dict)
    language: str | None = None
    temperature: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")


def _validation_message(exc) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)


def _input_error(exc: Exception) -> ItemError:
    from .errors import ContextLengthError, MediaError

    if isinstance(exc, ContextLengthError):
        return ItemError("context_length_exceeded", str(exc))
    if isinstance(exc, MediaError):
        return ItemError("media_error", str(exc))
    param = getattr(exc, "param", None)
    return ItemError("invalid_request_error", f"{param}: {exc}" if param and param not in str(exc) else str(exc))


class EngineBackend:
    """Items straight onto an `Omni`'s engine, all in flight together (continuous batching).

    window: items prepared and in the engine at once (default: 4 x the engine's max_num_seqs);
    the engine decodes max_num_seqs of them per step and admits the next the step one finishes.
    max_speech_seconds: cap on each spoken answer (default: the talker's own limit; 3 s on a
    random-weight demo model, whose talker never ends by itself).
    """

    def __init__(self, omni, *, window: int | None = None, max_speech_seconds: float | None = None,
                 model_name: str | None = None):
        self.omni = omni
        self.window = window or 4 * omni.engine.config.max_num_seqs
        if max_speech_seconds is None and getattr(omni, "random_weights", False) and omni.can_speak:
            # a random talker never says codec_eos: without a cap each answer runs to the talker's limit
            max_speech_seconds = RANDOM_WEIGHTS_SPEECH_S
            log.warning("random weights: spoken answers capped at %.0f s (set max_speech_seconds to change)",
                        max_speech_seconds)
        self.max_frames = None
        if max_speech_seconds is not None and omni.can_speak:
            per_s = SAMPLE_RATE / omni.model.code2wav.total_upsample
            self.max_frames = max(1, round(max_speech_seconds * per_s))
        self.model_name = model_name or Path(str(omni.path)).name

    # -- preparing (prep thread: CPU only, never the thinker) ----------------------------------------
    def prepare(self, item: BatchItem) -> _Job:
        from .errors import InputError

        try:
            if item.url == CHAT:
                return self._prepare_chat(item)
            if item.url == SPEECH:
                return self._prepare_speech(item)
            return self._prepare_transcription(item)  # transcriptions and translations
        except ItemError:
            raise
        except InputError as exc:
            raise _input_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - one bad item must not end the job
            if _is_media_failure(exc):
                raise ItemError("media_error", f"cannot decode the media: {exc}") from None
            log.exception("item %s failed while being prepared", item.custom_id)
            raise ItemError("server_error", f"{type(exc).__name__}: {exc}") from None

    def _sampling(self, body, **overrides):
        from .request import sampling_from

        if body.top_logprobs is not None and not body.logprobs:
            raise ItemError("invalid_request_error", "top_logprobs needs logprobs=true")
        values = dict(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, max_new_tokens=body.max_completion_tokens or body.max_tokens,
            seed=body.seed, stop=body.stop or None, logprobs=None,
        )
        values.update(overrides)
        return sampling_from(body.preset, **values)

    def _prepare_chat(self, item: BatchItem) -> _Job:
        import dataclasses

        from pydantic import ValidationError

        from .server.media import MediaPolicy, convert_messages
        from .server.outputs import TextPipeline
        from .server.protocol import APIError, ChatCompletionRequest

        omni = self.omni
        try:
            body = ChatCompletionRequest.model_validate(rewrite_local_media(item.body, item.base_dir, inline=False))
        except ValidationError as exc:
            raise ItemError("invalid_request_error", _validation_message(exc)) from None
        if body.stream:
            raise ItemError("invalid_request_error", "stream is not supported in a batch")
        job = _Job(item, "chat")
        if body.modalities and "audio" in body.modalities:
            if not omni.can_speak:
                raise ItemError("invalid_request_error", "this model has no talker: audio output is not available")
            if body.audio is None:
                raise ItemError("invalid_request_error", "modalities includes 'audio': give audio={'voice', 'format'}")
            job.voice = omni.check_speaker(body.audio.voice)
            job.audio_format = body.audio.format
        tools = body.template_tools()
        enable_thinking = body.enable_thinking
        if enable_thinking is None and body.chat_template_kwargs is not None:
            enable_thinking = body.chat_template_kwargs.enable_thinking
        try:
            messages = asyncio.run(convert_messages(body.messages, MediaPolicy(local_root=Path("/"))))
        except APIError as exc:
            raise ItemError(exc.code or exc.type, f"{exc.param}: {exc.message}" if exc.param else exc.message) from None
        req = omni.make_request(messages, self._sampling(body), speaker=job.voice,
                                use_audio_in_video=body.use_audio_in_video, enable_thinking=enable_thinking,
                                tools=tools)
        job.prompt_tokens = len(req.prompt_ids)
        job.by_modality = omni.count_modalities(req.prompt_ids)
        for i in range(body.n):
            r = req
            if body.n > 1:
                r = dataclasses.replace(
                    req, request_id=f"{job.id}-{i}",
                    sampling=dataclasses.replace(req.sampling, seed=None if body.seed is None else body.seed + i,
                                                 stop=list(req.sampling.stop)),
                    output_ids=[], output_logprobs=[], kv=None, capture=None, generator=None)
                r.mm_inputs = req.mm_inputs
            if job.voice is not None and self.max_frames is not None:
                r.speech_max_frames = self.max_frames
            job.reqs.append(r)
            job.pipes.append(TextPipeline(self._decode, body.stop or [], parse_tools=tools is not None))
        return job

    def _decode(self, ids: list[int]) -> str:
        return self.omni.processor.decode(ids, skip_special_tokens=True)

    def _prepare_speech(self, item: BatchItem) -> _Job:
        from pydantic import ValidationError

        from . import tts
        from .server.protocol import SpeechRequest

        try:
            body = SpeechRequest.model_validate(item.body)
        except ValidationError as exc:
            raise ItemError("invalid_request_error", _validation_message(exc)) from None
        if not self.omni.can_speak:
            raise ItemError("invalid_request_error", "this model has no talker: speech is not available")
        if body.speed != 1.0:
            raise ItemError("invalid_request_error", "only speed=1.0 is supported")
        req = tts.speech_request(self.omni, body.input, body.voice, instructions=body.instructions)
        if len(req.prompt_ids) + len(req.forced_answer) + 1 > self.omni.engine.max_model_len:
            raise ItemError("context_length_exceeded", f"the text is too long ({len(req.prompt_ids)} tokens with its prompt)")
        if self.max_frames is not None:
            req.speech_max_frames = self.max_frames
        job = _Job(item, "speech", reqs=[req], voice=req.speaker, audio_format=body.response_format,
                   id=f"speech-{uuid.uuid4().hex[:24]}")
        job.prompt_tokens = len(req.prompt_ids)
        return job

    def _prepare_transcription(self, item: BatchItem) -> _Job:
        from . import asr
        from .request import sampling_from
        from .server.outputs import TextPipeline

        body = item.body
        task = "translate" if item.url == TRANSLATE else "transcribe"
        fmt = body.get("response_format", "json")
        if fmt not in asr.JSON_FORMATS and fmt not in asr.TEXT_FORMATS:
            raise ItemError("invalid_request_error", "response_format must be one of "
                            f"{', '.join((*asr.JSON_FORMATS, *asr.TEXT_FORMATS))}")
        temperature = body.get("temperature", 0.0)
        max_tokens = body.get("max_tokens")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ItemError("invalid_request_error", "temperature must be a number in [0, 2]")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ItemError("invalid_request_error", "max_tokens must be an integer >= 1")
        lang = asr.language_name(body.get("language"))
        audio = read_media(body.get("file"), item.base_dir, "file")
        messages: list[dict] = []
        if body.get("prompt"):
            messages.append({"role": "system", "content": str(body["prompt"])})
        messages.append({"role": "user", "content": [
            {"type": "audio", "audio": audio}, {"type": "text", "text": asr.asr_instruction(task, lang)}]})
        req = self.omni.make_request(messages, sampling_from(None, temperature=float(temperature),
                                                             max_new_tokens=max_tokens or 1))
        seconds = asr.input_audio_seconds(req, self.omni.processor)
        if max_tokens is None:  # as the server: room for fast speech, ~10 tokens per second of audio
            req.sampling.max_new_tokens = int(64 + 10 * seconds)
        job = _Job(item, task, reqs=[req], response_format=fmt, audio_in_seconds=seconds,
                   id=f"{task}-{uuid.uuid4().hex[:24]}")
        job.pipes = [TextPipeline(self._decode, [], parse_tools=False)]
        job.prompt_tokens = len(req.prompt_ids)
        job.language = lang
        job.temperature = float(temperature)
        return job

    # -- the loop (this thread is the only one that runs the thinker) --------------------------------
    def run(self, items: Iterable[BatchItem | LineError], sink: CountingSink, stats: Stats) -> None:
        from .errors import InputError

        engine = self.omni.engine
        inbox: queue.Queue = queue.Queue(maxsize=max(2, self.window // 2))
        stop = threading.Event()

        def produce():
            try:
                for entry in items:
                    if stop.is_set():
                        return
                    if isinstance(entry, LineError):
                        inbox.put(entry)
                        continue
                    try:
                        inbox.put(self.prepare(entry))
                    except ItemError as exc:
                        inbox.put(LineError(entry.line, entry.custom_id, exc))
            except BaseException as exc:  # noqa: BLE001 - reported by the loop
                inbox.put(exc)
            finally:
                inbox.put(None)

        prep = threading.Thread(target=produce, name="thinktalk-batch-prep", daemon=True)
        prep.start()
        speech = ThreadPoolExecutor(1, thread_name_prefix="thinktalk-batch-speech")
        by_req: dict[str, tuple[_Job, int]] = {}
        in_flight = 0  # jobs taken from the inbox and not yet written
        speaking: list[tuple[_Job, Future]] = []
        prep_done = False

        def fail(job: _Job, err: ItemError) -> None:
            """The whole item fails: its requests stop and its error line is written."""
            for r in job.reqs:
                by_req.pop(r.request_id, None)
                engine.abort(r.request_id)
            sink.error(job.item.custom_id, err)

        try:
            while True:
                # 1. take prepared items while there is room
                while not prep_done and in_flight < self.window:
                    try:  # wait a little for work only while the engine has none
                        entry = inbox.get_nowait() if engine.has_work() else inbox.get(timeout=0.02)
                    except queue.Empty:
                        break
                    if entry is None:
                        prep_done = True
                        break
                    if isinstance(entry, BaseException):
                        raise entry
                    if isinstance(entry, LineError):
                        sink.error(entry.custom_id, entry.error, entry.line if entry.custom_id is None else None)
                        continue
                    in_flight += 1
                    try:
                        self._start(entry, by_req, speaking, speech)
                    except (ItemError, InputError) as exc:
                        fail(entry, exc if isinstance(exc, ItemError) else _input_error(exc))
                        in_flight -= 1
                # 2. one engine step
                if engine.has_work():
                    for out in engine.step():
                        if out.new_token is None:
                            hit = by_req.get(out.request.request_id) if out.request.error is not None else None
                            if hit is not None:  # refused while running (out of memory): the whole item
                                fail(hit[0], _input_error(out.request.error))
                                in_flight -= 1
                            continue
                        stats.tokens += 1
                        hit = by_req.get(out.request.request_id)
                        if hit is None:
                            continue
                        job, idx = hit
                        if job.pipes:
                            job.pipes[idx].feed([out.new_token])
                            if job.pipes[idx].stopped and not out.finished:
                                engine.abort(out.request.request_id)  # a stop string: no need to go on
                                out.finished = True
                        if out.finished:
                            del by_req[out.request.request_id]
                            job.open -= 1
                            if job.open == 0:
                                if job.voice is not None:
                                    speaking.append((job, speech.submit(self._speak, job)))
                                else:
                                    self._finish_safely(job, sink, stats)
                                    in_flight -= 1
                    sink.tick()
                # 3. spoken answers that are ready
                for pair in [p for p in speaking if p[1].done()]:
                    speaking.remove(pair)
                    job, fut = pair
                    in_flight -= 1
                    try:
                        fut.result()
                    except Exception as exc:  # noqa: BLE001
                        log.exception("speech for %s failed", job.item.custom_id)
                        sink.error(job.item.custom_id, ItemError("server_error", f"speech failed: {exc}"))
                    else:
                        self._finish_safely(job, sink, stats)
                if prep_done and not engine.has_work() and not speaking and not by_req:
                    break
                if not engine.has_work() and speaking and (prep_done or in_flight >= self.window):
                    time.sleep(0.01)  # only the talker is busy
        finally:
            stop.set()
            for rid in list(by_req):
                engine.abort(rid)
            speech.shutdown(wait=True, cancel_futures=True)
            while prep.is_alive():  # let the producer see `stop`
                try:
                    inbox.get(timeout=0.05)
                except queue.Empty:
                    pass
            sink.tick(force=True)

    def _start(self, job: _Job, by_req, speaking, speech) -> None:
        if job.kind == "speech":
            from . import tts

            tts.forced_prefill(self.omni, job.reqs[0])  # one thinker forward: this thread
            speaking.append((job, speech.submit(self._speak, job)))
            return
        for i, r in enumerate(job.reqs):
            by_req[r.request_id] = (job, i)
        job.open = len(job.reqs)
        for r in job.reqs:
            self.omni.engine.add_request(r)

    def _speak(self, job: _Job) -> None:
        """Talker + code2wav for every choice, then the audio encoded (speech thread)."""
        from .audio_out import encode
        from .errors import InputError

        for i, req in enumerate(job.reqs):
            try:
                codes, wav = self.omni.speak(req)
            except InputError as exc:  # e.g. an empty answer: nothing to say
                log.info("no speech for %s: %s", job.item.custom_id, exc)
                continue
            job.frames[i] = int(codes.shape[-1])
            job.waves[i] = (wav, encode(wav, SAMPLE_RATE, job.audio_format))

    def _finish_safely(self, job: _Job, sink: CountingSink, stats: Stats) -> None:
        try:
            self._finish(job, sink, stats)
        except ItemError as exc:
            sink.error(job.item.custom_id, exc)
        except Exception as exc:  # noqa: BLE001 - one failure is one error line
            log.exception("item %s failed", job.item.custom_id)
            sink.error(job.item.custom_id, ItemError("server_error", f"{type(exc).__name__}: {exc}"))

    def _finish(self, job: _Job, sink: CountingSink, stats: Stats) -> None:
        for pipe in job.pipes:
            pipe.finish()
        if job.kind == "chat":
            body = self._chat_body(job, sink, stats)
        elif job.kind == "speech":
            if 0 not in job.waves:
                raise ItemError("server_error", "the talker made no audio")
            wav, data = job.waves[0]
            seconds = len(wav) / SAMPLE_RATE
            stats.audio_seconds += seconds
            ref = sink.save_audio(job.item, data, job.audio_format)
            body = {"file": ref, "format": job.audio_format, "duration_s": round(seconds, 3), "sample_rate": SAMPLE_RATE}
        else:
            from . import asr

            req, pipe = job.reqs[0], job.pipes[0]
            text = (pipe.all_content or pipe.all_reasoning).strip()
            if job.response_format in asr.TEXT_FORMATS:
                body = {"content": asr.transcript_text(text, job.response_format, job.audio_in_seconds)}
            else:
                body = asr.transcript_json(text, job.response_format, job.audio_in_seconds, len(req.prompt_ids),
                                           list(req.output_ids), task=job.kind, language=job.language,
                                           temperature=job.temperature)
        sink.result(job.item, body, job.id)

    def _chat_body(self, job: _Job, sink: CountingSink, stats: Stats) -> dict[str, Any]:
        choices = []
        completion = reasoning = 0
        for i, (req, pipe) in enumerate(zip(job.reqs, job.pipes)):
            calls = pipe.tool_calls
            content = pipe.all_content
            if calls and not content.strip():
                content = None
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if pipe.all_reasoning:
                msg["reasoning_content"] = pipe.all_reasoning
            if calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            if i in job.waves:
                wav, data = job.waves[i]
                seconds = len(wav) / SAMPLE_RATE
                stats.audio_seconds += seconds
                msg["audio"] = {"id": f"audio-{uuid.uuid4().hex[:16]}",
                                "file": sink.save_audio(job.item, data, job.audio_format, index=i),
                                "format": job.audio_format, "duration_s": round(seconds, 3),
                                "transcript": pipe.all_content}
            reason = req.finish_reason
            if pipe.stopped or reason == "abort":
                reason = "stop"
            if calls:
                reason = "tool_calls"
            choices.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": None})
            completion += len(req.output_ids)
            reasoning += pipe.reasoning_tokens
        m = job.by_modality
        return {
            "id": job.id, "object": "chat.completion", "created": job.created, "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": 0, **{f"{k}_tokens": m.get(k, 0)
                                                                 for k in ("text", "image", "audio", "video")}},
                "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": sum(job.frames.values())},
            },
        }


def _is_media_failure(exc: BaseException) -> bool:
    """Errors media libraries raise for bad input (PIL, PyAV) that reached us unwrapped."""
    names = {"UnidentifiedImageError", "DecompressionBombError", "FFmpegError", "InvalidDataError"}
    return any(c.__name__ in names for c in type(exc).__mro__) or type(exc).__module__.startswith("av.")


# ---- against a server ----
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class HTTPBackend:
    """Items sent to a running server, at most `concurrency` at once; 429/503 and lost connections retried."""

    def __init__(self, url: str, *, api_key: str | None = None, concurrency: int = 16, max_retries: int = 4,
                 timeout: float = 600.0, model: str | None = None):
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        self.timeout = timeout
        self.model = model  # overrides the body's "model" when given

    def run(self, items: Iterable[BatchItem | LineError], sink: CountingSink, stats: Stats) -> None:
        asyncio.run(self._run(items, sink, stats))

    async def _run(self, items, sink, stats) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._gone: str | None = None
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout, limits=limits) as client:
            pending: set[asyncio.Task] = set()
            try:
                for entry in items:
                    if self._gone:
                        break
                    if isinstance(entry, LineError):
                        sink.error(entry.custom_id, entry.error, entry.line if entry.custom_id is None else None)
                        continue
                    while len(pending) >= self.concurrency:
                        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    pending.add(asyncio.create_task(self._one(client, entry, sink, stats)))
                if pending:
                    await asyncio.wait(pending)
            finally:
                for task in pending:
                    task.cancel()
        if self._gone:
            raise BatchAborted(f"lost the server: {self._gone}. What was done is saved; run again to resume.")

    async def _one(self, client, item: BatchItem, sink: CountingSink, stats: Stats) -> None:
        try:
            body = await self._send(client, item, sink, stats)
        except ItemError as exc:
            if exc.code == "connection_error":  # not this item's fault: leave it undone for the re-run
                self._gone = self._gone or exc.message
                return
            sink.error(item.custom_id, exc)
        except Exception as exc:  # noqa: BLE001 - one failure is one error line
            sink.error(item.custom_id, ItemError("client_error", f"{type(exc).__name__}: {exc}"))
        else:
            sink.result(item, body)

    async def _post(self, client, path: str, **kw):
        import httpx

        delay = 0.5
        for attempt in range(self.max_retries + 1):
            try:
                resp = await client.post(path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt == self.max_retries:
                    raise ItemError("connection_error", f"{self.url}{path}: {exc}") from None
            else:
                if resp.status_code not in RETRY_STATUS or attempt == self.max_retries:
                    return resp
                retry_after = resp.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _raise_for(resp) -> None:
        if resp.status_code == 200:
            return
        try:
            err = resp.json().get("error") or {}
        except ValueError:
            err = {}
        code = err.get("code") or err.get("type") or f"http_{resp.status_code}"
        message = err.get("message") or resp.text[:500] or f"HTTP {resp.status_code}"
        if err.get("param") and err["param"] not in message:
            message = f"{err['param']}: {message}"
        raise ItemError(str(code), f"HTTP {resp.status_code}: {message}")

    async def _send(self, client, item: BatchItem, sink: CountingSink, stats: Stats) -> dict[str, Any]:
        body = dict(item.body)
        if self.model:
            body["model"] = self.model
        if item.url == CHAT:
            body = await asyncio.to_thread(rewrite_local_media, body, item.base_dir, True)
            if body.get("stream"):
                raise ItemError("invalid_request_error", "stream is not supported in a batch")
            resp = await self._post(client, CHAT, json=body)
            self._raise_for(resp)
            data = resp.json()
            stats.tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
            for choice in data.get("choices", []):
                audio = (choice.get("message") or {}).get("audio")
                if audio and audio.get("data"):
                    fmt = ((body.get("audio") or {}).get("format")) or "wav"
                    raw = base64.b64decode(audio.pop("data"))
                    audio["file"] = sink.save_audio(item, raw, fmt, index=choice.get("index", 0))
                    audio["format"] = fmt
                    seconds = await asyncio.to_thread(audio_seconds_of, raw, fmt)
                    audio["duration_s"] = round(seconds, 3)
                    stats.audio_seconds += seconds
            return data
        if item.url == SPEECH:
            resp = await self._post(client, SPEECH, json=body)
            self._raise_for(resp)
            fmt = body.get("response_format") or "mp3"
            raw = resp.content
            seconds = await asyncio.to_thread(audio_seconds_of, raw, fmt)
            stats.audio_seconds += seconds
            return {"file": sink.save_audio(item, raw, fmt), "format": fmt, "duration_s": round(seconds, 3),
                    "sample_rate": SAMPLE_RATE}
        # transcription / translation: multipart upload of the file, the rest as form fields
        ref = body.pop("file", None)
        data = await asyncio.to_thread(read_media, ref, item.base_dir, "file")
        name = Path(ref).name if isinstance(ref, str) and _is_local(ref) else "audio"
        form = {k: (json.dumps(v) if isinstance(v, (dict, list, bool)) else str(v)) for k, v in body.items() if v is not None}
        resp = await self._post(client, item.url, data=form, files={"file": (name, data)})
        self._raise_for(resp)
        if "json" in resp.headers.get("content-type", ""):
            out = resp.json()
            stats.tokens += int((out.get("usage") or {}).get("output_tokens") or 0)
            return out
        return {"content": resp.text}


__all__ = [
    "BatchItem", "BatchAborted", "ItemError", "OutputFile", "MemorySink", "Stats", "ProgressView", "EngineBackend", "HTTPBackend",
    "run_batch", "read_items", "parse_line", "ENDPOINTS",
]
