"""`thinktalk batch` in-process on a tiny checkpoint: mixed items, bad lines, resume, audio files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from thinktalk.batch import EngineBackend, OutputFile, run_batch

MAX_SPEECH_S = 0.2  # a few codec frames: the tiny talker never says codec_eos by itself


@pytest.fixture(scope="module")
def omni(tiny_instruct):
    from thinktalk.api import Omni

    return Omni.load(tiny_instruct, device="cpu", progress=False)


def _line(cid, url, body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _chat(text, **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 3, "temperature": 0, **kw}


def write_input(folder: Path, media) -> tuple[Path, dict[str, str]]:
    """30 lines: 27 good ones of every endpoint and input kind, and 3 malformed ones."""
    audio_b64 = base64.b64encode(Path(media["audio"]).read_bytes()).decode()
    lines, kinds = [], {}

    def add(cid, url, body, kind):
        lines.append(_line(cid, url, body))
        kinds[cid] = kind

    for i in range(17):
        add(f"text-{i}", "/v1/chat/completions", _chat(f"Question number {i}: what is {i} + {i}?"), "chat")
    add("sys", "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello"}], "max_tokens": 3,
                                       "temperature": 0, "stop": ["zzz"]}, "chat")
    add("image-path", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(media["image"])}}, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 3, "temperature": 0}, "chat")
    add("image-rel", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "b.jpg"}, {"type": "text", "text": "And this?"}]}],
        "max_tokens": 3, "temperature": 0}, "chat")
    add("audio-in", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}},
        {"type": "text", "text": "What do you hear?"}]}], "max_tokens": 3, "temperature": 0}, "chat")
    add("n2", "/v1/chat/completions", _chat("Two answers", n=2, seed=3, temperature=0.7), "chat")
    add("speak-wav", "/v1/chat/completions", _chat("Say hi", modalities=["text", "audio"],
                                                   audio={"voice": "Ethan", "format": "wav"}), "chat-audio")
    add("speak-mp3", "/v1/chat/completions", _chat("Say bye", modalities=["text", "audio"],
                                                   audio={"voice": "Chelsie", "format": "mp3"}), "chat-audio")
    add("tts-flac", "/v1/audio/speech", {"input": "Hello there.", "voice": "Aiden", "response_format": "flac"}, "speech")
    add("asr", "/v1/audio/transcriptions", {"file": "tone.wav", "max_tokens": 3}, "asr")
    add("asr-srt", "/v1/audio/transcriptions", {"file": str(media["audio"]), "max_tokens": 3,
                                                "response_format": "srt"}, "asr")
    lines.insert(5, "{this is not json")
    lines.insert(12, json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": _chat("no id")}))
    lines.insert(20, _line("bad-url", "/v1/embeddings", {"input": "x"}))
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, kinds


def read_output(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_mixed_batch_then_resume(omni, media, tmp_path, monkeypatch):
    import shutil

    from thinktalk import tts

    shutil.copy(media["image2"], tmp_path / "b.jpg")
    shutil.copy(media["audio"], tmp_path / "tone.wav")
    inp, kinds = write_input(tmp_path, media)
    assert len(inp.read_text().splitlines()) == 30
    out = tmp_path / "results.jsonl"

    added, prefills = [], []
    real_add, real_prefill = omni.engine.add_request, tts.forced_prefill
    monkeypatch.setattr(omni.engine, "add_request", lambda req: (added.append(req.request_id), real_add(req))[1])
    monkeypatch.setattr(tts, "forced_prefill", lambda o, r: (prefills.append(r), real_prefill(o, r))[1])

    backend = EngineBackend(omni, max_speech_seconds=MAX_SPEECH_S)
    stats = run_batch(inp, out, backend, progress=False)
    rows = read_output(out)
    assert len(rows) == 30
    good = [r for r in rows if r["error"] is None]
    bad = [r for r in rows if r["error"] is not None]
    assert len(good) == 27, [r["error"] for r in bad]
    assert len(bad) == 3
    assert stats.done == 27 and stats.errors == 3 and stats.tokens > 0
    # every good item answered once, in the batch output shape
    assert sorted(r["custom_id"] for r in good) == sorted(kinds)
    for r in good:
        assert r["id"].startswith("batch_req_") and r["response"]["status_code"] == 200
    # malformed lines: OpenAI's error shape, line numbers, the job went on
    codes = {r["error"]["code"]: r for r in bad}
    assert set(codes) == {"invalid_json", "missing_custom_id", "invalid_url"}
    assert codes["invalid_json"]["custom_id"] is None and codes["invalid_json"]["response"] is None
    assert codes["invalid_json"]["error"]["line"] == 6
    assert codes["invalid_url"]["custom_id"] == "bad-url"
    assert all(set(r) == {"id", "custom_id", "response", "error"} for r in bad)
    assert all({"code", "message"} <= set(r["error"]) for r in bad)

    by_id = {r["custom_id"]: r["response"]["body"] for r in good}
    chat = by_id["text-0"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["finish_reason"] in ("length", "stop")
    assert chat["usage"]["completion_tokens"] <= 3
    assert len(by_id["n2"]["choices"]) == 2
    assert by_id["image-rel"]["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert by_id["audio-in"]["usage"]["prompt_tokens_details"]["audio_tokens"] > 0
    assert "text" in by_id["asr"] and by_id["asr-srt"]["content"].startswith("1\n00:00:00,000 --> ")

    # every engine request is one item's choice; all were in flight together (continuous batching)
    n_engine = sum(len(by_id[c]["choices"]) if kinds[c].startswith("chat") else 1
                   for c in kinds if kinds[c] in ("chat", "chat-audio", "asr"))
    assert len(added) == n_engine
    assert len(prefills) == 1  # the speech item: one forced thinker pass, no sampling

    # audio files beside the output, referenced from their lines, decodable at 24 kHz
    import av

    files = [by_id["speak-wav"]["choices"][0]["message"]["audio"]["file"],
             by_id["speak-mp3"]["choices"][0]["message"]["audio"]["file"], by_id["tts-flac"]["file"]]
    assert "data" not in by_id["speak-wav"]["choices"][0]["message"]["audio"]
    for ref in files:
        path = out.parent / ref
        assert path.parent.name == "results.audio" and path.is_file()
        with av.open(str(path)) as c:
            stream = c.streams.audio[0]
            samples = sum(f.samples for f in c.decode(stream))
            assert stream.rate == 24000
        assert samples > 0.05 * 24000
    assert stats.audio_seconds > 0

    # re-run: everything is already there, nothing is repeated
    added.clear()
    prefills.clear()
    again = run_batch(inp, out, EngineBackend(omni, max_speech_seconds=MAX_SPEECH_S), progress=False)
    assert added == [] and prefills == []
    assert again.total == 0 and again.done == 0 and again.errors == 0 and again.skipped == 30
    assert len(read_output(out)) == 30


class FakeBackend:
    """Answers every item at once (for the file handling: resume, cut lines, duplicates)."""

    def __init__(self):
        self.seen = []

    def run(self, items, sink, stats):
        from thinktalk.batch import LineError

        for entry in items:
            if isinstance(entry, LineError):
                sink.error(entry.custom_id, entry.error, entry.line if entry.custom_id is None else None)
                continue
            self.seen.append(entry.custom_id)
            if entry.body.get("fail"):
                from thinktalk.batch import ItemError

                sink.error(entry.custom_id, ItemError("boom", "failed on purpose"))
            else:
                sink.result(entry, {"echo": entry.body})


def test_resume_after_a_crash_cuts_the_half_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(_line(f"c{i}", "/v1/chat/completions", {"i": i}) + "\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    first = FakeBackend()
    run_batch(inp, out, first, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:20])  # killed while writing the 5th line
    second = FakeBackend()
    stats = run_batch(inp, out, second, progress=False)
    assert second.seen == [f"c{i}" for i in range(4, 10)]
    assert stats.skipped == 4 and stats.done == 6
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"c{i}" for i in range(10))


def test_duplicates_blank_lines_failures_and_aliases(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([
        _line("a", "/v1/chat/completions", {}),
        "",
        _line("a", "/v1/chat/completions", {}),  # duplicate id
        _line("f", "/chat/completions", {"fail": True}),  # url without /v1 is accepted; the item fails
        json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/audio/speech", "body": "text"}),
        "[1, 2]",
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    backend = FakeBackend()
    stats = run_batch(inp, out, backend, progress=False)
    rows = read_output(out)
    assert backend.seen == ["a", "f"]
    errors = {(r["custom_id"], r["error"]["code"]) for r in rows if r["error"]}
    assert errors == {(None, "duplicate_custom_id"), ("f", "boom"), ("m", "invalid_method"),
                      ("b", "invalid_request"), (None, "invalid_request")}
    assert stats.done == 1 and stats.errors == 5
    # nothing is redone or written twice on a re-run, error lines included
    again = FakeBackend()
    run_batch(inp, out, again, progress=False)
    assert again.seen == [] and len(read_output(out)) == len(rows)


def test_output_file_audio_names_are_safe_and_distinct(tmp_path):
    from thinktalk.batch import BatchItem

    out = OutputFile(tmp_path / "x.jsonl")
    a = out.save_audio(BatchItem(1, "../../etc/passwd", "/v1/audio/speech", {}), b"1", "mp3")
    b = out.save_audio(BatchItem(2, "..-..-etc-passwd", "/v1/audio/speech", {}), b"2", "opus")
    c = out.save_audio(BatchItem(3, "plain-id", "/v1/audio/speech", {}), b"3", "wav", index=1)
    out.close()
    assert a.startswith("x.audio/") and "/" not in a[len("x.audio/"):]
    assert b.endswith(".ogg") and c == "x.audio/plain-id-1.wav"
    assert len({a, b, c}) == 3
    assert all((tmp_path / p).is_file() for p in (a, b, c))


def test_local_media_paths_are_inlined_for_a_server(tmp_path):
    from thinktalk.batch import rewrite_local_media

    (tmp_path / "p.png").write_bytes(b"\x89PNG fake")
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "p.png"}},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        {"type": "text", "text": "hi"}]}]}
    inlined = rewrite_local_media(body, tmp_path, inline=True)
    parts = inlined["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1]) == b"\x89PNG fake"
    assert parts[1]["image_url"] == "data:image/png;base64,AAAA"
    local = rewrite_local_media(body, tmp_path, inline=False)
    assert local["messages"][0]["content"][0]["image_url"]["url"] == str(tmp_path / "p.png")
    assert body["messages"][0]["content"][0]["image_url"]["url"] == "p.png"  # the input is left alone


def test_retry_failed_redoes_only_failed_items(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([_line("ok", "/v1/chat/completions", {}),
                              _line("flaky", "/v1/chat/completions", {"fail": True}), "garbage"]) + "\n")
    out = tmp_path / "out.jsonl"
    run_batch(inp, out, FakeBackend(), progress=False)
    inp.write_text(inp.read_text().replace('{"fail": true}', "{}"))  # what made it fail is fixed
    plain = FakeBackend()
    run_batch(inp, out, plain, progress=False)
    assert plain.seen == []  # a plain resume keeps the error
    again = FakeBackend()
    stats = run_batch(inp, out, again, progress=False, retry_failed=True)
    assert again.seen == ["flaky"] and stats.done == 1 and stats.errors == 0
    rows = read_output(out)
    assert len(rows) == 3 and sorted(str(r["custom_id"]) for r in rows) == ["None", "flaky", "ok"]
    assert [r["error"]["code"] for r in rows if r["error"]] == ["invalid_json"]  # the bad line is not redone


def test_a_lost_server_stops_the_job_and_leaves_items_undone(tmp_path):
    import socket

    from thinktalk.batch import BatchAborted, HTTPBackend

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(_line(f"c{i}", "/v1/chat/completions", _chat("hi")) + "\n" for i in range(5)) + "oops\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(BatchAborted, match="run again to resume"):
        run_batch(inp, out, HTTPBackend(f"http://127.0.0.1:{port}", concurrency=2, max_retries=1), progress=False)
    rows = read_output(out) if out.exists() else []
    assert all(r["custom_id"] is None for r in rows)  # at most the bad line; no item marked failed


def test_a_batch_item_that_forces_a_tool_call_fails_alone(omni, tmp_path):
    """tool_choice "required" (or a named function) cannot be kept without guided decoding: that
    item is an invalid_request_error; "auto" beside it is answered."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([
        _line("auto", "/v1/chat/completions", _chat("weather?", tools=tools, tool_choice="auto")),
        _line("required", "/v1/chat/completions", _chat("weather?", tools=tools, tool_choice="required")),
        _line("named", "/v1/chat/completions", _chat("weather?", tools=tools, tool_choice={
            "type": "function", "function": {"name": "get_weather"}})),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    stats = run_batch(inp, out, EngineBackend(omni), progress=False)
    rows = {r["custom_id"]: r for r in read_output(out)}
    assert stats.done == 1 and stats.errors == 2
    assert rows["auto"]["error"] is None
    for cid in ("required", "named"):
        err = rows[cid]["error"]
        assert err["code"] == "invalid_request_error" and "needs guided decoding" in err["message"], err


def test_a_batch_item_that_runs_out_of_memory_fails_alone(omni, media, tmp_path, monkeypatch):
    """The engine refuses an item's request mid-run (out of accelerator memory in its media's
    encoder): that item is an invalid_request_error saying so, the others are answered, the run
    ends and every KV block is back."""
    import torch

    visual = omni.engine.thinker.visual
    real = type(visual).forward

    def forward(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([
        _line("text", "/v1/chat/completions", _chat("Hello")),
        _line("image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(media["image"])}}, {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 3, "temperature": 0, "n": 2}),
        _line("text2", "/v1/chat/completions", _chat("Bye")),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(type(visual), "forward", forward)
    stats = run_batch(inp, out, EngineBackend(omni), progress=False)
    monkeypatch.setattr(type(visual), "forward", real)
    rows = {r["custom_id"]: r for r in read_output(out)}
    assert stats.done == 2 and stats.errors == 1
    assert rows["text"]["error"] is None and rows["text2"]["error"] is None
    err = rows["image"]["error"]
    assert err["code"] == "invalid_request_error" and "more accelerator memory" in err["message"], err
    engine = omni.engine
    assert not engine.has_work()
    if engine.block_manager is not None:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
