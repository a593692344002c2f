"""OpenAI content parts -> the Hugging Face recipe's content parts our processor takes.

Every media part reaches the processor as bytes (or, for audio, a 16 kHz float array), never as a
string: the processor would read a string as a local path, and what a client may read from this
machine is decided here, not there.

- ``data:`` URLs and ``input_audio.data`` (base64) are decoded here.
- http(s) URLs are fetched only when the server runs with ``--allow-remote-media``, through the
  SSRF-safe `RemoteFetcher` (fetch.py); otherwise they are a 400 that says so.
- ``file://`` URLs and plain paths are read only when they resolve (symlinks followed) to a file
  under ``--allowed-local-media-path``.

Limits (`MediaLimits`), each checked before the expensive step: a media item's bytes (before it is
decoded, or while it is fetched); an image's pixels, from its header, before Pillow decodes it (a
tiny PNG can claim 100k x 100k); a video's frame size and length, from its header and packets,
before any frame is decoded; an audio's length, counted while it is decoded.
"""

from __future__ import annotations

import asyncio
import io
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .fetch import RemoteFetcher
from .protocol import APIError, AudioURLPart, ChatMessage, ImagePart, InputAudioPart, TextPart, VideoPart, bad_request

PCM16_INPUT_RATE = 24000  # raw pcm16 input is taken as 24 kHz mono, as in OpenAI's realtime API
MODEL_AUDIO_RATE = 16000
OFF_LOOP_CHARS = 256 * 1024  # base64 longer than this is decoded in a worker thread
MB = 1024 * 1024


@dataclass
class MediaLimits:
    max_bytes: int = 64 * MB  # one media item, as bytes (base64 decoded)
    max_image_pixels: int = 50_000_000  # an image's (and a video frame's) width x height
    max_seconds: float = 3600.0  # one audio or video


@dataclass
class MediaPolicy:
    local_root: Path | None = None  # resolved folder, or None: no local files
    fetcher: RemoteFetcher | None = None  # None: http(s) URLs are refused
    limits: MediaLimits = field(default_factory=MediaLimits)

    @property
    def allow_remote(self) -> bool:
        return self.fetcher is not None


def media_policy(local_root: Path | None = None, allow_remote: bool = False,
                 limits: MediaLimits | None = None) -> MediaPolicy:
    limits = limits or MediaLimits()
    return MediaPolicy(local_root=local_root, limits=limits,
                       fetcher=RemoteFetcher(max_bytes=limits.max_bytes) if allow_remote else None)


def too_large(what: str, limit: str, param: str) -> APIError:
    return bad_request(f"{what} is larger than the server's limit ({limit})", param=param, code="media_too_large")


def decode_data_url(url: str, param: str, max_bytes: int | None = None) -> bytes:
    """The payload of a ``data:`` URL (the processor's parser; its errors become 400s naming `param`)."""
    from ..multimodal.media import resolve_source

    # base64 holds 3 bytes in 4 characters: refuse what cannot fit before decoding it
    if max_bytes is not None and (len(url) - url.find(",") - 1) * 3 // 4 > max_bytes + 3:
        raise too_large("the media", f"{max_bytes} bytes", param)
    try:
        data = resolve_source(url).read_bytes()
    except InputError as exc:
        raise bad_request(str(exc), param=param) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise too_large("the media", f"{max_bytes} bytes", param)
    return data


def decode_base64(data: str, param: str, max_bytes: int | None = None) -> bytes:
    return decode_data_url("data:;base64," + data, param, max_bytes)


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
    if path.stat().st_size > policy.limits.max_bytes:
        raise too_large(repr(path_text), f"{policy.limits.max_bytes} bytes", param)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise bad_request(f"cannot read {path_text!r}: {exc.strerror or exc}", param=param) from None
    if not data:
        raise bad_request(f"{path_text!r} is empty", param=param)
    return data


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.fetcher is None:
        raise bad_request(
            "remote media URLs are not fetched by this server; send the media as a data: URL or base64, "
            "or start the server with --allow-remote-media", param=param, code="remote_media_disabled")
    return await policy.fetcher.fetch(url, param)


