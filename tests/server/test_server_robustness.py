"""Never down, never leaky: a real server on the tiny checkpoint against a corpus of bad inputs,
streams dropped after their first chunk, and more concurrent requests than it takes.

Every bad input must get a 4xx in OpenAI's error shape (never a 500, never a hang: each request
has a client timeout), and a normal request must work afterwards; dropped streams must give back
their KV blocks; past capacity the answer is 429 with Retry-After and the admitted requests finish.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import wave
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

REQUEST_TIMEOUT_S = 60  # per request: a hang fails the test instead of stalling it
MAX_NUM_SEQS, MAX_QUEUE = 2, 8
MAX_REQUEST_MB, MAX_MEDIA_MB, MAX_MEDIA_S = 4, 1, 20


@pytest.fixture(scope="module")
def server(serve_factory, tiny_instruct):
    return serve_factory(
        "--model", str(tiny_instruct), "--served-model-name", "tiny", "--kv-backend", "paged",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE), "--max-model-len", "512",
        "--max-speech-seconds", "0.3", "--allow-remote-media", "--max-request-mb", str(MAX_REQUEST_MB),
        "--max-media-mb", str(MAX_MEDIA_MB), "--max-media-seconds", str(MAX_MEDIA_S), "--max-image-pixels", "4000000")


def wait_idle(server, timeout=60) -> dict:
    """/health until nothing runs, waits, speaks or holds KV; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        h = server.health().json()
        if (h["running"], h["waiting"], h["kv_used_tokens"], h["in_flight"], h["speaking"], h["talker_kv_tokens"]) == (
                0, 0, 0, 0, 0, 0) and h["kv_free_blocks"] == h["kv_total_blocks"]:
            return h
        assert time.monotonic() < deadline, f"server not idle: {h}"
        time.sleep(0.05)


