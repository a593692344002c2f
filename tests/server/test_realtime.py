"""/v1/realtime end to end: a real `thinktalk serve` (tiny random checkpoint, an API key), driven by
the official `openai` client's realtime API (GA `client.realtime` and `client.beta.realtime`), with
real speech made by espeak-ng so the server's silero VAD hears a voice.

The random model's words are noise; what is checked is the protocol: event order and names of
each dialect, turns found by the VAD, cancel and barge-in (within 100 ms, the answer truncated to
the audio sent), camera frames, bad events, auth, and the `thinktalk talk` client.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")
pytest.importorskip("silero_vad")

KEY = "sk-realtime-test"
MAX_SPEECH_S = "2"  # the random talker never ends by itself: every answer is this long
TOKENS = 6  # max_output_tokens of every answer


# -- speech made by a real TTS ----------------------------------------------------------------------
def espeak_pcm(text: str, rate: int, tmp) -> bytes:
    """pcm16 mono at `rate` of `text` spoken by espeak-ng, leading/trailing silence trimmed."""
    import soxr

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is missing (apt-get install -y espeak-ng): the VAD tests need real speech")
    path = tmp / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-s", "160", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        src = w.getframerate()
    loud = np.flatnonzero(np.abs(x) > 0.02)
    x = x[max(loud[0] - 200, 0) : loud[-1] + 200]
    y = soxr.resample(x, src, rate)
    return (np.clip(y, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech")
    out = {"hello24": espeak_pcm("Hello there, how are you today?", 24000, tmp),
           "hello16": espeak_pcm("Hello there, how are you today?", 16000, tmp),
           "stop24": espeak_pcm("Wait, stop, let me say something.", 24000, tmp)}
    wav = tmp / "hello.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(out["hello16"])
    out["wav"] = wav
    return out


def silence(seconds: float, rate: int = 24000) -> bytes:
    return b"\x00\x00" * int(seconds * rate)


def jpeg(w=64, h=48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


# -- server and clients ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(serve_factory, tiny_instruct):
    return serve_factory("--model", str(tiny_instruct), "--served-model-name", "tiny", "--max-num-seqs", "4",
                         "--max-speech-seconds", MAX_SPEECH_S, "--api-key", KEY)


def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                              websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def stream_audio(conn, pcm: bytes, rate: int = 24000, chunk_ms: int = 40, realtime: bool = True):
    """input_audio_buffer.append in chunks, at real-time pace like a microphone."""
    step = rate * chunk_ms // 1000 * 2
    t0 = time.monotonic()
    for k, start in enumerate(range(0, len(pcm), step)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start : start + step]).decode())
        if realtime:
            delay = t0 + (k + 1) * chunk_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def events_until(conn, last: str, log: list | None = None, timeout: float = 90) -> list:
    """Events (type, event, arrival time) up to and including the first of type `last`."""
    out = log if log is not None else []
    deadline = time.monotonic() + timeout
    while True:
        ev = await asyncio.wait_for(conn.recv(), max(0.1, deadline - time.monotonic()))
        out.append((ev.type, ev, time.monotonic()))
        if ev.type == last:
            return out


def types(log) -> list[str]:
    return [t for t, _, _ in log]


def audio_bytes(log, name="response.output_audio.delta") -> int:
    return sum(len(base64.b64decode(ev.delta)) for t, ev, _ in log if t == name)


def wait_idle(server, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        h = server.health().json()
        if (h["running"], h["waiting"], h["in_flight"]) == (0, 0, 0):
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {h}")
        time.sleep(0.1)


MANUAL_GA = {"type": "realtime", "max_output_tokens": TOKENS, "audio": {"input": {"turn_detection": None}}}


# -- tests -----------------------------------------------------------------------------------------
def test_manual_turn_ga(server, speech):
    async def go():
        async with aclient(server).realtime.connect(model="tiny") as conn:
            created = await conn.recv()
            assert created.type == "session.created"
            assert created.session.audio.output.voice == "Ethan"
            assert created.session.audio.input.turn_detection.type == "server_vad"
            await conn.session.update(session=MANUAL_GA)
            updated = await conn.recv()
            assert updated.type == "session.updated" and updated.session.audio.input.turn_detection is None
            await stream_audio(conn, speech["hello24"], realtime=False)
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            log = await events_until(conn, "response.done")
            names = types(log)
            assert names[:3] == ["input_audio_buffer.committed", "conversation.item.created", "response.created"]
            user = log[1][1].item
            assert user.role == "user" and [c.type for c in user.content] == ["input_audio"]
            for name in ("response.output_item.added", "response.content_part.added",
                         "response.output_audio_transcript.delta", "response.output_audio.delta",
                         "response.output_audio.done", "response.output_audio_transcript.done",
                         "response.output_item.done"):
                assert name in names, name
            assert "response.audio.delta" not in names  # beta spelling only in the beta dialect
            assert names.index("response.output_audio_transcript.delta") < names.index("response.output_audio_transcript.done")
            # the speech stage speaks while the thinker writes: audio before the last of the text
            last_text = max(i for i, name in enumerate(names) if name == "response.output_audio_transcript.delta")
            assert names.index("response.output_audio.delta") < last_text
            done = log[-1][1].response
            assert done.status in ("completed", "incomplete") and done.usage.input_token_details.audio_tokens > 0
            transcript = "".join(ev.delta for t, ev, _ in log if t == "response.output_audio_transcript.delta")
            assert transcript.strip() and done.output[0].content[0].transcript == transcript.strip()
            n = audio_bytes(log)
            assert n % 2 == 0 and 0.5 * 24000 * 2 < n <= float(MAX_SPEECH_S) * 24000 * 2 + 4800
            # a second turn (typed) continues the same conversation
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "And then?"}]})
            await conn.response.create(response={"output_modalities": ["text"]})
            log2 = await events_until(conn, "response.done")
            created_items = [ev.item for t, ev, _ in log2 if t == "conversation.item.created"]
            assert created_items[0].role == "user" and created_items[1].role == "assistant"
            assert "response.output_text.delta" in types(log2) and "response.output_audio.delta" not in types(log2)
            assert log2[-1][1].response.usage.input_tokens > done.usage.input_tokens  # the history was re-sent

    run(go())


def test_spoken_turns_reuse_the_cached_conversation(serve_factory, tiny_instruct, speech):
    """Three spoken turns against a server with the paged KV cache: each turn's usage reports the
    whole earlier conversation as cached (the second clip is the longest, which would change the
    first clip's reference features: the server computes each clip's features alone)."""
    paged = serve_factory("--model", str(tiny_instruct), "--served-model-name", "tiny", "--kv-backend", "paged",
                          "--api-key", KEY)
    clips = [speech["hello24"], speech["stop24"] + speech["hello24"], speech["hello24"][: len(speech["hello24"]) // 2]]

    async def go():
        usages = []
        async with aclient(paged).realtime.connect(model="tiny") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={**MANUAL_GA, "output_modalities": ["text"]})
            assert (await conn.recv()).type == "session.updated"
            for pcm in clips:
                await stream_audio(conn, pcm, realtime=False)
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                log = await events_until(conn, "response.done")
                usages.append(log[-1][1].response.usage)
        return usages

    usages = run(go())
    assert usages[0].input_token_details.cached_tokens == 0
    for prev, cur in zip(usages, usages[1:]):
        assert cur.input_token_details.audio_tokens > prev.input_token_details.audio_tokens
        # the previous prompt in full blocks of 16 (its answer too, as far as it re-tokenizes alike)
        assert prev.input_tokens // 16 * 16 <= cur.input_token_details.cached_tokens < cur.input_tokens


def tone_pcm(seconds: float, freq: float, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (0.7 + 0.3 * np.sin(2 * np.pi * 3 * t))
    return (x * 32767).astype("<i2").tobytes()


def test_spoken_answers_reuse_the_cached_conversation(serve_factory, tiny_instruct):
    """Spoken answers (audio out) to three turns, with camera frames, on the paged KV cache: each
    turn reuses the whole earlier conversation (the talker's hidden states of the cached prefix
    come from the engine's pool), and the session processes each clip and frame once."""
    paged = serve_factory("--model", str(tiny_instruct), "--served-model-name", "tiny", "--kv-backend", "paged",
                          "--max-speech-seconds", MAX_SPEECH_S, "--api-key", KEY)
    turns = [(tone_pcm(1.2, 220), jpeg(64, 48)), (tone_pcm(2.0, 330), None), (tone_pcm(0.7, 440), jpeg(48, 64))]

    async def go():
        usages, sound = [], []
        async with aclient(paged).realtime.connect(model="tiny") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={**MANUAL_GA, "output_modalities": ["audio"]})
            assert (await conn.recv()).type == "session.updated"
            for pcm, frame in turns:
                if frame is not None:
                    await conn.send_raw(json.dumps({"type": "input_image_buffer.append",
                                                    "image": base64.b64encode(frame).decode()}))
                await stream_audio(conn, pcm, realtime=False)
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                log = await events_until(conn, "response.done")
                usages.append(log[-1][1].response.usage)
                sound.append(audio_bytes(log))
        return usages, sound

    usages, sound = run(go(), timeout=240)
    assert all(n > 0 for n in sound)  # every answer was spoken
    assert usages[0].input_token_details.cached_tokens == 0
    assert usages[2].input_token_details.image_tokens > usages[1].input_token_details.image_tokens > 0
    for prev, cur in zip(usages, usages[1:]):
        # the previous prompt in full blocks of 16 (its answer too, as far as it re-tokenizes alike)
        assert prev.input_tokens // 16 * 16 <= cur.input_token_details.cached_tokens < cur.input_tokens
    print("spoken turns (prompt, cached):", [(u.input_tokens, u.input_token_details.cached_tokens) for u in usages])


