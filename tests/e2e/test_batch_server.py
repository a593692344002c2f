"""Against a real `thinktalk serve` (tiny checkpoint, loopback): bench serve, batch --url, transcribe --url."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from thinktalk.cli import app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_instruct, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "thinktalk.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(tiny_instruct), "--served-model-name", "tiny", "--max-speech-seconds", "0.2",
           "--max-num-seqs", "8"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_bench_serve_json_and_plot(server, tmp_path):
    from PIL import Image

    result = tmp_path / "bench.json"
    res = CliRunner().invoke(app, [
        "bench", "serve", "--url", server, "--concurrency", "1,3", "--num-prompts", "4",
        "--kinds", "text,image,audio", "--max-tokens", "4", "--image-size", "56", "--audio-seconds", "0.5",
        "--speech-ratio", "0.25", "--slo", "ttft=60000", "--no-progress", "-o", str(result)])
    assert res.exit_code == 0, res.output
    data = json.loads(result.read_text())
    assert data["server"]["model"] == "tiny" and data["server"]["gpu"] == "no GPU"
    assert [lv["level"] for lv in data["levels"]] == [1, 3]
    for lv in data["levels"]:
        assert lv["completed"] == 4 and lv["failed"] == 0, lv["errors"]
        assert lv["ttft_ms"]["p50"] > 0 and lv["output_throughput"] > 0
        assert lv["first_audio_ms"]["p50"] is not None and lv["rtf"]["p50"] > 0  # one spoken answer per level
        assert lv["goodput"] > 0
        assert "peak_running" in lv["server"]
    with Image.open(result.with_suffix(".png")) as im:
        assert im.size == (1100, 750)
    # and the comparison of a run with itself changes nothing
    res = CliRunner().invoke(app, ["bench", "serve", "--compare", str(result), str(result)])
    assert res.exit_code == 0 and "+0.0%" in res.output


def test_bench_request_rate(server, tmp_path):
    result = tmp_path / "rate.json"
    res = CliRunner().invoke(app, [
        "bench", "serve", "--url", server, "--request-rate", "inf", "--num-prompts", "3", "--max-tokens", "3",
        "--warmup", "0", "--no-progress", "-o", str(result), "--save-requests"])
    assert res.exit_code == 0, res.output
    level = json.loads(result.read_text())["levels"][0]
    assert level["level"] == "inf" and level["completed"] == 3 and len(level["requests"]) == 3


def test_batch_against_the_server_resumes(server, tmp_path, media):
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3}})
             for i in range(4)]
    lines.append(json.dumps({"custom_id": "img", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": str(media["image"])},
                                                   {"type": "text", "text": "?"}]}], "max_tokens": 3}}))
    lines.append(json.dumps({"custom_id": "say", "method": "POST", "url": "/v1/audio/speech",
                             "body": {"input": "Hello", "voice": "Ethan", "response_format": "wav"}}))
    lines.append(json.dumps({"custom_id": "talk", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "modalities": ["text", "audio"],
        "audio": {"voice": "Chelsie", "format": "mp3"}}}))
    lines.append(json.dumps({"custom_id": "asr", "method": "POST", "url": "/v1/audio/transcriptions",
                             "body": {"file": str(media["audio"]), "max_tokens": 3}}))
    lines.append(json.dumps({"custom_id": "wrong-model", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}}))
    lines.append("nope")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["batch", str(inp), "-o", str(out), "--url", server, "--concurrency", "4",
                                   "--no-progress"])
    assert res.exit_code == 1, res.output  # two error lines
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 10
    errors = {r["custom_id"]: r["error"]["code"] for r in rows if r["error"]}
    assert errors == {"wrong-model": "model_not_found", None: "invalid_json"}
    body = {r["custom_id"]: r["response"]["body"] for r in rows if not r["error"]}
    import av

    for ref in (body["say"]["file"], body["talk"]["choices"][0]["message"]["audio"]["file"]):
        with av.open(str(out.parent / ref)) as c:
            assert c.streams.audio[0].rate == 24000
    assert "data" not in body["talk"]["choices"][0]["message"]["audio"]
    assert "text" in body["asr"]
    # resume: nothing left to send
    res = CliRunner().invoke(app, ["batch", str(inp), "-o", str(out), "--url", server, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output and len(out.read_text().splitlines()) == 10


def test_transcribe_against_the_server(server, tmp_path, media):
    res = CliRunner().invoke(app, ["transcribe", str(media["audio"]), "--url", server, "-f", "vtt",
                                   "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    vtt = (tmp_path / "tone.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n")
