"""`thinktalk run`, `chat` and `make-tiny` on a tiny checkpoint, every input kind, speech out."""

import wave

import pytest
from typer.testing import CliRunner

from thinktalk.cli import app

runner = CliRunner()


def _run(*args, input=None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    return result


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--image", "image"],
        ["--image", "image", "--image", "image2"],
        ["--audio", "audio"],
        ["--video", "video"],
        ["--video", "video", "--use-audio-in-video"],
    ],
    ids=["text", "image", "two-images", "audio", "video", "video-with-audio"],
)
def test_run_every_input_kind(tiny_instruct, media, flags):
    args = [media[f] if f in media else f for f in flags]
    result = _run("run", "--model", tiny_instruct, "--max-new-tokens", 8, "--seed", 1, *args, "Describe it.")
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output  # the tiny model says what it is


def test_run_speech_out_writes_24khz_wav(tiny_instruct, tmp_path):
    out = tmp_path / "reply.wav"
    result = _run("run", "--model", tiny_instruct, "--max-new-tokens", 6, "--speaker", "Chelsie",
                  "--speech-out", out, "--temperature", 0, "Say hi.")
    assert result.exit_code == 0, result.output
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        seconds = w.getnframes() / w.getframerate()
    assert seconds > 0
    assert f"{seconds:.2f} s" in result.output


def test_run_preset_and_override(tiny_instruct):
    result = _run("run", "--model", tiny_instruct, "--preset", "factual", "--max-new-tokens", 4, "hi")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--image", "/nonexistent/cat.png"], "cat.png"),
        (["--speaker", "Bob"], "Bob"),
        (["--preset", "wild"], "wild"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_run_bad_input_is_a_clear_error(tiny_instruct, flags, expect):
    result = _run("run", "--model", tiny_instruct, "--max-new-tokens", 4, *flags, "hi")
    assert result.exit_code == 2
    assert "error" in result.output and expect in result.output


def test_chat_keeps_history_and_survives_bad_input(tiny_instruct, media):
    session = "\n".join([
        "hello there",
        "/image /nonexistent/photo.jpg",
        "what is in the photo?",       # fails: the attachment is missing; the chat goes on
        f"/audio {media['audio']}",
        "and what do you hear?",
        "/quit",
    ]) + "\n"
    result = _run("chat", "--model", tiny_instruct, "--max-new-tokens", 4, input=session)
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant>") == 2
    assert "photo.jpg" in result.output and "error" in result.output


def test_thinking_and_captioner_run(tiny_thinking, tiny_captioner, media):
    for path, extra in ((tiny_thinking, []), (tiny_captioner, ["--audio", media["audio"]])):
        result = _run("run", "--model", path, "--max-new-tokens", 6, *extra, "Describe.")
        assert result.exit_code == 0, result.output


def test_speaker_on_thinker_only_model_is_refused(tiny_thinking):
    result = _run("run", "--model", tiny_thinking, "--max-new-tokens", 4, "--speaker", "Ethan", "hi")
    assert result.exit_code == 2 and "no talker" in result.output


def test_make_tiny(tmp_path):
    result = _run("make-tiny", tmp_path / "t", "--variant", "captioner", "--seed", 3)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "model.safetensors.index.json").is_file()


def test_stop_string_ends_the_answer(tiny_instruct):
    from thinktalk.api import Omni

    omni = Omni.load(tiny_instruct, device="cpu", progress=False)
    messages = [{"role": "user", "content": "hi"}]
    full = omni.generate(messages, temperature=0, max_new_tokens=12)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip(), full.text
    cut = omni.generate(messages, temperature=0, max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