def test_beta_dialect_16k(server, speech):
    async def go():
        client = aclient(server)
        async with client.beta.realtime.connect(model="tiny") as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.voice == "Ethan"
            await conn.session.update(session={"modalities": ["text", "audio"], "voice": "Chelsie",
                                               "turn_detection": None, "input_audio_format": "pcm16",
                                               "input_audio_sample_rate": 16000,
                                               "max_response_output_tokens": TOKENS})
            updated = await conn.recv()
            assert updated.type == "session.updated" and updated.session.voice == "Chelsie"
            assert updated.session.turn_detection is None
            await stream_audio(conn, speech["hello16"], rate=16000, realtime=False)
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            log = await events_until(conn, "response.done")
            names = types(log)
            assert "response.audio.delta" in names and "response.audio_transcript.delta" in names, (names, log[-1][1])
            assert "response.audio.done" in names and "response.audio_transcript.done" in names
            assert not [n for n in names if n.startswith("response.output_audio")]
            assert log[-1][1].response.voice == "Chelsie"
            item = [ev.item for t, ev, _ in log if t == "conversation.item.created"][1]
            assert item.role == "assistant" and item.content[0].type == "audio"
            assert audio_bytes(log, "response.audio.delta") > 0

    run(go())


def test_vad_turn(server, speech):
    """0.5 s silence + speech + 1.2 s silence at real-time pace: the VAD makes the turn and answers."""
    async def go():
        async with aclient(server).realtime.connect(model="tiny") as conn:
            await conn.recv()
            await conn.session.update(session={"type": "realtime", "max_output_tokens": TOKENS, "audio": {"input": {
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 500}}}})
            assert (await conn.recv()).type == "session.updated"
            pcm = silence(0.5) + speech["hello24"] + silence(1.2)
            speech_ms = len(speech["hello24"]) // 48
            log: list = []
            reader = asyncio.ensure_future(events_until(conn, "response.done", log))
            t0 = time.monotonic()
            await stream_audio(conn, pcm)
            await reader
            names = types(log)
            order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.created", "response.created",
                     "response.output_audio.delta", "response.done"]
            assert all(n in names for n in order), names
            assert all(names.index(a) < names.index(b) for a, b in zip(order, order[1:])), names
            started = log[names.index(order[0])][1]
            stopped = log[names.index(order[1])][1]
            assert 0 <= started.audio_start_ms <= 500  # 500 ms of silence, less the 300 ms prefix padding
            assert 500 + speech_ms - 400 <= stopped.audio_end_ms <= 500 + speech_ms + 400
            assert started.item_id == stopped.item_id == log[names.index("input_audio_buffer.committed")][1].item_id
            # the turn ended about silence_duration_ms after the speech, while the audio was still streaming
            assert log[names.index(order[1])][2] - t0 < len(pcm) / 48000 + 1.0
            assert log[-1][1].response.status in ("completed", "incomplete")

    run(go())


