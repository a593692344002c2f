"""Server voice activity detection: silero-vad speech probabilities and the turn logic on top.

`SileroVAD` turns a 16 kHz stream into one speech probability per 32 ms frame (512 samples),
keeping the model's recurrent state across calls (one instance per session). `TurnDetector` is
pure logic over those probabilities, with OpenAI's `turn_detection` knobs:

- speech starts at the first frame with probability >= threshold (after `min_speech_ms` of
  speech, so a click does not open a turn); the turn's audio begins `prefix_padding_ms` earlier;
- speech stops once the probability has stayed below `threshold - 0.15` (silero's own hysteresis)
  for `silence_duration_ms`; the turn ends where the speech ended.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np

RATE = 16000
FRAME = 512  # samples per silero frame at 16 kHz (32 ms)
FRAME_MS = FRAME * 1000 // RATE

_load_lock = threading.Lock()


def _load_model():
    """silero-vad's TorchScript model. Importing silero_vad sets torch's thread count to 1 for the
    whole process; that is undone here so the engine keeps its threads."""
    import torch

    with _load_lock:
        threads = torch.get_num_threads()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from silero_vad import load_silero_vad

                model = load_silero_vad(onnx=False)
        finally:
            torch.set_num_threads(threads)
    return model


class SileroVAD:
    """Speech probabilities of a 16 kHz mono stream, one per 512-sample frame (not thread-safe)."""

    def __init__(self):
        self.model = _load_model()
        self._rest = np.zeros(0, dtype=np.float32)

    def reset(self) -> None:
        self.model.reset_states()
        self._rest = np.zeros(0, dtype=np.float32)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of the whole frames now available (the remainder waits for more audio)."""
        import torch

        x = np.concatenate([self._rest, np.asarray(audio, dtype=np.float32)])
        n = len(x) // FRAME
        self._rest = x[n * FRAME :]
        out = np.empty(n, dtype=np.float32)
        with torch.inference_mode():
            for i in range(n):
                out[i] = float(self.model(torch.from_numpy(x[i * FRAME : (i + 1) * FRAME]), RATE))
        return out


@dataclass
class VADEvent:
    kind: str  # "start" | "stop"
    sample: int  # start: where the turn's audio begins (padding included); stop: where speech ended
    detected_at: int  # the sample at which the detector knew


class TurnDetector:
    """Speech start/stop over per-frame probabilities; positions in samples since the stream began."""

    def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500,
                 min_speech_ms: int = 64):
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.prefix = prefix_padding_ms * RATE // 1000
        self.silence_frames = max(1, -(-silence_duration_ms // FRAME_MS))
        self.min_speech_frames = max(1, -(-min_speech_ms // FRAME_MS))
        self.frame = 0  # frames seen
        self.speaking = False
        self._run = 0  # consecutive speech frames while idle
        self._silent = 0  # consecutive silent frames while speaking
        self._last_speech = 0  # end sample of the last speech frame

    def push(self, probs: np.ndarray) -> list[VADEvent]:
        events = []
        for p in probs:
            end = (self.frame + 1) * FRAME
            self.frame += 1
            if not self.speaking:
                self._run = self._run + 1 if p >= self.threshold else 0
                if self._run >= self.min_speech_frames:
                    self.speaking = True
                    self._silent = 0
                    self._last_speech = end
                    onset = end - self._run * FRAME
                    events.append(VADEvent("start", max(0, onset - self.prefix), end))
                    self._run = 0
            else:
                if p >= self.neg_threshold:
                    self._silent = 0
                    self._last_speech = end
                else:
                    self._silent += 1
                    if self._silent >= self.silence_frames:
                        self.speaking = False
                        self._run = 0
                        events.append(VADEvent("stop", self._last_speech, end))
        return events

    def reset(self) -> None:
        """Forget a turn in progress (the buffer was committed or cleared by the client)."""
        self.speaking = False
        self._run = self._silent = 0