# -- bad media, made here -------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height (the pixel data may be missing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def real_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16000, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(width), w.setframerate(rate)
        n = int(seconds * rate)
        if width == 1:
            w.writeframes((128 + 60 * np.sin(np.arange(n) / 5)).astype(np.uint8).tobytes())
        else:
            w.writeframes((np.sin(np.arange(n) / 5) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


GOOD_PNG, GOOD_WAV, NOISE = real_png(), wav(0.5), np.random.default_rng(1).bytes(8192)


def user(*parts, text="what is this?"):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image(data: bytes, mime="image/png"):
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def image_url(url: str):
    return {"type": "image_url", "image_url": {"url": url}}


def audio(data: bytes, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def video(data: bytes):
    return {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(data)}"}}


HI = [{"role": "user", "content": "hi"}]

# (name, JSON body) for /v1/chat/completions; each must be a 4xx
CHAT_CORPUS = [
    # wrong shapes and types
    ("body is a list", [1, 2]),
    ("body is a string", "hello"),
    ("body is null", None),
    ("no messages", {"model": "tiny"}),
    ("messages is a string", {"messages": "hi"}),
    ("empty messages", {"messages": []}),
    ("message is a number", {"messages": [5]}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("content is a number", {"messages": [{"role": "user", "content": 5}]}),
    ("content is an object", {"messages": [{"role": "user", "content": {"text": "x"}}]}),
    ("empty content list", {"messages": [{"role": "user", "content": []}]}),
    ("user content null", {"messages": [{"role": "user", "content": None}]}),
    ("unknown content part", {"messages": user({"type": "hologram", "hologram": {}})}),
    ("part without type", {"messages": user({"text": "x"})}),
    ("text part not text", {"messages": user({"type": "text", "text": 5})}),
    ("image_url is a number", {"messages": user({"type": "image_url", "image_url": 5})}),
    ("image in a system message", {"messages": [{"role": "system", "content": [image(GOOD_PNG)]}, *HI]}),
    ("tool call arguments not JSON", {"messages": [*HI, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
    ("tool with an empty name", {"messages": HI, "tools": [{"type": "function", "function": {"name": ""}}]}),
    ("tool_choice without tools", {"messages": HI, "tool_choice": "required"}),
    ("unknown model", {"messages": HI, "model": "gpt-9"}),
    ("unknown preset", {"messages": HI, "preset": "wild"}),
    ("bad modality", {"messages": HI, "modalities": ["smell"]}),
    ("stream is a string", {"messages": HI, "stream": "yes please"}),
    ("enable_thinking is a string", {"messages": HI, "enable_thinking": "maybe"}),
    ("special placeholder tokens in text", {"messages": [{"role": "user", "content": "<|image_pad|>" * 20}]}),
    ("lone surrogate in text", {"messages": [{"role": "user", "content": "\ud800 oops"}]}),
    # negative and absurd parameters
    ("temperature negative", {"messages": HI, "temperature": -1}),
    ("temperature huge", {"messages": HI, "temperature": 1e300}),
    ("temperature a string", {"messages": HI, "temperature": "hot"}),
    ("top_p zero", {"messages": HI, "top_p": 0}),
    ("top_p above one", {"messages": HI, "top_p": 7}),
    ("top_k negative", {"messages": HI, "top_k": -3}),
    ("max_tokens zero", {"messages": HI, "max_tokens": 0}),
    ("max_tokens negative", {"messages": HI, "max_tokens": -5}),
    ("max_tokens a fraction", {"messages": HI, "max_tokens": 2.5}),
    ("max_tokens past the context", {"messages": HI, "max_tokens": 10**6}),
    ("max_tokens 2**70", {"messages": HI, "max_tokens": 2**70}),
    ("max_completion_tokens past the context", {"messages": HI, "max_completion_tokens": 513}),
    ("n zero", {"messages": HI, "n": 0}),
    ("n negative", {"messages": HI, "n": -1}),
    ("n absurd", {"messages": HI, "n": 10**6}),
    ("presence_penalty huge", {"messages": HI, "presence_penalty": 50}),
    ("frequency_penalty negative huge", {"messages": HI, "frequency_penalty": -50}),
    ("repetition_penalty zero", {"messages": HI, "repetition_penalty": 0}),
    ("repetition_penalty tiny", {"messages": HI, "repetition_penalty": 1e-300}),
    ("repetition_penalty huge", {"messages": HI, "repetition_penalty": 1e300}),
    ("top_logprobs without logprobs", {"messages": HI, "top_logprobs": 2}),
    ("top_logprobs absurd", {"messages": HI, "logprobs": True, "top_logprobs": 1000}),
    ("seed past int64", {"messages": HI, "seed": 2**70}),
    ("too many stop strings", {"messages": HI, "stop": ["a"] * 100}),
    ("empty stop string", {"messages": HI, "stop": [""]}),
    # prompts too long for the context
    ("over-long prompt", {"messages": [{"role": "user", "content": "word " * 3000}]}),
    ("many messages", {"messages": [{"role": "user", "content": "x"}] * 2000}),
    # voices
    ("unknown voice", {"messages": HI, "modalities": ["text", "audio"], "audio": {"voice": "Nobody", "format": "wav"}}),
    ("voice is a number", {"messages": HI, "modalities": ["text", "audio"], "audio": {"voice": 3, "format": "wav"}}),
    ("audio out without audio", {"messages": HI, "modalities": ["text", "audio"]}),
    ("streamed audio not pcm16", {"messages": HI, "stream": True, "modalities": ["text", "audio"],
                                  "audio": {"voice": "Ethan", "format": "mp3"}}),
    # garbage base64 and broken media
    ("garbage base64 image", {"messages": user(image_url("data:image/png;base64,@@@@!!"))}),
    ("garbage base64 audio", {"messages": user({"type": "input_audio", "input_audio": {"data": "%%%%", "format": "wav"}})}),
    ("data URL without payload", {"messages": user(image_url("data:image/png;base64"))}),
    ("zero-byte image", {"messages": user(image(b""))}),
    ("truncated image", {"messages": user(image(GOOD_PNG[: len(GOOD_PNG) // 2]))}),
    ("random bytes as png", {"messages": user(image(NOISE))}),
    ("bomb png 100k x 100k", {"messages": user(image(png(100_000, 100_000)))}),
    ("bomb png past the pixel limit", {"messages": user(image(png(3000, 3000)))}),
    ("zero-size png", {"messages": user(image(png(0, 0)))}),
    ("truncated wav header", {"messages": user(audio(GOOD_WAV[:30]))}),
    ("truncated wav", {"messages": user(audio(GOOD_WAV[:44]))}),
    ("zero-byte wav", {"messages": user(audio(b""))}),
    ("random bytes as mp3", {"messages": user(audio(NOISE, "mp3"))}),
    ("random bytes as flac", {"messages": user(audio(NOISE, "flac"))}),
    ("odd-length pcm16", {"messages": user(audio(b"\0\1\2", "pcm16"))}),
    ("random bytes as mp4", {"messages": user(video(NOISE))}),
    ("random bytes as mp4 audio", {"messages": user({"type": "audio_url", "audio_url": {"url": "data:audio/mp4;base64,"
                                                                                        + b64(NOISE)}})}),
    ("audio past the length limit", {"messages": user(audio(wav(MAX_MEDIA_S + 5, rate=8000, width=1)))}),
    ("pcm16 past the length limit", {"messages": user(audio(b"\0\0" * 24000 * (MAX_MEDIA_S + 1), "pcm16"))}),
    ("media past the byte limit", {"messages": user(image(b"\0" * (MAX_MEDIA_MB * 1024 * 1024 + 10)))}),
    # URLs the server must not follow
    ("ssrf loopback", {"messages": user(image_url("http://127.0.0.1/x.png"))}),
    ("ssrf loopback name", {"messages": user(image_url("http://localhost:8000/health"))}),
    ("ssrf metadata", {"messages": user(image_url("http://169.254.169.254/latest/meta-data/"))}),
    ("ssrf ipv6 loopback", {"messages": user(image_url("http://[::1]/x.png"))}),
    ("ssrf ipv4-mapped ipv6", {"messages": user(image_url("http://[::ffff:127.0.0.1]/x.png"))}),
    ("ssrf private", {"messages": user(image_url("http://10.0.0.1/x.png"))}),
    ("ssrf decimal loopback", {"messages": user(image_url("http://2130706433/x.png"))}),
    ("ssrf audio url", {"messages": user({"type": "audio_url", "audio_url": {"url": "http://192.168.0.1/a.wav"}})}),
    ("file url", {"messages": user(image_url("file:///etc/passwd"))}),
    ("plain path", {"messages": user(image_url("/etc/passwd"))}),
    ("ftp url", {"messages": user(image_url("ftp://example.com/x.png"))}),
    ("empty url", {"messages": user(image_url(""))}),
]

SPEECH_CORPUS = [
    ("unknown voice", {"input": "hi", "voice": "Nobody"}),
    ("voice missing", {"input": "hi"}),
    ("blank input", {"input": "   ", "voice": "Ethan"}),
    ("input too long", {"input": "x" * 5000, "voice": "Ethan"}),
    ("unknown format", {"input": "hi", "voice": "Ethan", "response_format": "ogg"}),
    ("speed absurd", {"input": "hi", "voice": "Ethan", "speed": 1e9}),
    ("input a number", {"input": 5, "voice": "Ethan"}),
]

TRANSCRIPTION_CORPUS = [  # (name, files, form)
    ("random bytes", {"file": ("a.mp3", NOISE)}, {}),
    ("zero bytes", {"file": ("a.wav", b"")}, {}),
    ("truncated wav", {"file": ("a.wav", GOOD_WAV[:40])}, {}),
    ("too long", {"file": ("a.wav", wav(MAX_MEDIA_S + 5, rate=8000, width=1))}, {}),
    ("unknown language", {"file": ("a.wav", GOOD_WAV)}, {"language": "klingon"}),
    ("bad response_format", {"file": ("a.wav", GOOD_WAV)}, {"response_format": "pdf"}),
    ("temperature absurd", {"file": ("a.wav", GOOD_WAV)}, {"temperature": "-7"}),
    ("max_tokens past the context", {"file": ("a.wav", GOOD_WAV)}, {"max_tokens": "100000"}),
    ("no file", {}, {"model": "tiny"}),
]


def assert_openai_error(r: httpx.Response, name: str) -> dict:
    assert 400 <= r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, f"{name}: {body}"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], name
    assert isinstance(body["error"]["type"], str), name
    return body["error"]


def test_bad_inputs_are_4xx_in_openai_shape(server):
    codes = {}
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        for name, body in CHAT_CORPUS:
            # (json.dumps keeps lone surrogates as \ud800 escapes, as a client's JSON would carry them)
            r = http.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                          headers={"content-type": "application/json"})
            codes[name] = assert_openai_error(r, name)["code"]
        for name, body in SPEECH_CORPUS:
            assert_openai_error(http.post("/v1/audio/speech", json=body), f"speech: {name}")
        for name, files, form in TRANSCRIPTION_CORPUS:
            r = http.post("/v1/audio/transcriptions", files=files or None, data=form)
            assert_openai_error(r, f"transcription: {name}")
        raw = [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"messages": [{"role": "user", "content": "x"}],}',
               b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', b"[" * 100_000]
        for body in raw:
            r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert_openai_error(r, f"raw body {body[:20]!r}")
        r = http.post("/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"})
        assert_openai_error(r, "text/plain body")
    assert codes["ssrf metadata"] == codes["ssrf loopback"] == codes["ssrf ipv6 loopback"] == "media_url_forbidden"
    assert codes["bomb png 100k x 100k"] == codes["audio past the length limit"] == "media_too_large"
    assert codes["over-long prompt"] == "context_length_exceeded"
    # and the server is fine: nothing logged as a bug, nothing left running, a normal request works
    assert "Traceback" not in server.log() and "Exception in ASGI" not in server.log()
    wait_idle(server)
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                    json={"model": "tiny", "messages": user(image(GOOD_PNG), audio(GOOD_WAV)), "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop"), ok.text


def test_request_body_limit_is_413(server):
    limit = MAX_REQUEST_MB * 1024 * 1024
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        big = b'{"messages": [{"role": "user", "content": "' + b"x" * limit + b'"}]}'
        err = assert_openai_error(http.post("/v1/chat/completions", content=big,
                                            headers={"content-type": "application/json"}), "declared")
        assert err["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it streams in
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(MAX_REQUEST_MB + 1):
                yield b"y" * (1024 * 1024)
            yield b'"}]}'

        r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and assert_openai_error(r, "streamed")["code"] == "request_too_large"
    assert server.health().json()["status"] == "ready"


def test_streams_dropped_after_the_first_chunk_free_everything(server):
    base = wait_idle(server)
    body = {"model": "tiny", "messages": HI, "max_tokens": 400, "stream": True}

    def drop(i):
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            with http.stream("POST", server.url + "/v1/chat/completions",
                             json={**body, "messages": [{"role": "user", "content": f"story {i}"}]}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        return json.loads(line[6:])["object"]  # the first chunk: hang up

    with ThreadPoolExecutor(4) as pool:  # within capacity: each gets its first chunk
        firsts = list(pool.map(drop, range(100)))
    assert firsts == ["chat.completion.chunk"] * 100
    after = wait_idle(server, timeout=60)
    assert after["kv_free_blocks"] == base["kv_free_blocks"] == base["kv_total_blocks"]
    assert after["running"] == after["waiting"] == after["in_flight"] == 0
    assert "Traceback" not in server.log()


def test_the_same_prompt_twice_at_once(server):
    # Two clients, the same prompt (and image): the later one finishes while the first still runs.
    # The engine once told requests apart by comparing their fields, tensors included, and died.
    messages = user(image(GOOD_PNG))
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        with http.stream("POST", server.url + "/v1/chat/completions",
                         json={"model": "tiny", "messages": messages, "max_tokens": 300, "stream": True}) as first:
            lines = first.iter_lines()
            assert first.status_code == 200 and next(line for line in lines if line.startswith("data: {"))
            second = http.post(server.url + "/v1/chat/completions",
                               json={"model": "tiny", "messages": messages, "max_tokens": 2})
            assert second.status_code == 200, second.text
            assert server.health().json()["status"] == "ready"
    wait_idle(server)


def test_fifty_concurrent_requests_are_served_or_429(server):
    wait_idle(server)
    go = threading.Barrier(50)
    max_tokens = 24

    def one(i):
        go.wait()
        return httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S * 3, json={
            "model": "tiny", "messages": [{"role": "user", "content": f"count {i}"}], "max_tokens": max_tokens,
            "temperature": 0})

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(one, range(50)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert served and refused, statuses
    assert len(served) >= MAX_NUM_SEQS
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert assert_openai_error(r, "429")["code"] == "queue_full"
    for r in served:  # complete answers: as long as asked for, or ended by the model
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["message"]["content"], str)
        assert usage["completion_tokens"] == max_tokens if choice["finish_reason"] == "length" else usage[
            "completion_tokens"] <= max_tokens
    wait_idle(server)
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                    json={"model": "tiny", "messages": HI, "max_tokens": 2})
    assert ok.status_code == 200