def test_response_cancel(server, speech):
    async def go():
        async with aclient(server).realtime.connect(model="tiny") as conn:
            await conn.recv()
            await conn.session.update(session=MANUAL_GA)
            await conn.recv()
            await conn.response.cancel()  # nothing to cancel
            err = await conn.recv()
            assert err.type == "error" and err.error.code == "response_cancel_not_active"
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Tell me a story."}]})
            await conn.response.create(response={"max_output_tokens": 200})
            log = await events_until(conn, "response.created")
            await conn.response.cancel()
            log = await events_until(conn, "response.done", log)
            done = log[-1][1].response
            assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
            # nothing of the cancelled response comes after its response.done; the session goes on
            await conn.response.create()
            log2 = await events_until(conn, "response.done")
            assert {ev.response_id for t, ev, _ in log2 if t.startswith("response.output_audio")} <= {log2[-1][1].response.id}
            assert log2[-1][1].response.status in ("completed", "incomplete")

    run(go())
    wait_idle(server)


BARGE_IN_SPEECH_S = "8"  # the answer's paced audio outlasts the VAD's detection on a loaded machine


def test_barge_in(serve_factory, tiny_instruct, speech):
    """Speech during an answer's audio cancels it within 100 ms; the answer keeps what was sent.
    Its own server with long answers: with MAX_SPEECH_S (2 s) the answer could end before a busy
    2-core machine's VAD reported the speech."""
    server = serve_factory("--model", str(tiny_instruct), "--served-model-name", "tiny", "--max-num-seqs", "4",
                           "--max-speech-seconds", BARGE_IN_SPEECH_S, "--api-key", KEY)

    async def go():
        async with aclient(server).realtime.connect(model="tiny") as conn:
            await conn.recv()
            await conn.session.update(session={"type": "realtime", "max_output_tokens": TOKENS, "audio": {
                "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 400,
                                             "create_response": False}}}})
            await conn.recv()
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hi!"}]})
            await conn.response.create()
            log = await events_until(conn, "response.output_audio.delta")
            talker = asyncio.ensure_future(stream_audio(conn, speech["stop24"] + silence(0.6)))
            log = await events_until(conn, "response.done", log)
            names = types(log)
            i_start = names.index("input_audio_buffer.speech_started")
            assert i_start < len(names) - 1
            done = log[-1][1].response
            assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
            assert log[-1][2] - log[i_start][2] < 0.1, "the answer was not cut within 100 ms of the speech"
            truncated = [ev for t, ev, _ in log if t == "conversation.item.truncated"]
            assert len(truncated) == 1
            sent_ms = audio_bytes(log) // 48
            assert truncated[0].audio_end_ms == sent_ms
            assert 0 < sent_ms < float(BARGE_IN_SPEECH_S) * 1000 - 100  # cut short
            assert done.output[0].status == "incomplete"
            # no audio of the cancelled answer after response.done
            later = await events_until(conn, "input_audio_buffer.committed")
            assert "response.output_audio.delta" not in types(later)
            await talker
            # the client heard even less than was sent (its playback was behind): it says so
            item_id = done.output[0].id
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=sent_ms // 2)
            ev = (await events_until(conn, "conversation.item.truncated"))[-1][1]
            assert (ev.item_id, ev.audio_end_ms) == (item_id, sent_ms // 2)

    run(go())
    wait_idle(server)
    server.stop()


def test_camera_frame_turn(server):
    async def go():
        async with aclient(server).realtime.connect(model="tiny") as conn:
            await conn.recv()
            await conn.session.update(session={**MANUAL_GA, "output_modalities": ["text"]})
            await conn.recv()
            frame = base64.b64encode(jpeg()).decode()
            await conn.send_raw(json.dumps({"type": "input_image_buffer.append", "image": frame}))
            await conn.send_raw(json.dumps({"type": "input_image_buffer.append", "image": frame}))
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What do you see?"}]})
            ev = await conn.recv()
            assert ev.type == "conversation.item.created"
            assert [c.type for c in ev.item.content] == ["input_image", "input_text"]  # the latest frame only
            await conn.response.create()
            log = await events_until(conn, "response.done")
            usage = log[-1][1].response.usage
            assert usage.input_token_details.image_tokens > 0
            # frames are used once: the next turn has none of its own
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "And now?"}]})
            ev = await conn.recv()
            assert [c.type for c in ev.item.content] == ["input_text"]

    run(go())


