"""Shared fixtures: tiny random checkpoints written once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory):
    from thinktalk.weights.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "instruct", variant="instruct", seed=0)


@pytest.fixture(scope="session")
def tiny_thinking(tmp_path_factory):
    from thinktalk.weights.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "thinking", variant="thinking", seed=1)


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    from thinktalk.weights.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "captioner", variant="captioner", seed=2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The demo model and other caches go to a temp folder, never the user's."""
    os.environ["THINKTALK_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _write_av(path, *, video=None, audio=None, fps=10, sample_rate=16000, container=None):
    """Encode frames (T,H,W,3 uint8) and/or mono float audio into a media file with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w", format=container) as out:
        vs = aus = None
        if video is not None:
            vs = out.add_stream("mpeg4", rate=fps)
            vs.width, vs.height, vs.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        if audio is not None:
            aus = out.add_stream("aac", rate=sample_rate)
            aus.layout = "mono"
        if vs is not None:
            for frame in video:
                for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in vs.encode(None):
                out.mux(packet)
        if aus is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            for start in range(0, len(pcm), 1024):
                frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1024], format="s16", layout="mono")
                frame.sample_rate = sample_rate
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode(None):
                out.mux(packet)
    return path


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Small generated media files: two images, a speech-like tone, a video with sound."""
    import wave

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    files = {}
    files["image"] = root / "a.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(files["image"])
    files["image2"] = root / "b.jpg"
    Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(files["image2"])
    t = np.arange(int(1.5 * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(t.size))
    files["audio"] = root / "tone.wav"
    with wave.open(str(files["audio"]), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    frames = np.stack([np.full((64, 96, 3), 10 * i, dtype=np.uint8) + rng.integers(0, 30, (64, 96, 3), dtype=np.uint8)
                       for i in range(20)])
    t2 = np.arange(2 * 16000) / 16000
    files["video"] = _write_av(root / "clip.mp4", video=frames, audio=0.3 * np.sin(2 * np.pi * 330 * t2), fps=10)
    return files
