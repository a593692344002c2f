"""Pieces of /v1/realtime without a server: turn detection, silero on real speech, the protocol's
session shapes, the input buffer, audio pacing, and prefix reuse of a re-sent conversation."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import wave

import numpy as np
import pytest

from thinktalk.server.realtime import AudioBuffer, Pacer
from thinktalk.server.realtime_protocol import (
    BETA, GA, Item, ProtocolError, SessionConfig, apply_session_update, dialect_of_session,
    event_name, truncate_text,
)
from thinktalk.server.vad import FRAME, TurnDetector


def voice(name, param):
    if name.lower() not in ("ethan", "chelsie"):
        raise ProtocolError(f"unknown voice {name}", param=param)
    return name.capitalize()


# -- turn detection ---------------------------------------------------------------------------------
def test_turn_detector_start_stop_and_padding():
    det = TurnDetector(threshold=0.5, prefix_padding_ms=320, silence_duration_ms=320, min_speech_ms=64)
    probs = [0.0] * 20 + [0.9] * 30 + [0.2] * 9 + [0.9] * 5 + [0.0] * 12
    events = det.push(np.array(probs))
    assert [e.kind for e in events] == ["start", "stop"]
    start, stop = events
    onset = 20 * FRAME
    assert start.sample == onset - 320 * 16  # the turn begins prefix_padding_ms before the speech
    assert start.detected_at == onset + 2 * FRAME  # after min_speech_ms of speech
    assert stop.sample == (20 + 30 + 9 + 5) * FRAME  # the short pause (9 frames < 10) did not end the turn
    assert stop.detected_at == stop.sample + 10 * FRAME  # 320 ms of silence = 10 frames
    assert not det.speaking


def test_turn_detector_ignores_clicks_and_uses_hysteresis():
    det = TurnDetector(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=96, min_speech_ms=96)
    assert det.push(np.array([0.9, 0.0, 0.9, 0.9, 0.0] * 4)) == []  # never 3 frames in a row
    events = det.push(np.array([0.9, 0.9, 0.9] + [0.4] * 10 + [0.1] * 3))
    # 0.4 is above threshold - 0.15: still speech once the turn has started
    assert [e.kind for e in events] == ["start", "stop"]
    assert events[1].sample == (20 + 13) * FRAME


def test_silero_hears_espeak_speech_not_silence_or_noise(tmp_path):
    pytest.importorskip("silero_vad")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is missing (apt-get install -y espeak-ng)")
    import soxr
    import torch

    from thinktalk.server.vad import SileroVAD

    path = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Good morning, this is a test of the detector."], check=True)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        x = soxr.resample(x, w.getframerate(), 16000).astype(np.float32)
    threads = torch.get_num_threads()
    vad = SileroVAD()
    assert torch.get_num_threads() == threads  # importing silero_vad must not take the engine's threads
    rng = np.random.default_rng(0)
    quiet = np.zeros(16000, np.float32)
    noise = (0.01 * rng.standard_normal(16000)).astype(np.float32)
    probs = np.concatenate([vad(quiet), vad(noise), vad(x[:1000]), vad(x[1000:]), vad(quiet)])
    n_quiet = 16000 // FRAME
    assert probs[: 2 * n_quiet].max() < 0.5
    speech = probs[2 * n_quiet : -n_quiet]
    assert (speech > 0.5).mean() > 0.5
    events = TurnDetector().push(probs)
    assert [e.kind for e in events] == ["start", "stop"]


# -- protocol -----------------------------------------------------------------------------------------
def test_session_update_ga_shape():
    cfg = SessionConfig(voice="Ethan")
    new = apply_session_update(cfg, {
        "type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"], "max_output_tokens": 50,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 800},
                            "transcription": {"model": "x"}},
                  "output": {"voice": "chelsie"}}}, GA, voice)
    assert (new.instructions, new.audio_out, new.max_output_tokens, new.input_rate, new.voice) == \
        ("Be brief.", False, 50, 16000, "Chelsie")
    assert new.turn_detection.silence_duration_ms == 800 and new.turn_detection.threshold == 0.5
    assert new.transcribe_input
    dumped = new.dump(GA, session_id="s", model="m")
    assert dumped["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 800
    assert dumped["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    off = apply_session_update(new, {"type": "realtime", "audio": {"input": {"turn_detection": None}}}, GA, voice)
    assert off.turn_detection is None and off.voice == "Chelsie"  # the rest is kept
    assert cfg.voice == "Ethan" and cfg.turn_detection is not None  # the old config is untouched


def test_session_update_beta_shape_and_errors():
    cfg = SessionConfig(voice="Ethan")
    new = apply_session_update(cfg, {"modalities": ["text", "audio"], "voice": "Chelsie", "turn_detection": None,
                                     "input_audio_format": "pcm16", "input_audio_sample_rate": 16000,
                                     "max_response_output_tokens": "inf", "temperature": 0.3}, BETA, voice)
    assert (new.voice, new.turn_detection, new.input_rate, new.max_output_tokens, new.temperature) == \
        ("Chelsie", None, 16000, None, 0.3)
    assert new.dump(BETA, session_id="s", model="m")["voice"] == "Chelsie"
    bad = [({"input_audio_format": "g711_ulaw"}, "session.input_audio_format"),
           ({"turn_detection": {"type": "semantic_vad"}}, "session.turn_detection.type"),
           ({"turn_detection": {"threshold": -1}}, "session.turn_detection.threshold"),
           ({"modalities": ["video"]}, "session.modalities"),
           ({"voice": "Nobody"}, "session.voice"),
           ({"input_audio_sample_rate": 8000}, "session.input_audio_sample_rate")]
    for session, param in bad:
        with pytest.raises(ProtocolError) as info:
            apply_session_update(cfg, session, BETA, voice)
        assert info.value.param == param


def test_dialects():
    assert dialect_of_session({"type": "realtime"}) == GA
    assert dialect_of_session({"audio": {}}) == GA
    assert dialect_of_session({"voice": "x", "turn_detection": None}) == BETA
    assert dialect_of_session({"instructions": "x"}) is None
    assert event_name("response.output_audio.delta", BETA) == "response.audio.delta"
    assert event_name("response.output_audio_transcript.delta", BETA) == "response.audio_transcript.delta"
    assert event_name("response.output_audio.delta", GA) == "response.output_audio.delta"
    assert event_name("response.done", BETA) == "response.done"


def test_items_render_the_conversation():
    audio = np.zeros(16000, np.float32)
    user = Item(id="a", role="user", audio=audio, images=[b"\xff\xd8\xff..."], text="look")
    assert [p["type"] for p in user.message()["content"]] == ["image", "audio", "text"]
    assert [c["type"] for c in user.dump(GA)["content"]] == ["input_image", "input_audio", "input_text"]
    said = Item(id="b", role="assistant", text="Hello there", spoken=True)
    assert said.message() == {"role": "assistant", "content": "Hello there"}
    assert said.dump(BETA)["content"][0]["type"] == "audio" and said.dump(GA)["content"][0]["type"] == "output_audio"
    assert Item(id="c", role="assistant", text="").message() is None  # nothing heard: not in the history


def test_truncate_text():
    text = "The quick brown fox jumps over the lazy dog"
    assert truncate_text(text, 1.0) == text and truncate_text(text, 0.0) == ""
    assert truncate_text(text, 0.5) == "The quick brown fox"  # back to a word boundary
    assert truncate_text("word", 0.5) == "wo"


# -- buffer and pacing ---------------------------------------------------------------------------------
def test_audio_buffer_absolute_positions():
    buf = AudioBuffer()
    for k in range(5):
        buf.append(np.full(100, k, np.float32))
    assert (buf.start, buf.end, len(buf)) == (0, 500, 500)
    seg = buf.take(150, 320)
    assert len(seg) == 170 and seg[0] == 1 and seg[-1] == 3
    assert buf.start == 320 and len(buf) == 180
    assert len(buf.take(0, 10_000)) == 180 and len(buf) == 0  # clamped to what is kept
    buf.append(np.ones(50, np.float32))
    buf.drop_before(520)
    assert (buf.start, buf.end) == (520, 550)
    buf.clear()
    assert len(buf) == 0 and buf.start == 550


def test_pacer_keeps_a_bounded_lead():
    async def go():
        pacer = Pacer(lead_s=0.1, rate=1000)
        t0 = time.monotonic()
        for _ in range(5):
            await pacer.wait(100)  # 5 x 100 ms of audio
        return time.monotonic() - t0

    took = asyncio.run(go())
    # the 5th chunk may leave when 400 ms are due and 100 ms of lead are allowed: after ~300 ms
    assert 0.25 < took < 0.6


# -- prefix reuse ---------------------------------------------------------------------------------------
def _paged_omni(path, prefix_caching=True):
    from thinktalk.api import Omni
    from thinktalk.engine import EngineConfig

    return Omni.load(path, device="cpu", talker=False, progress=False,
                     engine_config=EngineConfig(kv_backend="paged", num_kv_blocks=512, block_size=16,
                                                enable_prefix_caching=prefix_caching))


def _turn(omni, items, stats=None):
    """One turn the way the realtime server makes it (whole history, per-clip audio features)."""
    from thinktalk.request import SamplingParams

    req = omni.make_request([i.message() for i in items if i.message() is not None],
                            SamplingParams(temperature=0.0, max_new_tokens=6), audio_per_clip=True)
    before = dict(omni.engine.stats)
    for _ in omni.stream(req):
        pass
    if stats is not None:
        stats.update({k: omni.engine.stats[k] - before[k] for k in before})
    return req, omni.engine.stats["cached_tokens"] - before["cached_tokens"], omni.finish(req).text


def test_resent_conversation_reuses_the_kv_prefix(tiny_instruct):
    """Each turn re-sends the history rendered by the chat template as before: the engine's prefix
    cache finds every full block of the previous turn's prompt."""
    omni = _paged_omni(tiny_instruct)
    items = [Item(id="s", role="system", text="You are a helpful voice assistant. " * 4),
             Item(id="u1", role="user", text="What is the capital of France? Answer in one word, please.")]
    req1, cached1, answer = _turn(omni, items)
    assert cached1 == 0
    items += [Item(id="a1", role="assistant", text=answer, spoken=True),
              Item(id="u2", role="user", text="And of Italy?")]
    req2, cached2, _ = _turn(omni, items)
    assert len(req1.prompt_ids) >= 32 and req2.prompt_ids[: len(req1.prompt_ids)] == req1.prompt_ids
    assert cached2 >= len(req1.prompt_ids) // 16 * 16