def test_malformed_events_keep_the_session(server):
    async def go():
        async with aclient(server).realtime.connect(model="tiny") as conn:
            await conn.recv()
            bad = [
                ("this is not json", "invalid_json", None),
                (json.dumps([1, 2]), "invalid_event", None),
                (json.dumps({"type": "no.such.event", "event_id": "e1"}), "invalid_event", "type"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_base64", "audio"),
                (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), None, "audio"),
                (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
                (json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
                    "turn_detection": {"type": "server_vad", "threshold": 3}}}}}), None,
                 "session.audio.input.turn_detection.threshold"),
                (json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
                    "output": {"voice": "Nobody"}}}}), "invalid_voice", "session.audio.output.voice"),
                (json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": 44100}}}}}), None, "session.audio.input.format.rate"),
                (json.dumps({"type": "input_image_buffer.append", "image": base64.b64encode(b"GIF89a....").decode()}),
                 "invalid_image", "image"),
                (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "robot",
                                                                          "content": []}}), None, "item.role"),
                (json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 1}),
                 "item_not_found", "item_id"),
                (json.dumps({"type": "response.create", "response": "now"}), None, "response"),
            ]
            for raw, code, param in bad:
                await conn.send_raw(raw)
                ev = await asyncio.wait_for(conn.recv(), 10)
                assert ev.type == "error", raw
                assert ev.error.message
                if code is not None:
                    assert ev.error.code == code, (raw, ev.error)
                if param is not None:
                    assert ev.error.param == param, (raw, ev.error)
            assert ev.error.type == "invalid_request_error"
            # an answer with nothing to answer fails as a response, and the session is still fine
            await conn.session.update(session=MANUAL_GA)
            assert (await conn.recv()).type == "session.updated"
            await conn.response.create()
            log = await events_until(conn, "response.done")
            assert "error" in types(log) and log[-1][1].response.status == "failed"
            await conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
            ev = await conn.recv()
            assert ev.type == "session.updated" and ev.session.instructions == "Be brief."

    run(go())


