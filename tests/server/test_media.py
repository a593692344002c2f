"""Content parts -> processor parts, and what a client may make the server read."""

import asyncio
import base64
import io
import os
import wave

import numpy as np
import pytest

from thinktalk.server.media import MediaPolicy, convert_messages, decode_data_url, load_url
from thinktalk.server.protocol import APIError, ChatCompletionRequest


def convert(messages, policy=None):
    req = ChatCompletionRequest(messages=messages)
    return asyncio.run(convert_messages(req.messages, policy or MediaPolicy()))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(np.arange(int(seconds * rate)) / 7) * 9000).astype("<i2").tobytes())
    return buf.getvalue()


def test_parts_become_bytes_or_arrays_never_strings():
    wav = wav_bytes(0.5)
    out = convert([
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(b"PNGDATA")}},
            {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(b"MP4")}},
            {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64(wav)}},
        ]},
    ])
    assert out[0] == {"role": "system", "content": "be brief"}
    parts = out[1]["content"]
    assert parts[0] == {"type": "text", "text": "look"}
    assert parts[1] == {"type": "image", "image": b"PNGDATA"}  # (what it is, the processor finds out)
    assert parts[3] == {"type": "video", "video": b"MP4"}
    for audio in (parts[2], parts[4]):  # audio is decoded here, counting its length: 16 kHz float32
        assert audio["type"] == "audio" and audio["audio"].dtype == np.float32 and len(audio["audio"]) == 8000


def test_pcm16_input_is_resampled_to_16k():
    pcm = (np.sin(np.arange(24000) / 10) * 10000).astype("<i2").tobytes()  # 1 s at 24 kHz
    part = convert([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(pcm), "format": "pcm16"}}]}])[0]["content"][0]
    assert part["audio"].dtype == np.float32 and abs(len(part["audio"]) - 16000) <= 2


def test_assistant_tool_calls_and_tool_results():
    out = convert([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    assert out[1]["tool_calls"] == [{"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]
    assert out[2] == {"role": "tool", "content": "sunny"}


@pytest.mark.parametrize("url,needle", [
    ("data:image/png;base64,!!!notbase64", "base64"),
    ("data:image/png;base64", "malformed"),
    ("https://example.com/cat.png", "--allow-remote-media"),
    ("ftp://example.com/cat.png", "scheme"),
    ("/etc/passwd", "local files are not served"),
    ("file:///etc/passwd", "local files are not served"),
])
def test_refused_urls(url, needle):
    with pytest.raises(APIError) as info:
        asyncio.run(load_url(url, MediaPolicy(), "messages.0.content.0.image_url"))
    assert info.value.status == 400 and needle in info.value.message
    assert info.value.param == "messages.0.content.0.image_url"


def test_remote_off_has_a_code():
    with pytest.raises(APIError) as info:
        asyncio.run(load_url("http://127.0.0.1:9/x.png", MediaPolicy(), "p"))
    assert info.value.code == "remote_media_disabled"


def test_local_files_only_under_the_allowed_folder(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(b"IMG")
    (tmp_path / "secret.txt").write_bytes(b"SECRET")
    os.symlink(tmp_path / "secret.txt", root / "escape.png")
    policy = MediaPolicy(local_root=root.resolve())
    assert asyncio.run(load_url(str(root / "a.png"), policy, "p")) == b"IMG"
    assert asyncio.run(load_url(f"file://{root / 'a.png'}", policy, "p")) == b"IMG"
    for bad in (str(tmp_path / "secret.txt"), str(root / "escape.png"), str(root / ".." / "secret.txt"),
                str(root / "missing.png"), str(root)):
        with pytest.raises(APIError) as info:
            asyncio.run(load_url(bad, policy, "p"))
        assert info.value.status == 400


def test_data_url_plain_and_base64():
    assert decode_data_url("data:text/plain,hello%20world", "p") == b"hello world"
    assert decode_data_url("data:;base64," + b64(b"\x00\x01"), "p") == b"\x00\x01"


def test_non_text_parts_refused_where_only_text_fits():
    with pytest.raises(APIError) as info:
        convert([{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert info.value.param == "messages.0.content.0.type"
