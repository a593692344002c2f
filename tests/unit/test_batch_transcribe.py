"""`thinktalk transcribe`: silence splitting, the subtitle formats, and a folder in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from thinktalk.transcribe import Segment, Transcript, find_recordings, render, split_on_silence

RATE = 16000


def voice(seconds, f=180.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * f * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def silence(seconds, level=0.0005, seed=1):
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


def test_split_on_silence_finds_the_pauses():
    audio = np.concatenate([silence(0.3), voice(2.0), silence(0.8), voice(1.5), silence(1.0), voice(2.5), silence(0.2)])
    spans = split_on_silence(audio, RATE)
    assert len(spans) == 3
    # each cut lies inside its pause
    assert 2.3 <= spans[0][1] <= 3.1 and spans[1][0] == spans[0][1]
    assert 4.6 <= spans[1][1] <= 5.6
    assert spans[-1][1] <= len(audio) / RATE + 1e-6


def test_short_pauses_and_pieces_are_not_cut():
    audio = np.concatenate([voice(1.5), silence(0.2), voice(1.5)])  # a breath, not a pause
    assert len(split_on_silence(audio, RATE)) == 1
    audio = np.concatenate([voice(0.3), silence(0.8), voice(3.0)])  # a piece shorter than 1 s joins the next
    assert len(split_on_silence(audio, RATE, min_segment_s=1.0)) == 1


def test_long_speech_is_cut_below_the_limit_and_silence_gives_nothing():
    spans = split_on_silence(voice(70.0), RATE, max_segment_s=30.0)
    assert len(spans) >= 3 and all(b - a <= 30.0 + 1e-6 for a, b in spans)
    assert abs(spans[-1][1] - 70.0) < 0.05
    assert split_on_silence(np.zeros(RATE * 2, dtype=np.float32), RATE) == []


def test_formats():
    t = Transcript(path=__import__("pathlib").Path("/x/a.wav"), duration=5.5,
                   segments=[Segment(0.0, 2.25, "Hello\n\nthere"), Segment(2.25, 5.5, " general --> Kenobi "),
                             Segment(5.5, 5.5, "")])
    srt = render(t, "srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,250\nHello there\n\n2\n00:00:02,250 --> 00:00:05,500\n")
    assert srt.count(" --> ") == 2  # no arrow from the text, no empty cue
    vtt = render(t, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.250\nHello there\n\n")
    assert render(t, "txt") == "Hello\n\nthere general --> Kenobi\n"
    data = json.loads(render(t, "json"))
    assert data["duration"] == 5.5 and len(data["segments"]) == 3 and data["segments"][1]["start"] == 2.25
    with pytest.raises(ValueError):
        render(t, "docx")


def test_find_recordings(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.wav", "a.mp3", "sub/c.flac", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = find_recordings([tmp_path])
    assert [p.name for p in found] == ["a.mp3", "b.wav", "c.flac"]


def test_transcribe_folder_in_process(tiny_instruct, tmp_path):
    from thinktalk.api import Omni
    from thinktalk.batch import EngineBackend
    from thinktalk.audio_out import wav_bytes
    from thinktalk.transcribe import transcribe_files

    omni = Omni.load(tiny_instruct, device="cpu", talker=False, progress=False)
    (tmp_path / "one.wav").write_bytes(wav_bytes(np.concatenate([voice(1.2), silence(0.8), voice(1.2, f=240)]), 16000))
    (tmp_path / "two.wav").write_bytes(wav_bytes(voice(1.0), 16000))
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio")
    files = find_recordings([tmp_path])
    transcripts, stats = transcribe_files(files, EngineBackend(omni), split=True, max_tokens=3, progress=False)
    by_name = {t.path.name: t for t in transcripts}
    assert by_name["broken.wav"].error
    assert len(by_name["one.wav"].segments) == 2 and by_name["one.wav"].segments[0].end > 1.0
    assert all(s.text for s in by_name["one.wav"].segments + by_name["two.wav"].segments)
    assert stats.done == 3 and stats.errors == 0
    srt = render(by_name["one.wav"], "srt")
    assert srt.count(" --> ") == 2
