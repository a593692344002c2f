"""The demo model, API keys, no talker, a full queue (429), draining on SIGTERM, and a dying engine."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

KEYS = ("key-one", "key-two")

FAULTY = """
import sys
import thinktalk.engine as engine
step, calls = engine.Engine.step, [0]
def faulty_step(self):
    calls[0] += 1
    if calls[0] > 3:
        raise RuntimeError("injected engine fault")
    return step(self)
engine.Engine.step = faulty_step
from thinktalk.cli import main
sys.argv = ["thinktalk", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def faulty_server(serve_factory, tiny_instruct):
    """A server whose engine dies on its 4th step; started early so that it loads beside the demo server."""
    return serve_factory("--model", str(tiny_instruct), "--no-talker", "--api-key", "k", wait=False,
                         python_prefix=[sys.executable, "-c", FAULTY])


@pytest.fixture(scope="module")
def demo_server(serve_factory, tiny_instruct, faulty_server):
    # the demo model is the tiny checkpoint made in the user's cache folder; link ours there
    demo = Path(os.environ["THINKTALK_CACHE"]) / "demo-instruct-tiny-random"
    if not demo.exists():
        demo.symlink_to(tiny_instruct, target_is_directory=True)
    return serve_factory("--no-talker", "--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "512",
                         env={"THINKTALK_API_KEY": " ".join(KEYS), "THINKTALK_CORS_ORIGINS": "https://app.example.com"})


def test_demo_model_is_announced(demo_server):
    models = demo_server.client(KEYS[0]).models.list().data
    assert [m.id for m in models] == ["thinktalk-demo-tiny-random"]
    card = models[0].model_dump()
    assert card["random_weights"] and "meaningless" in card["notice"]
    assert card["voices"] == [] and card["output_modalities"] == ["text"]
    assert "DEMO MODEL" in httpx.get(demo_server.url + "/").text
    assert "DEMO model" in demo_server.log()


def test_api_keys(demo_server):
    assert demo_server.health().status_code == 200  # health and metrics need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LW9uZQ=="}):
        r = httpx.get(demo_server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        demo_server.client("wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    for key in KEYS:
        r = demo_server.client(key).chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                                            model="thinktalk-demo-tiny-random")
        assert r.choices[0].message.content is not None


def test_cors_origins(demo_server):
    """Only the configured origin may call from a browser; the preflight needs no API key."""
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(demo_server.url + "/v1/chat/completions", headers={"Origin": "https://app.example.com", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
    bad = httpx.options(demo_server.url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers
    r = httpx.get(demo_server.url + "/v1/models", headers={"Origin": "https://app.example.com",
                                                          "Authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"


def test_max_model_len(demo_server):
    client = demo_server.client(KEYS[0])
    assert client.models.list().data[0].model_dump()["max_model_len"] == 512
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="thinktalk-demo-tiny-random", max_tokens=2,
                                       messages=[{"role": "user", "content": "word " * 600}])
    assert info.value.code == "context_length_exceeded"


def test_no_talker_refuses_speech(demo_server):
    client = demo_server.client(KEYS[1])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="thinktalk-demo-tiny-random", messages=[{"role": "user", "content": "hi"}],
                                       modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"})
    assert info.value.body["param"] == "modalities"
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="thinktalk-demo-tiny-random", voice="Ethan", input="hi")


def test_full_queue_is_429_then_recovers(demo_server):
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 480, "stream": True}  # (context: 512)
    started = threading.Barrier(3)
    results = []

    def hold():
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", demo_server.url + "/v1/chat/completions", json=body, headers=headers) as r:
                results.append(r.status_code)
                lines = r.iter_lines()
                next(lines)
                started.wait()
                started.wait()  # the third request was answered: hang up (aborts in the engine)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait()
    r = httpx.post(demo_server.url + "/v1/chat/completions", headers=headers, timeout=60,
                   json={"messages": [{"role": "user", "content": "one more"}], "max_tokens": 2})
    started.wait()
    for t in threads:
        t.join(60)
    assert results == [200, 200]
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + 30
    while (h := demo_server.health().json())["in_flight"] or h["running"] or h["kv_used_tokens"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    ok = httpx.post(demo_server.url + "/v1/chat/completions", headers=headers, timeout=60,
                    json={"messages": [{"role": "user", "content": "again"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_sigterm_drains_then_exits_0(demo_server):
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    out = {}

    def long_request():
        out["r"] = httpx.post(demo_server.url + "/v1/chat/completions", headers=headers, timeout=120,
                              json={"messages": [{"role": "user", "content": "slow"}], "max_tokens": 80})

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 60
    while demo_server.health().json()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    demo_server.proc.send_signal(signal.SIGTERM)
    refused = None
    while refused is None and time.monotonic() < deadline:
        try:
            h = demo_server.health()
        except httpx.HTTPError:
            break
        if h.json()["status"] == "draining":
            assert h.status_code == 503
            refused = httpx.post(demo_server.url + "/v1/chat/completions", headers=headers, timeout=30,
                                 json={"messages": [{"role": "user", "content": "late"}], "max_tokens": 2})
        time.sleep(0.02)
    t.join(120)
    assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["finish_reason"] in ("length", "stop")
    if refused is not None:  # (the drain may be over before we look)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert demo_server.proc.wait(60) == 0




def test_engine_death_reports_broken_and_exits_nonzero(faulty_server):
    srv = faulty_server
    srv.wait_ready()
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
    assert r.status_code == 503 and r.json()["error"]["code"] == "broken", r.text
    try:
        h = srv.health()
        assert h.status_code == 503 and h.json()["status"] == "broken" and "injected" in h.json()["reason"]
    except httpx.HTTPError:
        pass  # already gone
    assert srv.proc.wait(60) == 1
    assert "engine thread died" in srv.log()
