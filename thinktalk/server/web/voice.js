// The voice page: a realtime conversation over /v1/realtime (GA dialect), plain JS, no build step.
//
// microphone -> AudioWorklet "pcm-capture" (pcm16 24 kHz, 40 ms) -> input_audio_buffer.append
// camera (optional) -> 1 JPEG frame per second -> input_image_buffer.append
// response.output_audio.delta -> AudioWorklet "pcm-player" (one gap-free queue)
// hands-free: the server's VAD ends turns and interrupts answers (speech_started clears playback
// and truncates the answer to what was heard); push-to-talk: hold the button / space bar.
"use strict";

const $ = (id) => document.getElementById(id);
const RATE = 24000;

const state = {
  connected: false,
  ws: null,
  ctx: null,
  micStream: null,
  capture: null,
  player: null,
  camStream: null,
  camTimer: null,
  holding: false,
  mode: "vad",
  activeResponse: null,
  playingItem: null,
  played: {}, // assistant item id -> samples played
  audioSamples: {}, // assistant item id -> samples received
  endOfSpeechAt: null,
  firstAudio: {}, // response id -> true once its first audio arrived
  respItem: {}, // response id -> item id
  bubbles: {}, // item id -> element
  turns: [], // {id, role, text} for tests and screen readers
  playedMs: 0,
  latencies: [],
  errors: [],
};
window.voiceState = state;

// -- settings --------------------------------------------------------------------------------------
for (const id of ["api-key", "instructions", "max-tokens"]) {
  const saved = localStorage.getItem("thinktalk-voice-" + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("thinktalk-voice-" + id, $(id).value));
}
if (!$("api-key").value) $("api-key").value = localStorage.getItem("thinktalk-api-key") || "";

async function loadVoices() {
  const key = $("api-key").value.trim();
  try {
    const r = await fetch("/v1/models", { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (!r.ok) return;
    const m = (await r.json()).data[0];
    const voice = $("voice");
    voice.innerHTML = "";
    for (const v of m.voices || []) voice.add(new Option(v, v));
    if ((m.voices || []).includes("Ethan")) voice.value = "Ethan";
    if (!(m.voices || []).length) voice.add(new Option("(text only)", ""));
  } catch (e) { /* the page still works with the server's default voice */ }
}
loadVoices();

function setStatus(text, cls = "") {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + cls;
}

// -- transcript ------------------------------------------------------------------------------------
function bubble(id, role) {
  if (state.bubbles[id]) return state.bubbles[id];
  $("hint")?.remove();
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.dataset.item = id;
  el.innerHTML = '<div class="tags"></div><div class="text"></div><div class="meta"></div>';
  $("log").appendChild(el);
  state.bubbles[id] = el;
  state.turns.push({ id, role, text: "" });
  el.scrollIntoView({ block: "end" });
  return el;
}

function setText(id, text, pending = false) {
  const el = state.bubbles[id];
  if (!el) return;
  const t = el.querySelector(".text");
  t.textContent = text;
  t.classList.toggle("pending", pending);
  const turn = state.turns.find((x) => x.id === id);
  if (turn && !pending) turn.text = text;
}

function appendText(id, delta) {
  const el = state.bubbles[id];
  if (!el) return;
  const t = el.querySelector(".text");
  t.classList.remove("pending");
  t.textContent += delta;
  const turn = state.turns.find((x) => x.id === id);
  if (turn) turn.text += delta;
  el.scrollIntoView({ block: "end" });
}

function meta(id, html) {
  const el = state.bubbles[id];
  if (el) el.querySelector(".meta").innerHTML = html;
}

function showError(message) {
  state.errors.push(message);
  const el = document.createElement("div");
  el.className = "msg error";
  el.textContent = message;
  $("log").appendChild(el);
}

// -- audio -------------------------------------------------------------------------------------------
function b64FromBytes(buf) {
  const bytes = new Uint8Array(buf);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function floatFromB64(b64) {
  const bin = atob(b64);
  const n = bin.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

function send(event) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(event));
}

// Stop playback now; tell the server how much of the answer was heard.
function stopPlayback() {
  if (state.player) state.player.port.postMessage({ type: "clear" });
}

function onPlayerMessage(m) {
  state.played = m.played;
  let total = 0;
  for (const k in m.played) total += m.played[k];
  state.playedMs = Math.round((total / RATE) * 1000);
  $("log").dataset.playedMs = String(state.playedMs);
  if (m.type === "cleared" && m.item) {
    const heard = m.played[m.item] || 0;
    const got = state.audioSamples[m.item] || 0;
    if (heard < got) {
      send({ type: "conversation.item.truncate", item_id: m.item, content_index: 0,
             audio_end_ms: Math.floor((heard / RATE) * 1000) });
      state.bubbles[m.item]?.classList.add("interrupted");
    }
  }
}

// -- camera -----------------------------------------------------------------------------------------
async function startCamera() {
  try {
    state.camStream = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } });
  } catch (e) {
    showError("camera: " + e.message);
    $("camera").checked = false;
    return;
  }
  const video = $("preview");
  video.srcObject = state.camStream;
  video.hidden = false;
  await video.play().catch(() => {});
  const canvas = document.createElement("canvas");
  state.camTimer = setInterval(() => {
    if (!state.connected || !video.videoWidth) return;
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const data = canvas.toDataURL("image/jpeg", 0.7).split(",")[1];
    send({ type: "input_image_buffer.append", image: data });
  }, 1000);
}