def test_resent_spoken_conversation_reuses_the_kv_prefix(tiny_instruct):
    omni = _paged_omni(tiny_instruct)
    rng = np.random.default_rng(0)
    a1 = (0.1 * rng.standard_normal(48000)).astype(np.float32)
    a2 = (0.1 * rng.standard_normal(12000)).astype(np.float32)
    items = [Item(id="u1", role="user", audio=a1)]
    req1, _, answer = _turn(omni, items)
    items += [Item(id="a1", role="assistant", text=answer or "ok", spoken=True), Item(id="u2", role="user", audio=a2)]
    req2, cached2, _ = _turn(omni, items)
    assert len(req1.prompt_ids) >= 32 and req2.prompt_ids[: len(req1.prompt_ids)] == req1.prompt_ids
    assert cached2 >= len(req1.prompt_ids) // 16 * 16


def test_three_spoken_turns_compute_only_the_new_turn(tiny_instruct):
    """A spoken conversation of three turns (the second clip the longest, so the reference batch
    features would have changed the first clip's): each turn computes only its own tokens, and the
    answers are the ones of the same engine with prefix caching off."""
    rng = np.random.default_rng(1)
    clips = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in (1.0, 2.6, 0.7)]

    def converse(omni):
        items, turns = [Item(id="s", role="system", text="You are a voice assistant.")], []
        for k, clip in enumerate(clips):
            items.append(Item(id=f"u{k}", role="user", audio=clip))
            stats = {}
            req, _, answer = _turn(omni, items, stats)
            turns.append((list(req.prompt_ids), list(req.output_ids), stats, req.num_cached_tokens))
            items.append(Item(id=f"a{k}", role="assistant", text=answer or "ok", spoken=True))
        return turns

    cached_run = converse(_paged_omni(tiny_instruct))
    plain_run = converse(_paged_omni(tiny_instruct, prefix_caching=False))
    for (p1, o1, s1, c1), (p2, o2, s2, c2) in zip(cached_run, plain_run):
        assert p1 == p2 and o1 == o2  # same prompts, same greedy answers
        assert s2["cached_tokens"] == 0 and s2["prefill_tokens"] == len(p2) and c2 == 0
    for (prev, _, _, _), (prompt, _, stats, cached) in zip(cached_run, cached_run[1:]):
        assert prompt[: len(prev)] == prev
        assert stats["cached_tokens"] == cached >= len(prev) // 16 * 16  # the whole earlier conversation
        assert stats["prefill_tokens"] == len(prompt) - cached  # the new turn, from the last partial block
        assert stats["prefill_tokens"] < len(prompt) - len(prev) + 16


