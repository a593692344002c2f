// thinktalk web page: streams /v1/chat/completions with optional media in and speech out.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];        // OpenAI messages of this conversation
let attachments = [];      // {kind, name, part, preview}
let controller = null;     // AbortController of the running request
const SAMPLE_RATE = 24000;

$("api-key").value = localStorage.getItem("thinktalk-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("thinktalk-api-key", $("api-key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) { $("status").textContent = body.error ? body.error.message : r.statusText; setTimeout(loadModel, 3000); return; }
    const m = body.data[0];
    $("model").textContent = m.id;
    $("status").textContent = m.random_weights ? "demo model (random weights)" : "ready";
    const voice = $("voice");
    voice.innerHTML = "";
    for (const v of m.voices || []) voice.add(new Option(v, v));
    $("speak").disabled = !(m.voices || []).length;
    if (m.random_weights && !document.getElementById("demo-banner")) {
      const b = document.createElement("div");
      b.className = "demo"; b.id = "demo-banner";
      b.textContent = "DEMO MODEL — " + (m.notice || "random weights: output is meaningless");
      document.body.prepend(b);
    }
  } catch (e) { $("status").textContent = "server unreachable"; setTimeout(loadModel, 3000); }
}

function kindOf(file) {
  const t = file.type || "";
  if (t.startsWith("image/")) return "image";
  if (t.startsWith("audio/")) return "audio";
  if (t.startsWith("video/")) return "video";
  const ext = file.name.split(".").pop().toLowerCase();
  if (["png", "jpg", "jpeg", "gif", "webp", "bmp"].includes(ext)) return "image";
  if (["wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm"].includes(ext)) return "audio";
  if (["mp4", "mov", "mkv", "avi"].includes(ext)) return "video";
  return null;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

$("files").addEventListener("change", async (ev) => {
  for (const file of ev.target.files) {
    const kind = kindOf(file);
    if (!kind) { addError(`${file.name}: not an image, audio or video file`); continue; }
    const url = await readDataURL(file);
    let part;
    if (kind === "image") part = { type: "image_url", image_url: { url } };
    else if (kind === "video") part = { type: "video_url", video_url: { url } };
    else {
      let fmt = file.name.split(".").pop().toLowerCase();
      if (!["wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm"].includes(fmt)) fmt = "wav";
      part = { type: "input_audio", input_audio: { data: url.split(",", 2)[1], format: fmt } };
    }
    attachments.push({ kind, name: file.name, part, preview: kind === "image" ? url : null });
  }
  ev.target.value = "";
  drawAttachments();
});

function drawAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  attachments.forEach((a, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = `${a.kind}: ${a.name} `;
    const x = document.createElement("button");
    x.type = "button"; x.textContent = "×";
    x.onclick = () => { attachments.splice(i, 1); drawAttachments(); };
    chip.append(x);
    box.append(chip);
  });
}

function addBubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function addError(text) { addBubble("error").textContent = text; }

function wavBlob(chunks) {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const buf = new ArrayBuffer(44 + total);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + total, true); str(8, "WAVE"); str(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, SAMPLE_RATE, true); v.setUint32(28, SAMPLE_RATE * 2, true);
  v.setUint16(32, 2, true); v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, total, true);
  let o = 44;
  for (const c of chunks) { new Uint8Array(buf, o, c.length).set(c); o += c.length; }
  return new Blob([buf], { type: "audio/wav" });
}

function b64bytes(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

class Player {  // plays pcm16 chunks as they arrive
  constructor() { this.ctx = null; this.at = 0; }
  play(bytes) {
    if (!this.ctx) { this.ctx = new (window.AudioContext || window.webkitAudioContext)(); this.at = this.ctx.currentTime + 0.05; }
    const n = Math.floor(bytes.length / 2);
    if (!n) return;
    const samples = new Int16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + n * 2));
    const buf = this.ctx.createBuffer(1, n, SAMPLE_RATE);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < n; i++) ch[i] = samples[i] / 32768;
    const src = this.ctx.createBufferSource();
    src.buffer = buf; src.connect(this.ctx.destination);
    this.at = Math.max(this.at, this.ctx.currentTime);
    src.start(this.at);
    this.at += buf.duration;
  }
}

async function send(text) {
  const content = attachments.map((a) => a.part);
  if (text) content.push({ type: "text", text });
  if (!content.length) return;
  const user = addBubble("user");
  for (const a of attachments) {
    if (a.preview) { const img = document.createElement("img"); img.src = a.preview; user.append(img); }
    else { const m = document.createElement("div"); m.className = "media"; m.textContent = `[${a.kind}: ${a.name}]`; user.append(m); }
  }
  user.append(document.createTextNode(text));
  history.push({ role: "user", content });
  attachments = []; drawAttachments();

  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
    temperature: parseFloat($("temperature").value),
  };
  const speak = $("speak").checked && $("voice").value;
  if (speak) { body.modalities = ["text", "audio"]; body.audio = { voice: $("voice").value, format: "pcm16" }; }

  const bubble = addBubble("assistant");
  const reasoning = document.createElement("div"); reasoning.className = "reasoning";
  const answer = document.createElement("div");
  const meta = document.createElement("div"); meta.className = "meta";
  bubble.append(reasoning, answer, meta);
  const pcm = [];
  const player = speak ? new Player() : null;
  let text_out = "";
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  const t0 = performance.now();
  let firstAt = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let msg = r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) {}
      throw new Error(`${r.status}: ${msg}`);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error.message);
        if (ev.usage) meta.textContent = `${ev.usage.prompt_tokens} prompt + ${ev.usage.completion_tokens} completion tokens`;
        for (const c of ev.choices || []) {
          const d = c.delta || {};
          if ((d.content || d.reasoning_content) && firstAt === null) firstAt = performance.now();
          if (d.reasoning_content) reasoning.textContent += d.reasoning_content;
          if (d.content) { answer.textContent += d.content; text_out += d.content; }
          if (d.tool_calls) for (const t of d.tool_calls) answer.textContent += `\n[tool call ${t.function.name}(${t.function.arguments})]`;
          if (d.audio && d.audio.data) { const bytes = b64bytes(d.audio.data); pcm.push(bytes); player.play(bytes); }
          if (c.finish_reason) meta.dataset.finish = c.finish_reason;
        }
        bubble.scrollIntoView({ block: "end" });
      }
    }
    history.push({ role: "assistant", content: text_out });
  } catch (e) {
    if (e.name === "AbortError") meta.dataset.finish = "stopped";
    else addError(String(e.message || e));
    history.pop();  // keep the conversation consistent with what the model saw
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
    if (pcm.length) {
      const audio = document.createElement("audio");
      audio.controls = true; audio.src = URL.createObjectURL(wavBlob(pcm));
      bubble.append(audio);
    }
    const ttft = firstAt === null ? "" : `first token ${((firstAt - t0) / 1000).toFixed(2)} s · `;
    meta.textContent = `${ttft}${meta.dataset.finish || ""} ${meta.textContent}`.trim();
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => { history.length = 0; $("log").innerHTML = ""; });
loadModel();
