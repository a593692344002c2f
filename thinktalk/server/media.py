"""OpenAI content parts -> the Hugging Face recipe's content parts our processor takes.

Every media part reaches the processor as bytes (or, for raw pcm16, a 16 kHz float array), never
as a string: the processor would read a string as a local path, and what a client may read from
this machine is decided here, not there.

- ``data:`` URLs and ``input_audio.data`` (base64) are decoded here.
- http(s) URLs are fetched only when the server runs with ``--allow-remote-media``; otherwise they
  are a 400 that says so.
- ``file://`` URLs and plain paths are read only when they resolve (symlinks followed) to a file
  under ``--allowed-local-media-path``.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .protocol import AudioURLPart, ChatMessage, ImagePart, InputAudioPart, TextPart, VideoPart, bad_request

MAX_REMOTE_BYTES = 256 * 1024 * 1024
REMOTE_TIMEOUT_S = 30.0
PCM16_INPUT_RATE = 24000  # raw pcm16 input is taken as 24 kHz mono, as in OpenAI's realtime API
MODEL_AUDIO_RATE = 16000
OFF_LOOP_CHARS = 256 * 1024  # base64 longer than this is decoded in a worker thread


@dataclass
class MediaPolicy:
    allow_remote: bool = False
    local_root: Path | None = None  # resolved folder, or None: no local files


def decode_data_url(url: str, param: str) -> bytes:
    """The payload of a ``data:`` URL (the processor's parser; its errors become 400s naming `param`)."""
    from ..multimodal.media import resolve_source

    try:
        return resolve_source(url).read_bytes()
    except InputError as exc:
        raise bad_request(str(exc), param=param) from None


def decode_base64(data: str, param: str) -> bytes:
    return decode_data_url("data:;base64," + data, param)


def is_media_failure(exc: BaseException) -> bool:
    """Errors media libraries (Pillow, PyAV) raise for bad input that reached us unwrapped."""
    names = {"UnidentifiedImageError", "DecompressionBombError", "FFmpegError", "InvalidDataError"}
    return any(cls.__name__ in names for cls in type(exc).__mro__) or type(exc).__module__.startswith("av.")


def _read_local(path_text: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.local_root is None:
        raise bad_request(
            "local files are not served; send the media as a data: URL or base64, or start the server "
            "with --allowed-local-media-path DIR", param=param)
    try:
        path = Path(path_text).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise bad_request(f"file not found: {path_text!r}", param=param) from None
    if not path.is_relative_to(policy.local_root):
        raise bad_request(f"{path_text!r} is outside the allowed local media folder", param=param)
    if not path.is_file():
        raise bad_request(f"{path_text!r} is not a file", param=param)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise bad_request(f"cannot read {path_text!r}: {exc.strerror or exc}", param=param) from None
    if not data:
        raise bad_request(f"{path_text!r} is empty", param=param)
    return data


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise bad_request(
            "remote media URLs are not fetched by this server; send the media as a data: URL or base64, "
            "or start the server with --allow-remote-media", param=param, code="remote_media_disabled")
    import httpx

    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"fetching {url!r} gave HTTP {resp.status_code}", param=param)
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_REMOTE_BYTES:
                        raise bad_request(f"{url!r} is larger than {MAX_REMOTE_BYTES} bytes", param=param)
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise bad_request(f"cannot fetch {url!r}: {exc}", param=param) from None
    data = b"".join(chunks)
    if not data:
        raise bad_request(f"{url!r} is empty", param=param)
    return data


async def _off_loop(fn, *args):
    """Large payloads are decoded in a worker thread, small ones right here."""
    if sum(len(a) for a in args if isinstance(a, str)) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def load_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The bytes behind a media URL (data:, http(s):, file:// or a path), by the server's policy."""
    url = url.strip()
    head = url[:16].lower()
    if head.startswith("data:"):
        return await _off_loop(decode_data_url, url, param)
    if head.startswith(("http://", "https://")):
        return await _fetch(url, policy, param)
    if head.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request("file:// URLs must name a local file", param=param)
        return await asyncio.to_thread(_read_local, urllib.parse.unquote(parsed.path), policy, param)
    if "://" in head:
        raise bad_request(f"unsupported URL scheme in {url[:40]!r}", param=param)
    if not url:
        raise bad_request("empty media URL", param=param)
    return await asyncio.to_thread(_read_local, url, policy, param)


def pcm16_to_model_audio(raw: bytes, param: str) -> np.ndarray:
    if len(raw) % 2:
        raise bad_request("pcm16 audio must have an even number of bytes", param=param)
    import soxr

    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return soxr.resample(samples, PCM16_INPUT_RATE, MODEL_AUDIO_RATE).astype(np.float32)


async def convert_part(part: Any, policy: MediaPolicy, param: str) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image", "image": await load_url(part.image_url.url, policy, f"{param}.image_url")}
    if isinstance(part, VideoPart):
        return {"type": "video", "video": await load_url(part.video_url.url, policy, f"{param}.video_url")}
    if isinstance(part, AudioURLPart):
        return {"type": "audio", "audio": await load_url(part.audio_url.url, policy, f"{param}.audio_url")}
    if isinstance(part, InputAudioPart):
        p = f"{param}.input_audio.data"
        data = part.input_audio.data
        raw = await _off_loop(decode_data_url if data[:5].lower() == "data:" else decode_base64, data, p)
        if part.input_audio.format == "pcm16":
            return {"type": "audio", "audio": await asyncio.to_thread(pcm16_to_model_audio, raw, p)}
        return {"type": "audio", "audio": raw}
    raise bad_request(f"unsupported content part {type(part).__name__}", param=param)


def _text_only(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise bad_request("only text parts are allowed here", param=f"{param}.{j}.type")
        texts.append(part.text)
    return "".join(texts)


async def convert_messages(messages: list[ChatMessage], policy: MediaPolicy) -> list[dict[str, Any]]:
    """OpenAI chat messages -> our messages (HF recipe content parts, tool calls as the template wants)."""
    import json

    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        param = f"messages.{i}"
        role = "system" if msg.role == "developer" else msg.role
        if role in ("system", "assistant", "tool"):
            entry: dict[str, Any] = {"role": role, "content": _text_only(msg.content, f"{param}.content")}
            if role == "assistant" and msg.reasoning_content:
                entry["reasoning_content"] = msg.reasoning_content
            if msg.tool_calls:
                calls = []
                for call in msg.tool_calls:
                    args = call.function.arguments
                    if isinstance(args, str):
                        try:
                            args = json.loads(args) if args.strip() else {}
                        except json.JSONDecodeError:
                            raise bad_request("tool call arguments are not valid JSON",
                                              param=f"{param}.tool_calls") from None
                    calls.append({"type": "function", "function": {"name": call.function.name, "arguments": args}})
                entry["tool_calls"] = calls
            out.append(entry)
            continue
        if msg.content is None:
            raise bad_request("user message has no content", param=f"{param}.content")
        if isinstance(msg.content, str):
            out.append({"role": role, "content": msg.content})
            continue
        parts = [await convert_part(part, policy, f"{param}.content.{j}") for j, part in enumerate(msg.content)]
        if not parts:
            raise bad_request("message content is empty", param=f"{param}.content")
        out.append({"role": role, "content": parts})
    return out

