"""Shared loading of one media source: a path, raw bytes, a ``data:`` URL or an in-memory object.

Every loader in this package (audio, image, video) goes through `resolve_source`, so a missing
file, an undecodable ``data:`` URL or a remote URL fails the same way everywhere: with a
`MediaError` whose message names the input (a path, or a short description of bytes / a data URL,
never the payload itself) and says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, MediaError

# Longest path or URL echoed verbatim in an error message.
_MAX_LABEL = 160


@dataclass(frozen=True)
class MediaBlob:
    """A media input reduced to either a readable file or bytes in memory, plus a label for errors."""

    label: str
    path: Path | None = None
    data: bytes | None = None
    mime: str | None = None

    def open(self) -> io.BufferedIOBase:
        """A fresh binary file object positioned at the start."""
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        try:
            return open(self.path, "rb")
        except OSError as exc:  # permission denied, vanished meanwhile, ...
            raise MediaError(f"{self.label}: cannot read file: {exc.strerror or exc}") from exc

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        with self.open() as fh:
            return fh.read()


def shorten(text: str, limit: int = _MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(source: Any, kind: str = "media") -> str:
    """A short human-readable name of a media input for error messages."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text.startswith("data:"):
            head = text[5:].split(",", 1)[0]
            return f"{kind} data: URL ({shorten(head, 60) or 'no media type'}, {len(text)} characters)"
        return f"{kind} {shorten(text)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{kind} bytes ({len(source)} bytes)"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"{kind} array (shape {tuple(shape)}, dtype {getattr(source, 'dtype', '?')})"
    return f"{kind} of type {type(source).__name__}"


def _parse_data_url(url: str, label: str) -> tuple[bytes, str | None]:
    """Decode ``data:[<mediatype>][;base64],<payload>`` (RFC 2397)."""
    if "," not in url:
        raise MediaError(f"{label}: malformed data: URL (no ',' separating header and payload)")
    header, payload = url[5:].split(",", 1)
    params = header.split(";")
    mime = params[0].strip().lower() or None
    if any(p.strip().lower() == "base64" for p in params[1:]):
        compact = "".join(urllib.parse.unquote(payload).split())
        compact = compact.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
        compact += "=" * (-len(compact) % 4)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"{label}: invalid base64 payload in data: URL ({exc})") from exc
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise MediaError(f"{label}: data: URL has an empty payload")
    return data, mime


def resolve_source(source: Any, kind: str = "media") -> MediaBlob:
    """Turn a path / ``file://`` URL / ``data:`` URL / bytes into a `MediaBlob`.

    Raises `MediaError` for a missing or unreadable file, an empty input, a malformed data URL or a
    remote (http/https) URL, which this package deliberately does not fetch.
    """
    label = describe(source, kind)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError(f"{label}: empty input (0 bytes)")
        return MediaBlob(label=label, data=data)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
        if isinstance(source, bytes):
            source = source.decode("utf-8", "surrogateescape")
    if not isinstance(source, str):
        raise InputError(f"{label}: unsupported {kind} input type {type(source).__name__}; "
                         "expected a path, bytes or a data: URL")
    text = source.strip()
    if not text:
        raise MediaError(f"{kind}: empty path")
    lowered = text[:16].lower()
    if lowered.startswith("data:"):
        data, mime = _parse_data_url(text, label)
        return MediaBlob(label=label, data=data, mime=mime)
    if lowered.startswith(("http://", "https://")):
        raise MediaError(f"{label}: remote URLs are not fetched; download the file and pass its path or bytes")
    if lowered.startswith("file://"):
        parsed = urllib.parse.urlparse(text)
        text = urllib.parse.unquote(parsed.path)
        if parsed.netloc and parsed.netloc != "localhost":
            text = f"//{parsed.netloc}{text}"
    path = Path(text).expanduser()
    try:
        if not path.exists():
            raise MediaError(f"{label}: file not found")
        if path.is_dir():
            raise MediaError(f"{label}: is a directory, not a file")
        if not os.access(path, os.R_OK):
            raise MediaError(f"{label}: file is not readable (permission denied)")
        size = path.stat().st_size
    except OSError as exc:  # e.g. a name too long to be a path (raw base64 without a data: prefix)
        raise MediaError(f"{label}: not a readable file path ({exc.strerror or exc})") from exc
    if size == 0:
        raise MediaError(f"{label}: file is empty (0 bytes)")
    return MediaBlob(label=label, path=path)


@contextmanager
def open_av(blob: MediaBlob, kind: str) -> Iterator[Any]:
    """Open a blob with PyAV (FFmpeg), mapping FFmpeg failures to `MediaError`."""
    import av

    fh = None
    try:
        try:
            if blob.path is not None:
                container = av.open(str(blob.path), mode="r")
            else:
                fh = blob.open()
                container = av.open(fh, mode="r")
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
            reason = _av_reason(exc)
            raise MediaError(f"{blob.label}: cannot decode as {kind}: unsupported or corrupt format ({reason})") from exc
        try:
            yield container
        finally:
            container.close()
    finally:
        if fh is not None:
            fh.close()


def _av_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return shorten(" ".join(str(text).split()), 200)


def av_error_types() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError, ValueError, EOFError)