def test_auth_and_handshake(server):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url = f"ws://127.0.0.1:{server.port}/v1/realtime"

    async def go():
        for headers, subprotocols in [({}, None), ({"Authorization": "Bearer wrong"}, None),
                                      ({}, ["realtime", "openai-insecure-api-key.wrong"])]:
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers, subprotocols=subprotocols):
                    pass
            assert info.value.response.status_code == 401
            assert json.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
        # browsers cannot set headers: the key rides in a subprotocol, and the server picks 'realtime'
        async with connect(url + "?api=beta", subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
            assert ws.subprotocol == "realtime"
            ev = json.loads(await ws.recv())
            assert ev["type"] == "session.created" and "voice" in ev["session"]  # beta shape by ?api=beta
        with pytest.raises(InvalidStatus) as info:
            async with connect(url + "?model=other", additional_headers={"Authorization": f"Bearer {KEY}"}):
                pass
        assert info.value.response.status_code == 404

    run(go())


def test_talk_cli_with_a_wav(server, speech, tmp_path):
    out = tmp_path / "replies"
    proc = subprocess.run(
        [sys.executable, "-m", "thinktalk.cli", "talk", "--url", server.url, "--input-wav", str(speech["wav"]),
         "--output-dir", str(out), "--voice", "Aiden", "--max-output-tokens", str(TOKENS)],
        capture_output=True, text=True, timeout=180, env={**__import__("os").environ, "THINKTALK_API_KEY": KEY})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "you: " in proc.stdout and "assistant: " in proc.stdout, proc.stdout
    assert "after end of speech" in proc.stdout
    reply = out / "reply-1.wav"
    with wave.open(str(reply)) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0.5 * 24000
    wait_idle(server)
