"""Bad media and bad calls fail with MediaError / InputError naming the input and the problem."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import pytest
from mm_synth import gradient_frames, make_image, tone, write_video

from thinktalk.errors import InputError, MediaError
from thinktalk.multimodal.audio import load_audio, log_mel_features
from thinktalk.multimodal.image import load_image
from thinktalk.multimodal.video import load_video

LOADERS = {"audio": load_audio, "image": load_image, "video": load_video}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_missing_file(tmp_path, kind):
    path = tmp_path / f"nope_{kind}.bin"
    with pytest.raises(MediaError, match=rf"{kind} '.*nope_{kind}\.bin': file not found"):
        LOADERS[kind](str(path))


@pytest.mark.parametrize("kind", list(LOADERS))
def test_corrupt_bytes(kind):
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(MediaError, match=rf"{kind} bytes \(4096 bytes\):") as info:
        LOADERS[kind](junk)
    assert any(word in str(info.value) for word in ("corrupt", "unsupported", "not a recognised", "no video", "no audio"))


@pytest.mark.parametrize("kind", list(LOADERS))
def test_corrupt_file_and_directory_and_empty(tmp_path, kind):
    bad = tmp_path / f"bad.{ {'audio': 'mp3', 'image': 'png', 'video': 'mp4'}[kind] }"
    bad.write_bytes(b"this is not media at all" * 10)
    with pytest.raises(MediaError, match=r"bad\."):
        LOADERS[kind](bad)
    with pytest.raises(MediaError, match="is a directory"):
        LOADERS[kind](tmp_path)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        LOADERS[kind](empty)
    with pytest.raises(MediaError, match="empty"):
        LOADERS[kind](b"")


@pytest.mark.parametrize("kind", list(LOADERS))
def test_remote_and_bad_data_urls(kind):
    with pytest.raises(MediaError, match="remote URLs are not fetched"):
        LOADERS[kind]("https://example.com/x.bin")
    with pytest.raises(MediaError, match="invalid base64"):
        LOADERS[kind]("data:application/octet-stream;base64,@@@not-base64@@@")


def _wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_zero_length_audio(tmp_path):
    path = tmp_path / "silence0.wav"
    path.write_bytes(_wav_bytes(np.zeros(0)))
    with pytest.raises(MediaError, match=r"silence0\.wav'.*empty"):
        load_audio(path)
    with pytest.raises(MediaError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="empty"):
        log_mel_features([tone(1.0), np.zeros(0, np.float32)])
    with pytest.raises(MediaError, match="too short"):
        log_mel_features([np.zeros(100, np.float32)])


def test_bad_audio_arrays():
    with pytest.raises(InputError, match="NaN"):
        load_audio(np.array([0.0, np.nan, 0.1], np.float32))
    with pytest.raises(InputError, match="1-D"):
        load_audio(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(InputError, match="sample rate"):
        load_audio((tone(0.1), 0))


def test_video_without_video_stream(mm_files):
    with pytest.raises(MediaError, match=r"tone\.m4a'.*no video stream") as info:
        load_video(mm_files["audio_m4a"])
    assert "audio-only" in str(info.value)


def test_audio_in_video_without_audio_track(mm_files):
    with pytest.raises(MediaError, match=r"silent\.mp4'.*no audio track"):
        load_video(mm_files["video_silent"], with_audio=True)
    with pytest.raises(MediaError, match=r"silent\.mp4'.*no audio stream|silent\.mp4'.*without an audio track"):
        load_audio(mm_files["video_silent"])


def test_single_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", gradient_frames(1, 32, 32), fps=5)
    with pytest.raises(MediaError, match=r"one\.mp4'.*at least 2 frames"):
        load_video(path)


def test_truncated_image(mm_files):
    data = mm_files["image_png"].read_bytes()
    with pytest.raises(MediaError, match=r"image bytes .*(truncated|corrupt)"):
        load_image(data[: len(data) // 2])


def test_extreme_aspect_ratio(processor):
    with pytest.raises(MediaError, match="aspect ratio"):
        processor("<|vision_start|><|image_pad|><|vision_end|>", images=[make_image(1000, 3)])


def test_placeholder_mismatch(processor):
    with pytest.raises(InputError, match="1 image placeholders but 2 image inputs"):
        processor("<|vision_start|><|image_pad|><|vision_end|>", images=[make_image(32, 32), make_image(32, 32)])
    with pytest.raises(InputError, match="1 audio placeholders but 0 audio inputs"):
        processor("<|audio_start|><|audio_pad|><|audio_end|>")
    with pytest.raises(InputError, match="use_audio_in_video"):
        processor("<|video_pad|>", videos=[gradient_frames(2, 32, 32)], audio=[tone(1.0)], use_audio_in_video=True)


def test_bad_messages(processor, mm_files):
    with pytest.raises(InputError, match="non-empty list"):
        processor.apply_chat_template([])
    with pytest.raises(InputError, match="no 'image'"):
        processor.prepare_messages([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(MediaError, match=r"nothere\.png'.*file not found"):
        processor.prepare_messages([{"role": "user", "content": [{"type": "image", "image": "/nothere.png"}]}])
    url = "data:image/png;base64," + base64.b64encode(b"garbage!").decode()
    with pytest.raises(MediaError, match=r"image data: URL \(image/png;base64.*not a recognised image"):
        processor.prepare_messages([{"role": "user", "content": [{"type": "image", "image": url}]}])