function stopCamera() {
  clearInterval(state.camTimer);
  state.camTimer = null;
  if (state.camStream) state.camStream.getTracks().forEach((t) => t.stop());
  state.camStream = null;
  $("preview").hidden = true;
}

$("camera").addEventListener("change", () => {
  if ($("camera").checked) { if (state.connected) startCamera(); } else stopCamera();
});

// -- session ---------------------------------------------------------------------------------------
function sessionConfig() {
  const td = state.mode === "vad"
    ? { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 600 }
    : null;
  const output = {};
  if ($("voice").value) output.voice = $("voice").value;
  const max = parseInt($("max-tokens").value, 10);
  return {
    type: "realtime",
    instructions: $("instructions").value,
    output_modalities: $("voice").value ? ["audio"] : ["text"],
    max_output_tokens: max > 0 ? max : "inf",
    audio: {
      input: { format: { type: "audio/pcm", rate: RATE }, turn_detection: td,
               transcription: $("transcribe").checked ? { model: "default" } : null },
      output,
    },
  };
}

async function start() {
  $("start").disabled = true;
  setStatus("starting…", "busy");
  try {
    state.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    await state.ctx.audioWorklet.addModule("/voice/voice-worklet.js");
    state.micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (e) {
    showError("microphone: " + e.message);
    setStatus("no microphone");
    $("start").disabled = false;
    return;
  }
  const ctx = state.ctx;
  const source = ctx.createMediaStreamSource(state.micStream);
  state.capture = new AudioWorkletNode(ctx, "pcm-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(state.capture).connect(mute).connect(ctx.destination); // pulled, but silent
  state.player = new AudioWorkletNode(ctx, "pcm-player", { numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1] });
  state.player.connect(ctx.destination);
  state.player.port.onmessage = (e) => onPlayerMessage(e.data);
  state.capture.port.onmessage = (e) => {
    $("level").style.width = Math.min(100, e.data.level * 400) + "%";
    if (state.mode === "vad" || state.holding) {
      send({ type: "input_audio_buffer.append", audio: b64FromBytes(e.data.pcm) });
    }
  };
  await ctx.resume();

  const key = $("api-key").value.trim();
  const protocols = ["realtime"];
  if (key) protocols.push("openai-insecure-api-key." + key);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/v1/realtime?api=ga`, protocols);
  state.ws = ws;
  ws.onopen = () => {
    state.connected = true;
    send({ type: "session.update", session: sessionConfig() });
    setStatus(state.mode === "vad" ? "listening" : "hold to talk", "live");
    $("hangup").disabled = false;
    $("talk").disabled = state.mode !== "ptt";
    if ($("camera").checked) startCamera();
  };
  ws.onmessage = (e) => onEvent(JSON.parse(e.data));
  ws.onclose = (e) => {
    if (state.connected || e.code !== 1000) setStatus("disconnected" + (e.reason ? ": " + e.reason : ""));
    if (!state.connected && e.code !== 1000) showError("could not connect to /v1/realtime (is an API key needed?)");
    teardown();
  };
}

function teardown() {
  state.connected = false;
  stopCamera();
  if (state.micStream) state.micStream.getTracks().forEach((t) => t.stop());
  if (state.ctx) state.ctx.close();
  state.ctx = state.capture = state.player = state.micStream = null;
  $("start").disabled = false;
  $("hangup").disabled = true;
  $("talk").disabled = true;
}

$("start").addEventListener("click", start);
$("hangup").addEventListener("click", () => { if (state.ws) state.ws.close(1000); setStatus("not connected"); });

for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => {
    state.mode = document.querySelector('input[name="mode"]:checked').value;
    $("talk").disabled = !state.connected || state.mode !== "ptt";
    if (state.connected) {
      send({ type: "input_audio_buffer.clear" });
      send({ type: "session.update", session: sessionConfig() });
      setStatus(state.mode === "vad" ? "listening" : "hold to talk", "live");
    }
  });
}
$("voice").addEventListener("change", () => { if (state.connected) send({ type: "session.update", session: sessionConfig() }); });

// -- push-to-talk ------------------------------------------------------------------------------------
function pressTalk() {
  if (!state.connected || state.mode !== "ptt" || state.holding) return;
  state.holding = true;
  $("talk").classList.add("held");
  if (state.activeResponse) send({ type: "response.cancel" });
  stopPlayback();
  send({ type: "input_audio_buffer.clear" });
  setStatus("recording…", "busy");
}

function releaseTalk() {
  if (!state.holding) return;
  state.holding = false;
  $("talk").classList.remove("held");
  state.endOfSpeechAt = performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
  setStatus("thinking…", "busy");
}

$("talk").addEventListener("pointerdown", pressTalk);
$("talk").addEventListener("pointerup", releaseTalk);
$("talk").addEventListener("pointerleave", releaseTalk);
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && state.mode === "ptt" && e.target.tagName !== "INPUT") { e.preventDefault(); pressTalk(); }
});
document.addEventListener("keyup", (e) => {
  if (e.code === "Space" && state.mode === "ptt") { e.preventDefault(); releaseTalk(); }
});

// -- server events -------------------------------------------------------------------------------------
function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
    case "session.updated":
      break;
    case "input_audio_buffer.speech_started":
      stopPlayback(); // barge-in: the server cancels the answer, we stop hearing it
      setStatus("hearing you…", "busy");
      break;
    case "input_audio_buffer.speech_stopped":
      state.endOfSpeechAt = performance.now();
      setStatus("thinking…", "busy");
      break;
    case "conversation.item.created":
    case "conversation.item.added": {
      const item = ev.item;
      if (state.bubbles[item.id]) break;
      bubble(item.id, item.role);
      if (item.role === "user") {
        const kinds = item.content.map((c) => c.type);
        const text = item.content.filter((c) => c.type === "input_text").map((c) => c.text).join(" ");
        const el = state.bubbles[item.id];
        const tags = [];
        if (kinds.includes("input_audio")) { tags.push("spoken"); el.dataset.spoken = "1"; }
        if (kinds.includes("input_image")) { tags.push("camera frame"); el.dataset.camera = "1"; }
        el.querySelector(".tags").innerHTML = tags.map((t) => `<span class="tag">${t}</span>`).join("");
        if (kinds.includes("input_audio") && !text) {
          setText(item.id, $("transcribe").checked ? "transcribing…" : "(spoken)", true);
        } else {
          setText(item.id, text);
        }
      }
      break;
    }
    case "conversation.item.input_audio_transcription.completed":
      setText(ev.item_id, ev.transcript || "(nothing heard)");
      if (state.bubbles[ev.item_id]) state.bubbles[ev.item_id].dataset.transcribed = "1";
      break;
    case "conversation.item.input_audio_transcription.failed":
      setText(ev.item_id, "(transcription failed)");
      break;
    case "response.created":
      state.activeResponse = ev.response.id;
      break;
    case "response.output_item.added":
      state.respItem[ev.response_id] = ev.item.id;
      bubble(ev.item.id, "assistant");
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      appendText(ev.item_id, ev.delta);
      break;
    case "response.output_audio.delta": {
      const samples = floatFromB64(ev.delta);
      state.audioSamples[ev.item_id] = (state.audioSamples[ev.item_id] || 0) + samples.length;
      if (!state.firstAudio[ev.response_id]) {
        state.firstAudio[ev.response_id] = true;
        if (state.endOfSpeechAt !== null) {
          const ms = Math.round(performance.now() - state.endOfSpeechAt);
          state.latencies.push(ms);
          meta(ev.item_id, `latency <span class="latency">${(ms / 1000).toFixed(2)} s</span> from the end of your speech to the first sound`);
          state.bubbles[ev.item_id].dataset.latencyMs = String(ms);
          state.endOfSpeechAt = null;
        }
        setStatus("speaking", "live");
      }
      state.player?.port.postMessage({ type: "audio", item: ev.item_id, samples }, [samples.buffer]);
      break;
    }
    case "conversation.item.truncated":
      state.bubbles[ev.item_id]?.classList.add("interrupted");
      break;
    case "response.done": {
      if (state.activeResponse === ev.response.id) state.activeResponse = null;
      const r = ev.response;
      const item = state.respItem[r.id];
      if (r.status === "cancelled" && item) state.bubbles[item]?.classList.add("interrupted");
      if (r.status === "failed") showError("the answer failed: " + (r.status_details?.error?.message || "error"));
      if (item && !state.firstAudio[r.id] && state.endOfSpeechAt !== null && r.status !== "cancelled") {
        const ms = Math.round(performance.now() - state.endOfSpeechAt);
        meta(item, `latency <span class="latency">${(ms / 1000).toFixed(2)} s</span> to the full answer`);
      }
      setStatus(state.mode === "vad" ? "listening" : "hold to talk", "live");
      break;
    }
    case "error":
      showError(ev.error.message);
      break;
  }
}
