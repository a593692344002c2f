"""Encode generated speech (float32 mono) as pcm16, wav, mp3, flac or opus.

wav and raw pcm16 are written directly; the compressed formats go through PyAV's bundled
encoders (no ffmpeg binary needed).
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

FORMATS = ("wav", "mp3", "flac", "opus", "pcm16", "pcm", "aac")
MEDIA_TYPES = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "pcm16": "audio/pcm",
    "pcm": "audio/pcm",
}
# container, codec, sample rate the encoder accepts (opus only runs at 48 kHz or divisors)
_AV = {"mp3": ("mp3", "libmp3lame", None), "flac": ("flac", "flac", None), "opus": ("ogg", "libopus", 48000), "aac": ("adts", "aac", None)}


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(to_pcm16(audio))
    return buf.getvalue()


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    Path(path).write_bytes(wav_bytes(audio, sample_rate))


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole waveform in `fmt` (one of FORMATS)."""
    if fmt in ("pcm16", "pcm"):
        return to_pcm16(audio)
    if fmt == "wav":
        return wav_bytes(audio, sample_rate)
    if fmt not in _AV:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    import av

    container_fmt, codec, rate = _AV[fmt]
    samples = np.asarray(audio, dtype=np.float32)
    if rate and rate != sample_rate:
        import soxr

        samples = soxr.resample(samples, sample_rate, rate).astype(np.float32)
    rate = rate or sample_rate
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = 960 if codec == "libopus" else 1152
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        for start in range(0, len(pcm), frame_size):
            chunk = pcm[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()
