"""The /voice page in headless Chromium (Debian's `chromium`, driven by playwright), with a fake
microphone playing espeak-ng speech and Chromium's fake camera: the page connects to /v1/realtime,
the server's VAD ends the spoken turn, the answer's transcript shows and its audio plays through
the AudioWorklet player. A screenshot is saved.

Needs: apt-get install -y chromium espeak-ng (skipped with that reason where they are missing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("silero_vad")
pytest.importorskip("websockets")
sync_api = pytest.importorskip("playwright.sync_api")

MAX_SPEECH_S = "1.5"


def _chromium() -> str | None:
    for path in (os.environ.get("THINKTALK_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def voice_server(tiny_instruct, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("voice-serve") / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "thinktalk.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(tiny_instruct), "--max-speech-seconds", MAX_SPEECH_S, "--max-num-seqs", "4"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server not ready")
        time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def fake_mic_wav(tmp_path_factory) -> Path:
    """0.8 s of silence, a spoken question, then 40 s of silence (Chromium loops the file)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is missing (apt-get install -y espeak-ng): the page test needs real speech")
    root = tmp_path_factory.mktemp("mic")
    raw = root / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "160", "-w", str(raw), "Hello there, what can you see?"], check=True,
                   capture_output=True)
    with wave.open(str(raw)) as w:
        rate = w.getframerate()
        speech = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    pcm = np.concatenate([np.zeros(int(0.8 * rate), "<i2"), speech, np.zeros(40 * rate, "<i2")])
    out = root / "mic.wav"
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out


def test_voice_page_spoken_turn(voice_server, fake_mic_wav, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is missing (apt-get install -y chromium)")
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic_wav}", "--autoplay-policy=no-user-gesture-required",
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-extensions", "--no-first-run", "--mute-audio"]
    shot = tmp_path / "voice-page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{voice_server}/voice")
            # the demo model is said prominently
            assert page.locator("#demo-banner").is_visible()
            assert "DEMO MODEL" in page.locator("#demo-banner").inner_text()
            page.wait_for_function("document.querySelector('#voice').options.length > 0")
            page.check("#camera")
            page.click("summary")
            page.fill("#max-tokens", "8")  # short answers: the random model never stops by itself
            page.click("#start")
            page.wait_for_function("window.voiceState.connected", timeout=30_000)
            try:
                page.wait_for_function(
                    """() => {
                        const s = window.voiceState;
                        const user = document.querySelector('#log .msg.user[data-transcribed="1"]');
                        const bot = s.turns.find(t => t.role === 'assistant' && t.text.trim().length > 0);
                        return user && bot && s.playedMs > 300 && s.latencies.length > 0;
                    }""", timeout=150_000)
            finally:
                page.screenshot(path=str(shot), full_page=True)
            state = page.evaluate("""() => ({turns: window.voiceState.turns, playedMs: window.voiceState.playedMs,
                                             latencies: window.voiceState.latencies, errors: window.voiceState.errors})""")
            user_el = page.locator("#log .msg.user").first
            user = user_el.locator(".text").inner_text()
            user_tags = user_el.locator(".tags").inner_text()
            bot = page.locator("#log .msg.assistant").first.inner_text()
            voice = page.eval_on_selector("#voice", "e => e.value")
        finally:
            browser.close()
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert not state["errors"], (state["errors"], console)
    # both sides of the conversation are on the page
    assert "spoken" in user_tags and "camera frame" in user_tags  # a spoken turn, with a camera frame
    assert user.strip() and user.strip() != "transcribing…"  # what the user said (transcribed)
    assert bot.strip() and "latency" in bot  # the answer's transcript and its latency
    assert voice == "Ethan"
    assert 0 < state["latencies"][0] < 120_000
    assert state["playedMs"] > 300  # the answer's audio went through the player


def test_voice_page_push_to_talk(voice_server, fake_mic_wav, tmp_path):
    """Push-to-talk: no server VAD; holding the button records, releasing commits and asks for the answer."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is missing (apt-get install -y chromium)")
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic_wav}", "--autoplay-policy=no-user-gesture-required",
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-extensions", "--no-first-run", "--mute-audio"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(f"{voice_server}/voice")
            page.click("summary")
            page.fill("#max-tokens", "6")
            page.uncheck("#transcribe")
            page.check('input[name="mode"][value="ptt"]')
            page.click("#start")
            page.wait_for_function("window.voiceState.connected && !document.querySelector('#talk').disabled",
                                   timeout=30_000)
            talk = page.locator("#talk").bounding_box()
            page.mouse.move(talk["x"] + 5, talk["y"] + 5)
            page.mouse.down()
            page.wait_for_timeout(2500)
            page.mouse.up()
            page.wait_for_function(
                """() => {
                    const s = window.voiceState;
                    return document.querySelector('#log .msg.user[data-spoken="1"]')
                        && s.turns.some(t => t.role === 'assistant' && t.text.trim()) && s.playedMs > 300
                        && s.latencies.length > 0;
                }""", timeout=120_000)
            user = page.locator("#log .msg.user").first.locator(".text").inner_text()
            errors = page.evaluate("window.voiceState.errors")
            page.screenshot(path=str(tmp_path / "voice-ptt.png"), full_page=True)
        finally:
            browser.close()
    assert not errors
    assert user == "(spoken)"  # transcription off: the turn is shown as speech