async def _off_loop(fn, *args):
    """Large payloads are decoded in a worker thread, small ones right here."""
    if sum(len(a) for a in args if isinstance(a, (str, bytes))) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def load_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The bytes behind a media URL (data:, http(s):, file:// or a path), by the server's policy."""
    url = url.strip()
    head = url[:16].lower()
    if head.startswith("data:"):
        return await _off_loop(decode_data_url, url, param, policy.limits.max_bytes)
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


def pcm16_to_model_audio(raw: bytes, param: str, max_seconds: float | None = None) -> np.ndarray:
    if len(raw) % 2:
        raise bad_request("pcm16 audio must have an even number of bytes", param=param)
    if max_seconds is not None and len(raw) / 2 / PCM16_INPUT_RATE > max_seconds:
        raise too_large("the audio", f"{max_seconds:g} s", param)
    import soxr

    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return soxr.resample(samples, PCM16_INPUT_RATE, MODEL_AUDIO_RATE).astype(np.float32)


def decode_audio(data: bytes, limits: MediaLimits, param: str) -> np.ndarray:
    """An audio file -> mono float32 at the model's rate, refused once it runs past the length limit."""
    from ..multimodal.audio import decode_audio_stream, resample
    from ..multimodal.media import resolve_source

    try:
        wave, rate = decode_audio_stream(resolve_source(data, "audio"), max_seconds=limits.max_seconds)
    except InputError as exc:
        exc.param = exc.param or param
        raise
    return resample(wave, rate, MODEL_AUDIO_RATE)


def check_image(data: bytes, limits: MediaLimits, param: str) -> None:
    """Refuse an image whose header claims more pixels than the limit, before anything decodes it.
    What is not an image is left for the processor to report."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # (Pillow's own, far larger limit)
        width = height = None
    except Exception:  # noqa: BLE001 - not an image (or a broken one): the processor says which
        return
    if width is None or width * height > limits.max_image_pixels:
        size = "" if width is None else f" ({width} x {height})"
        raise too_large(f"the image{size}", f"{limits.max_image_pixels} pixels", param)


def check_video(data: bytes, limits: MediaLimits, param: str) -> None:
    """Refuse a video whose frames are larger, or that runs longer, than the limits: frame size
    from the stream header, length from the packets' timestamps (read, not decoded)."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return  # not a video the processor could open either: it says what is wrong
    with container:
        if not container.streams.video:
            return
        stream = container.streams.video[0]
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        if width * height > limits.max_image_pixels:
            raise too_large(f"the video's frames ({width} x {height})", f"{limits.max_image_pixels} pixels", param)
        base = stream.time_base
        first = last = None
        try:
            for packet in container.demux(stream):
                if packet.pts is None or base is None:
                    continue
                t = float(packet.pts * base)
                first = t if first is None else min(first, t)
                last = t if last is None else max(last, t)
                if last - first > limits.max_seconds:
                    raise too_large("the video", f"{limits.max_seconds:g} s", param)
        except av.FFmpegError:
            return  # corrupt data: the processor reports it


async def convert_part(part: Any, policy: MediaPolicy, param: str) -> dict[str, Any]:
    limits = policy.limits
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        p = f"{param}.image_url"
        data = await load_url(part.image_url.url, policy, p)
        await asyncio.to_thread(check_image, data, limits, p)
        return {"type": "image", "image": data}
    if isinstance(part, VideoPart):
        p = f"{param}.video_url"
        data = await load_url(part.video_url.url, policy, p)
        await asyncio.to_thread(check_video, data, limits, p)
        return {"type": "video", "video": data}
    if isinstance(part, AudioURLPart):
        p = f"{param}.audio_url"
        data = await load_url(part.audio_url.url, policy, p)
        return {"type": "audio", "audio": await asyncio.to_thread(decode_audio, data, limits, p)}
    if isinstance(part, InputAudioPart):
        p = f"{param}.input_audio.data"
        data = part.input_audio.data
        raw = await _off_loop(decode_data_url if data[:5].lower() == "data:" else decode_base64, data, p,
                              limits.max_bytes)
        if part.input_audio.format == "pcm16":
            return {"type": "audio", "audio": await asyncio.to_thread(pcm16_to_model_audio, raw, p, limits.max_seconds)}
        return {"type": "audio", "audio": await asyncio.to_thread(decode_audio, raw, limits, p)}
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

