"""The OpenAI-compatible server, end to end: a real `thinktalk serve` on a tiny random checkpoint,
driven with the official `openai` client (and httpx where the client has no say: raw errors,
disconnects, metrics)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import openai
import pytest

VOICES = ["Aiden", "Chelsie", "Ethan"]
MAX_SPEECH_S = "0.3"  # 4 codec frames: the random talker never says codec_eos, keep it short


@pytest.fixture(scope="module")
def server(serve_factory, tiny_instruct, media):
    root = media["image"].parent
    return serve_factory("--model", str(tiny_instruct), "--served-model-name", "tiny", "--max-num-seqs", "4",
                         "--max-queue", "32", "--allowed-local-media-path", str(root),
                         "--max-speech-seconds", MAX_SPEECH_S, "--kv-backend", "paged")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def data_url(path, mime) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def decode_audio(data: bytes) -> tuple[int, int]:
    """(sample rate, samples) of an encoded audio file, through PyAV."""
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        n = sum(frame.samples for frame in c.decode(stream))
        return stream.rate, n


def user(text="hi", *parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]


def wait_idle(server, timeout=60):
    """/health until nothing runs, waits or holds KV; returns the last health."""
    deadline = time.monotonic() + timeout
    while True:
        h = server.health().json()
        if (h["running"], h["waiting"], h["kv_used_tokens"], h["in_flight"], h["speaking"], h["talker_kv_tokens"]) == (
                0, 0, 0, 0, 0, 0) and h["kv_free_blocks"] == h["kv_total_blocks"]:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {h}")
        time.sleep(0.1)


# -- basics ---------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = models.data[0].model_dump()
    assert card["random_weights"] is True and "random weights" in card["notice"]
    assert card["voices"] == VOICES
    h = server.health().json()
    assert h["status"] == "ready" and h["random_weights"] is True


def test_page_says_demo(server):
    page = httpx.get(server.url + "/").text
    assert 'id="demo-banner"' in page and "random weights" in page
    assert httpx.get(server.url + "/web/app.js").status_code == 200
    assert httpx.get(server.url + "/web/style.css").headers["content-type"].startswith("text/css")


def test_chat_text(client):
    r = client.chat.completions.create(model="tiny", messages=user(), max_tokens=4, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and isinstance(c.message.content, str)
    assert r.usage.completion_tokens == 4 or c.finish_reason == "stop"
    assert r.usage.prompt_tokens == r.usage.prompt_tokens_details.model_dump()["text_tokens"] > 0
    again = client.chat.completions.create(model="tiny", messages=user(), max_tokens=4, temperature=0)
    assert again.choices[0].message.content == c.message.content


def test_chat_sampling_params_and_n(client):
    kw = dict(model="tiny", messages=user("tell me"), max_tokens=5, temperature=0.9, top_p=0.9, seed=7, n=2,
              presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=3,
              extra_body={"top_k": 20, "repetition_penalty": 1.1})
    r1 = client.chat.completions.create(**kw)
    r2 = client.chat.completions.create(**kw)
    assert [c.index for c in r1.choices] == [0, 1]
    assert [c.message.content for c in r1.choices] == [c.message.content for c in r2.choices]  # seeded
    for c in r1.choices:
        lp = c.logprobs.content
        assert 1 <= len(lp) <= 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
        assert "".join(t.token for t in lp) == c.message.content or c.finish_reason == "stop"
    assert r1.usage.completion_tokens == sum(len(c.logprobs.content) for c in r1.choices) or any(
        c.finish_reason == "stop" for c in r1.choices)
    edge = client.chat.completions.create(model="tiny", messages=user(), max_tokens=2, seed=2**63 - 1, n=2)
    assert len(edge.choices) == 2
    preset = client.chat.completions.create(model="tiny", messages=user(), max_tokens=3, extra_body={"preset": "factual"})
    assert preset.choices[0].finish_reason in ("length", "stop")


def test_stop_string_cuts_and_aborts(client, server):
    full = client.chat.completions.create(model="tiny", messages=user("x"), max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 4
    stop = text[3:5]
    cut = client.chat.completions.create(model="tiny", messages=user("x"), max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    wait_idle(server)


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=user(), max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    plain = client.chat.completions.create(model="tiny", messages=user(), max_tokens=6, temperature=0)
    assert text == plain.choices[0].message.content


def test_chat_multimodal_parts(client, media):
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}},
        {"type": "image_url", "image_url": {"url": data_url(media["image2"], "image/jpeg")}},
        {"type": "input_audio", "input_audio": {"data": b64(media["audio"]), "format": "wav"}},
        {"type": "video_url", "video_url": {"url": data_url(media["video"], "video/mp4")}},
    ]
    r = client.chat.completions.create(model="tiny", messages=user("what is this?", *parts), max_tokens=3)
    d = r.usage.prompt_tokens_details.model_dump()
    assert d["image_tokens"] > 0 and d["audio_tokens"] > 0 and d["video_tokens"] > 0 and d["text_tokens"] > 0
    assert d["image_tokens"] + d["audio_tokens"] + d["video_tokens"] + d["text_tokens"] == r.usage.prompt_tokens
    # the video's sound too
    r2 = client.chat.completions.create(model="tiny", messages=user("and?", parts[3]), max_tokens=2,
                                        extra_body={"use_audio_in_video": True})
    assert r2.usage.prompt_tokens_details.model_dump()["audio_tokens"] > 0


def test_local_media_only_under_the_allowed_folder(client, media, tmp_path):
    ok = client.chat.completions.create(
        model="tiny", max_tokens=2,
        messages=user("?", {"type": "image_url", "image_url": {"url": f"file://{media['image']}"}}))
    assert ok.usage.prompt_tokens_details.model_dump()["image_tokens"] > 0
    outside = tmp_path / "x.png"
    outside.write_bytes(media["image"].read_bytes())
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", max_tokens=2,
                                       messages=user("?", {"type": "image_url", "image_url": {"url": str(outside)}}))
    assert "outside the allowed" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", max_tokens=2, messages=user(
            "?", {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
    assert info.value.code == "remote_media_disabled" and "--allow-remote-media" in info.value.body["message"]


def test_tools_accepted(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client.chat.completions.create(model="tiny", messages=user("weather in Paris?"), tools=tools, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    r = client.chat.completions.create(model="tiny", messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        tools=tools, tool_choice="auto", max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    r = client.chat.completions.create(model="tiny", messages=user("weather?"), tools=tools, tool_choice="none",
                                       max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop") and not r.choices[0].message.tool_calls


@pytest.mark.parametrize("choice,tools,says", [
    ("required", True, "tool_choice 'required' is not supported: forcing a tool call needs guided decoding"),
    ({"type": "function", "function": {"name": "get_weather"}}, True, "the function 'get_weather' is not supported"),
    ({"type": "function", "function": {"name": "nope"}}, True, "'nope', which is not among the tools"),
    ("required", False, "tool_choice needs tools"),
])
def test_tool_choice_that_forces_a_call_is_refused(server, choice, tools, says):
    """We have no guided decoding to keep the promise of "required" or a named function: a clear
    400, not an answer that may or may not call the tool."""
    body = {"model": "tiny", "messages": user("weather in Paris?"), "max_tokens": 2, "tool_choice": choice}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    status, err = post(server, "/v1/chat/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == "tool_choice" and says in err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"


# -- speech out -----------------------------------------------------------------------------------
def test_chat_audio_out_each_format(client):
    for fmt in ("wav", "mp3", "flac", "opus", "pcm16"):
        r = client.chat.completions.create(model="tiny", messages=user(), max_tokens=3, temperature=0,
                                           modalities=["text", "audio"], audio={"voice": "Ethan", "format": fmt})
        msg = r.choices[0].message
        assert msg.audio.transcript == msg.content and msg.audio.expires_at > time.time()
        data = base64.b64decode(msg.audio.data)
        if fmt == "pcm16":
            assert len(data) > 0 and len(data) % 2 == 0
            continue
        rate, n = decode_audio(data)
        assert n > 0 and rate == (48000 if fmt == "opus" else 24000), fmt
        assert r.usage.completion_tokens_details.model_dump()["audio_tokens"] > 0


def test_chat_audio_out_stream(client):
    stream = client.chat.completions.create(model="tiny", messages=user(), max_tokens=3, temperature=0, stream=True,
                                            modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"})
    text, pcm, transcript, finish = "", b"", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        assert c.index == 0
        d = c.delta.model_dump()
        text += d.get("content") or ""
        if d.get("audio"):
            assert d["audio"]["id"].startswith("audio")
            pcm += base64.b64decode(d["audio"].get("data") or "")
            transcript += d["audio"].get("transcript") or ""
            assert finish is None  # audio comes before the finish
        finish = c.finish_reason or finish
    assert len(pcm) > 0 and len(pcm) % 2 == 0
    assert transcript == text and finish in ("length", "stop")


def test_speech_streams_while_the_text_is_written(client):
    stream = client.chat.completions.create(model="tiny", messages=user(), max_tokens=40, temperature=0, stream=True,
                                            modalities=["text", "audio"], audio={"voice": "Aiden", "format": "pcm16"})
    kinds = []
    for chunk in stream:
        d = chunk.choices[0].delta.model_dump() if chunk.choices else {}
        if d.get("audio") and d["audio"].get("data"):
            kinds.append("audio")
        elif d.get("content"):
            kinds.append("text")
    assert "audio" in kinds and kinds.index("audio") < len(kinds) - 1 - kinds[::-1].index("text")


def test_disconnect_while_speaking_frees_the_talker(server):
    wait_idle(server)
    body = {"model": "tiny", "messages": user("talk"), "max_tokens": 3000, "stream": True,
            "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"}}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"audio"' in line:
                    h = server.health().json()
                    assert h["speaking"] + h["running"] >= 1
                    break
    wait_idle(server, timeout=30)


@pytest.mark.parametrize("voice", VOICES)
def test_speech_each_voice(client, voice):
    r = client.audio.speech.create(model="tiny", voice=voice, input="Hello there.", response_format="wav")
    rate, n = decode_audio(r.content)
    assert rate == 24000 and n > 0


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "pcm"])
def test_speech_formats(server, fmt):
    r = httpx.post(server.url + "/v1/audio/speech", timeout=300,
                   json={"model": "tiny", "voice": "ethan", "input": "Good morning!", "response_format": fmt})
    assert r.status_code == 200, r.text
    if fmt == "pcm":
        assert r.headers["content-type"] == "audio/pcm" and len(r.content) > 0 and len(r.content) % 2 == 0
        return
    rate, n = decode_audio(r.content)
    assert n > 0 and rate == (48000 if fmt == "opus" else 24000)


# -- transcription / translation ------------------------------------------------------------------
def test_transcriptions_every_format(client, media):
    def tr(**kw):
        with open(media["audio"], "rb") as f:
            return client.audio.transcriptions.create(model="tiny", file=f, extra_body={"max_tokens": 4}, **kw)

    j = tr()
    assert isinstance(j.text, str) and j.usage.type == "tokens" and j.usage.output_tokens >= 1
    assert isinstance(tr(response_format="text"), str)
    v = tr(response_format="verbose_json", language="en", prompt="A tone.")
    assert abs(v.duration - 1.5) < 0.05 and v.language == "english" and v.segments[0].end == v.duration
    srt = tr(response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\n")
    vtt = tr(response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n")
    with open(media["audio"], "rb") as f:
        t = client.audio.translations.create(model="tiny", file=f, extra_body={"max_tokens": 3})
    assert isinstance(t.text, str)


def test_transcription_prompts_and_formats():
    from thinktalk.asr import asr_instruction, language_name, transcript_json, transcript_text
    from thinktalk.errors import InputError

    assert asr_instruction("transcribe", "English") == "Transcribe the English audio into text."
    assert asr_instruction("transcribe", "Chinese") == "请将这段中文语音转换为纯文本。"
    assert asr_instruction("translate", "French") == (
        "Listen to the provided French speech and produce a translation in English text.")
    assert language_name("EN") == language_name("english") == "English" and language_name("") is None
    with pytest.raises(InputError):
        language_name("xx")
    assert transcript_text("hi", "srt", 3661.5) == "1\n00:00:00,000 --> 01:01:01,500\nhi\n\n"
    v = transcript_json("hi", "verbose_json", 2.0, 10, [1, 2, 3], task="translate", logprobs=[-1.0, -3.0])
    assert v["language"] == "english" and v["segments"][0]["avg_logprob"] == -2.0
    assert v["usage"] == {"type": "tokens", "input_tokens": 10, "output_tokens": 3, "total_tokens": 13}


# -- load, disconnects, metrics -------------------------------------------------------------------
def test_sixteen_concurrent_mixed_requests(server, client, media):
    def text(i):
        r = client.chat.completions.create(model="tiny", messages=user(f"q{i}"), max_tokens=4 + i % 3)
        return r.choices[0].finish_reason

    def stream(i):
        chunks = list(client.chat.completions.create(model="tiny", messages=user(f"s{i}"), max_tokens=5, stream=True))
        return chunks[-1].choices[0].finish_reason

    def image(i):
        part = {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}}
        return client.chat.completions.create(model="tiny", messages=user("?", part), max_tokens=3).choices[0].finish_reason

    def speech(i):
        return "stop" if decode_audio(client.audio.speech.create(model="tiny", voice="Aiden", input=f"n{i}",
                                                                 response_format="wav").content)[1] > 0 else "bad"

    def transcribe(i):
        with open(media["audio"], "rb") as f:
            client.audio.transcriptions.create(model="tiny", file=f, extra_body={"max_tokens": 3})
        return "stop"

    jobs = [text] * 6 + [stream] * 5 + [image] * 2 + [speech] * 2 + [transcribe]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda ij: ij[1](ij[0]), enumerate(jobs)))
    assert len(results) == 16 and all(r in ("stop", "length") for r in results)
    wait_idle(server)


def test_disconnect_mid_stream_aborts(server):
    base = wait_idle(server)
    body = {"model": "tiny", "messages": user("go on"), "max_tokens": 5000, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    seen += 1
                if seen >= 5:
                    busy = server.health().json()
                    assert busy["running"] == 1 and busy["kv_used_tokens"] > 0 and busy["in_flight"] == 1
                    assert busy["kv_free_blocks"] < busy["kv_total_blocks"]
                    break  # leaving iter_lines early closes the connection: the client is gone
    after = wait_idle(server, timeout=30)  # running, waiting, KV and in-flight back to zero
    assert after["kv_used_tokens"] == base["kv_used_tokens"] == 0
    assert after["kv_free_blocks"] == base["kv_free_blocks"]
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", timeout=1.5,
                   json={"model": "tiny", "messages": user("more"), "max_tokens": 5000})
    wait_idle(server, timeout=30)


def test_metrics(server, client):
    client.chat.completions.create(model="tiny", messages=user(), max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("thinktalk_requests_total", "thinktalk_time_to_first_token_seconds_bucket",
                 "thinktalk_time_per_output_token_seconds_bucket", "thinktalk_time_to_first_audio_seconds_bucket",
                 "thinktalk_speech_real_time_factor_bucket", "thinktalk_num_requests_running",
                 "thinktalk_num_requests_waiting", "thinktalk_kv_cache_used_tokens", "thinktalk_gpu_count",
                 "thinktalk_num_requests_speaking", "thinktalk_talker_kv_cache_used_tokens",
                 "thinktalk_kv_cache_free_blocks"):
        assert name in text, name
    assert 'endpoint="/v1/chat/completions",model_name="tiny",status="200"' in text
    assert 'status="400"' in text  # from the error tests


# -- errors ---------------------------------------------------------------------------------------
def post(server, path, body, **kw):
    r = httpx.post(server.url + path, json=body, timeout=120, **kw)
    return r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text


@pytest.mark.parametrize("body,param", [
    ({"messages": user(), "temperature": 5}, "temperature"),
    ({"messages": user(), "max_tokens": 0}, "max_tokens"),
    ({"messages": user(), "n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": user("x", {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})},
     "messages.0.content.0.image_url"),
    ({"messages": user("x", {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})},
     "messages.0.content.0.input_audio.data"),
    ({"messages": user("x", {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAA"}})}, "messages"),
    ({"messages": user(), "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio.voice"),
    ({"messages": user(), "modalities": ["text", "audio"]}, "audio"),
    ({"messages": user(), "stream": True, "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "mp3"}},
     "audio.format"),
    ({"messages": user(), "top_logprobs": 2}, "top_logprobs"),
    ({"messages": user(), "seed": 2**70}, "seed"),
    ({"messages": user(), "stop": [""]}, "stop"),
    ({"messages": user("x", {"type": "hologram", "hologram": {}})}, "messages.0.content.0"),
    ({"messages": user(), "extra": 1, "preset": "wild"}, "preset"),
])
def test_bad_chat_requests_are_400(server, body, param):
    status, err = post(server, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, **body})
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param, err


def test_context_too_long_has_its_code(server):
    status, err = post(server, "/v1/chat/completions", {"model": "tiny", "messages": user("x " * 70_000)})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def test_other_errors(server, client, media):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user(), max_tokens=2)
    assert info.value.body["param"] == "model" and info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tiny", voice="alloy", input="hi")
    assert info.value.body["param"] == "voice" and "Ethan" in info.value.body["message"]
    assert post(server, "/v1/audio/speech", {"voice": "Ethan", "input": "   "})[0] == 400
    assert post(server, "/v1/audio/speech", {"voice": "Ethan", "input": "hi", "response_format": "ogg"})[0] == 400
    assert post(server, "/v1/audio/speech", {"voice": "Ethan", "input": "hi", "speed": 2})[0] == 400
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="tiny", file=("x.wav", b"not audio at all"))
    assert info.value.body["type"] == "invalid_request_error"
    with open(media["audio"], "rb") as f:
        with pytest.raises(openai.BadRequestError) as info:
            client.audio.transcriptions.create(model="tiny", file=f, language="klingon")
    assert info.value.body["param"] == "language"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in server.log()  # nothing a client sent was a server bug
    assert server.health().json()["status"] == "ready"