def test_reference_speech_source(tiny_instruct):
    """The fallback SpeechSource (no streaming stage): waits for the text, then the reference path."""
    from types import SimpleNamespace

    from thinktalk.api import Omni
    from thinktalk.request import SamplingParams
    from thinktalk.server.metrics import Metrics
    from thinktalk.server.realtime import ReferenceSpeech, StageSpeech

    omni = Omni.load(tiny_instruct, device="cpu", progress=False)
    req = omni.make_request([{"role": "user", "content": "hi"}], SamplingParams(temperature=0.0, max_new_tokens=4),
                            speaker="Ethan")
    for _ in omni.stream(req):
        pass

    async def run_in(fn, *a, **k):
        return fn(*a, **k)

    st = SimpleNamespace(omni=omni, max_speech_frames=3, metrics=Metrics("t"),
                         run_speech=lambda fn: run_in(fn), run_cpu=run_in)

    async def go():
        done = asyncio.get_running_loop().create_future()
        chunks = []

        async def collect():
            async for pcm in ReferenceSpeech(st).stream(req, done):
                chunks.append(pcm)

        task = asyncio.ensure_future(collect())
        await asyncio.sleep(0.05)
        assert not chunks  # nothing before the text is done
        done.set_result(req.finish_reason)
        await task
        staged = StageSpeech()
        staged.feed(b"\x01\x00")
        staged.feed(None)
        return chunks, [c async for c in staged.stream(req, done)]

    chunks, staged = asyncio.run(go())
    n = len(b"".join(chunks))
    assert n % 2 == 0 and 2 * 1920 * 2 < n <= 3 * 1920 * 2  # at most 3 codec frames of pcm16
    assert staged == [b"\x01\x00"]
