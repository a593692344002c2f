"""Benchmark prompts: synthetic text / image / audio / video (PIL, numpy, PyAV) or read from JSONL.

Every prompt is a list of OpenAI chat messages with its media inlined as data: URLs or base64
`input_audio`, so the server needs no access to the client's files. Synthetic media come in a few
seeded variants per kind (made once), each prompt pairing one with its own random text.

JSONL lines take either form:

    {"messages": [...OpenAI chat messages...], "max_tokens": 128}
    {"prompt": "Describe this.", "image": "a.jpg", "audio": "b.wav", "video": "c.mp4", "max_tokens": 64}

(paths relative to the JSONL file's folder; "kind" optional, else taken from the media given).
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..audio_out import wav_bytes

KINDS = ("text", "image", "audio", "video")
_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
          "near an old river bank where children play music and tell long stories about distant stars "
          "mountains oceans cities machines gardens winter summer light shadow memory future").split()
_QUESTIONS = {
    "text": "Summarise the text above in a few sentences.",
    "image": "Describe this image in detail.",
    "audio": "What do you hear in this recording?",
    "video": "Describe what happens in this video.",
}


@dataclass
class BenchPrompt:
    kind: str
    messages: list[dict[str, Any]]
    max_tokens: int


# -- synthetic media --------------------------------------------------------------------------------
def make_image(rng: np.random.Generator, size: tuple[int, int] = (448, 448)) -> bytes:
    """A JPEG of gradients and rectangles (structure, not noise, so it compresses like a photo)."""
    from PIL import Image, ImageDraw

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), np.full((h, w), rng.integers(0, 255))], -1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def speechlike(rng: np.random.Generator, seconds: float, rate: int = 16000) -> np.ndarray:
    """Harmonic tones with a syllable-rate envelope and pauses: sounds (to an encoder) like voice."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 80 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * (3 + rng.random()) * t), 0, None) * (np.sin(2 * np.pi * 0.4 * t) > -0.5)
    audio = 0.25 * voice * envelope + 0.005 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


def make_video(rng: np.random.Generator, seconds: float = 2.0, fps: int = 4, size: tuple[int, int] = (224, 160),
               with_audio: bool = True) -> bytes:
    """An MP4 (mpeg4 video, aac audio) of a square moving over a gradient, with speech-like sound."""
    import av

    w, h = size
    n = max(1, int(seconds * fps))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = None
        if with_audio:
            aus = out.add_stream("aac", rate=16000)
            aus.layout = "mono"
        yy, xx = np.mgrid[0:h, 0:w]
        colour = rng.integers(0, 255, 3)
        for i in range(n):
            frame = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), (i * 40) % 255)], -1).astype(np.uint8)
            x = int((w - 40) * i / max(n - 1, 1))
            frame[h // 2 - 20 : h // 2 + 20, x : x + 40] = colour
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        if aus is not None:
            pcm = (speechlike(rng, seconds) * 32767).astype(np.int16)
            for start in range(0, len(pcm), 1024):
                frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1024], format="s16", layout="mono")
                frame.sample_rate = 16000
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode(None):
                out.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def media_part(kind: str, data: bytes, mime: str | None = None) -> dict[str, Any]:
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": data_url(data, mime or "image/jpeg")}}
    if kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"),
                                                       "format": _audio_format(mime)}}
    if kind == "video":
        return {"type": "video_url", "video_url": {"url": data_url(data, mime or "video/mp4")}}
    raise ValueError(kind)


def _audio_format(mime: str | None) -> str:
    sub = (mime or "audio/wav").split("/")[-1].lower()
    return {"x-wav": "wav", "wave": "wav", "mpeg": "mp3", "x-flac": "flac", "mp4": "m4a", "x-m4a": "m4a"}.get(sub, sub)


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(_WORDS, size=max(1, words)).tolist()).capitalize() + "."


def synthetic_prompts(
    n: int, kinds: list[str] | tuple[str, ...] = ("text",), *, seed: int = 0, input_words: int = 64,
    max_tokens: int = 64, image_size: tuple[int, int] = (448, 448), audio_seconds: float = 3.0,
    video_seconds: float = 2.0, variants: int = 4,
) -> list[BenchPrompt]:
    """`n` prompts cycling through `kinds` (shuffled by seed)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown prompt kind(s) {bad}; choose from {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    media: dict[str, list[dict]] = {}
    for kind in set(kinds) - {"text"}:
        made = []
        for _ in range(variants):
            if kind == "image":
                made.append(media_part("image", make_image(rng, image_size)))
            elif kind == "audio":
                made.append(media_part("audio", wav_bytes(speechlike(rng, audio_seconds), 16000), "audio/wav"))
            else:
                made.append(media_part("video", make_video(rng, video_seconds)))
        media[kind] = made
    order = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(order)
    prompts = []
    for kind in order:
        parts: list[dict] = []
        if kind != "text":
            parts.append(media[kind][int(rng.integers(0, len(media[kind])))])
            words = max(4, input_words // 8)
        else:
            words = input_words
        parts.append({"type": "text", "text": f"{_text(rng, words)} {_QUESTIONS[kind]}"})
        prompts.append(BenchPrompt(kind, [{"role": "user", "content": parts}], max_tokens))
    return prompts


def load_jsonl(path: str | Path, *, max_tokens: int = 64) -> list[BenchPrompt]:
    path = Path(path)
    base = path.parent
    prompts = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        mt = int(obj.get("max_tokens", max_tokens))
        if "messages" in obj:
            kinds = _kinds_of(obj["messages"])
            prompts.append(BenchPrompt(obj.get("kind") or kinds, obj["messages"], mt))
            continue
        parts = []
        for kind in ("image", "audio", "video"):
            if obj.get(kind):
                p = Path(obj[kind])
                p = p if p.is_absolute() else base / p
                parts.append(media_part(kind, p.read_bytes(), mimetypes.guess_type(p.name)[0]))
        parts.append({"type": "text", "text": str(obj.get("prompt", ""))})
        kind = obj.get("kind") or "+".join(k for k in ("image", "audio", "video") if obj.get(k)) or "text"
        prompts.append(BenchPrompt(kind, [{"role": "user", "content": parts}], mt))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _kinds_of(messages: list[dict]) -> str:
    found = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                t = part.get("type", "")
                kind = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}.get(t)
                if kind and kind not in found:
                    found.append(kind)
    return "+".join(found) or "text"
