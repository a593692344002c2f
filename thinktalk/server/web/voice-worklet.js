// Audio worklets of the voice page (no build step).
//
// pcm-capture: microphone -> pcm16 at 24 kHz in 40 ms chunks, posted to the page with the level.
// pcm-player:  pcm16 24 kHz chunks from the page -> one continuous output (no gaps between
//              chunks); "clear" drops what is queued and reports how much of each answer played.
//
// Both resample linearly when the AudioContext does not run at 24 kHz.

const WIRE_RATE = 24000;

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / WIRE_RATE; // input samples per output sample
    this.pos = 0; // fractional read position in the current block (-1: the previous block's last sample)
    this.prev = 0;
    this.chunk = new Int16Array(WIRE_RATE * 40 / 1000);
    this.n = 0;
    this.energy = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    // linear interpolation; position -1 is the last sample of the previous block
    const at = (i) => (i < 0 ? this.prev : input[i]);
    let pos = this.pos;
    while (pos + 1 < input.length) {
      const i = Math.floor(pos);
      const frac = pos - i;
      const v = at(i) + (at(i + 1) - at(i)) * frac;
      const s = Math.max(-1, Math.min(1, v));
      this.energy += s * s;
      this.chunk[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.n === this.chunk.length) {
        const level = Math.sqrt(this.energy / this.n);
        this.port.postMessage({ pcm: this.chunk.buffer, level }, [this.chunk.buffer]);
        this.chunk = new Int16Array(WIRE_RATE * 40 / 1000);
        this.n = 0;
        this.energy = 0;
      }
      pos += this.step;
    }
    this.pos = pos - input.length;
    this.prev = input[input.length - 1];
    return true;
  }
}

class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // {item, data: Float32Array at 24 kHz}
    this.offset = 0; // fractional read position in queue[0].data
    this.step = WIRE_RATE / sampleRate;
    this.played = {}; // item id -> samples (24 kHz) played
    this.primed = false;
    this.sinceReport = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "audio") {
        this.queue.push({ item: m.item, data: m.samples });
      } else if (m.type === "clear") {
        const item = this.queue.length ? this.queue[0].item : null;
        this.queue = [];
        this.offset = 0;
        this.primed = false;
        this.port.postMessage({ type: "cleared", item, played: this.played });
      }
    };
  }

  buffered() {
    let n = -this.offset;
    for (const c of this.queue) n += c.data.length;
    return n;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.primed && this.buffered() >= WIRE_RATE * 0.06) this.primed = true; // 60 ms jitter buffer
    let k = 0;
    while (this.primed && k < out.length && this.queue.length) {
      const head = this.queue[0];
      const i = Math.floor(this.offset);
      if (i >= head.data.length) {
        this.offset -= head.data.length;
        this.queue.shift();
        continue;
      }
      const frac = this.offset - i;
      const next = i + 1 < head.data.length ? head.data[i + 1] : (this.queue[1] ? this.queue[1].data[0] : head.data[i]);
      out[k++] = head.data[i] + (next - head.data[i]) * frac;
      const before = Math.floor(this.offset);
      this.offset += this.step;
      const advanced = Math.floor(this.offset) - before;
      if (advanced > 0) this.played[head.item] = (this.played[head.item] || 0) + advanced;
    }
    if (!this.queue.length) this.primed = false; // ran dry: buffer a little before starting again
    for (; k < out.length; k++) out[k] = 0;
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({ type: "progress", played: this.played, buffered: this.buffered() });
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
registerProcessor("pcm-player", PcmPlayer);
