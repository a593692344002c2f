"""Synthesised media for the multimodal tests (sine tones, gradients, noise), written with PyAV /
Pillow. A uniquely named helper module, imported by tests/multimodal/conftest.py and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def report(name: str, value: float) -> None:
    """Print a measured max abs error (visible with `pytest -s`)."""
    print(f"\nMAXERR {name}: {value:.3g}")




def tone(seconds: float, rate: int = 16000, freq: float = 440.0, amp: float = 0.4, channels: int = 1) -> np.ndarray:
    """float32 [n] (mono) or [channels, n] sine, with a slow amplitude wobble."""
    t = np.arange(int(round(seconds * rate))) / rate
    base = amp * np.sin(2 * np.pi * freq * t) * (0.75 + 0.25 * np.sin(2 * np.pi * 1.5 * t))
    if channels == 1:
        return base.astype(np.float32)
    return np.stack([base * (1.0 - 0.3 * c) for c in range(channels)]).astype(np.float32)


AUDIO_FORMATS = {
    # suffix: (container format, codec)
    "wav": ("wav", "pcm_s16le"),
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "ogg": ("ogg", "libopus"),
    "m4a": ("ipod", "aac"),
}


def write_audio(path: Path, wave: np.ndarray, rate: int) -> Path:
    """Encode float audio ([n] mono or [channels, n]) with PyAV; the codec follows the suffix."""
    import av

    container_fmt, codec = AUDIO_FORMATS[path.suffix.lstrip(".")]
    wave = wave[None] if wave.ndim == 1 else wave
    layout = "mono" if wave.shape[0] == 1 else "stereo"
    out_rate = 48000 if codec == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000) else rate
    pcm = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=out_rate)
        stream.layout = layout
        for start in range(0, pcm.shape[1], 4096):
            chunk = np.ascontiguousarray(pcm[:, start : start + 4096].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def gradient_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, H, W, 3]: moving colour gradients plus a little noise (compresses sanely)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        r = (x * 255 // max(width - 1, 1) + 9 * i) % 256
        g = (y * 255 // max(height - 1, 1) + 5 * i) % 256
        b = ((x + y) * 3 + 17 * i) % 256
        frame = np.stack([r, g, b], axis=-1) + rng.integers(0, 12, (height, width, 3))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_video(path: Path, frames: np.ndarray, fps: int = 10, audio: np.ndarray | None = None,
                audio_rate: int = 16000, codec: str = "mpeg4") -> Path:
    """Encode uint8 [T, H, W, 3] frames (and optional mono audio, AAC) with PyAV."""
    import av

    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "mpeg4":
            vs.options = {"qscale": "2"}
        aus = None
        if audio is not None:
            aus = out.add_stream("aac", rate=audio_rate)
            aus.layout = "mono"
        for frame in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        if aus is not None:
            pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
            for start in range(0, len(pcm), 4096):
                frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 4096], format="s16", layout="mono")
                frame.sample_rate = audio_rate
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode(None):
                out.mux(packet)
    return path


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    from PIL import Image

    frame = gradient_frames(1, height, width, seed)[0]
    image = Image.fromarray(frame)
    if mode == "RGBA":
        alpha = (np.arange(width)[None, :].repeat(height, 0) * 255 // max(width - 1, 1)).astype(np.uint8)
        image.putalpha(Image.fromarray(alpha))
    return image
