"""The OpenAI Realtime protocol as /v1/realtime speaks it: session settings, event names of the
two dialects, and the JSON shapes of sessions, items and responses.

Two dialects
------------
OpenAI's Realtime API exists in a beta shape (``OpenAI-Beta: realtime=v1``; the ``openai``
SDK's ``client.beta.realtime``) and the GA shape (``client.realtime``). The client events are the
same; server event names and the session object differ:

    beta                                   GA
    response.audio.delta / .done           response.output_audio.delta / .done
    response.audio_transcript.delta/.done  response.output_audio_transcript.delta / .done
    response.text.delta / .done            response.output_text.delta / .done
    session: flat (voice, modalities,      session: {"type": "realtime", "output_modalities",
      input_audio_format, turn_detection)    "audio": {"input": {...}, "output": {...}}}
    content types audio / text             content types output_audio / output_text

A session's dialect is chosen, first match wins:
  1. the query parameter ``?api=beta`` or ``?api=ga`` (fixes it for the session);
  2. the header ``OpenAI-Beta: realtime=v1`` or the subprotocol ``openai-beta.realtime-v1`` -> beta;
  3. otherwise GA, and each ``session.update`` switches the session to the dialect of its shape
     (GA: has ``type``/``audio``/``output_modalities``; beta: has ``modalities``, ``voice``,
     ``input_audio_format``, ``turn_detection`` ... at the top level).
Both spellings of content types are accepted from clients in either dialect.

Extensions (Qwen-Omni-Realtime style)
-------------------------------------
- ``input_image_buffer.append`` ``{"image": <base64 JPEG/PNG>}``: camera frames; the latest
  frame(s) are attached to the next user turn (committed audio or a created user item).
- Input audio may be pcm16 at 16 kHz or 24 kHz: GA ``audio.input.format.rate``; beta
  ``input_audio_sample_rate`` (beside ``input_audio_format: "pcm16"``). Output is pcm16 24 kHz.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

GA, BETA = "ga", "beta"
INPUT_RATES = (16000, 24000)
OUTPUT_RATE = 24000

# server event names that differ between the dialects (keyed by the GA name)
_BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
CLIENT_EVENTS = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "input_image_buffer.append", "conversation.item.create", "conversation.item.truncate",
    "conversation.item.delete", "conversation.item.retrieve", "response.create", "response.cancel",
    "output_audio_buffer.clear",
)
_BETA_SESSION_KEYS = {"modalities", "voice", "input_audio_format", "output_audio_format", "turn_detection",
                      "input_audio_transcription", "max_response_output_tokens", "input_audio_sample_rate"}
_GA_SESSION_KEYS = {"type", "audio", "output_modalities", "max_output_tokens"}


class ProtocolError(Exception):
    """A bad client event: answered with an `error` event; the session stays open."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", event_id: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.type, self.event_id = message, param, code, type, event_id


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def event_name(name: str, dialect: str) -> str:
    """The server event `name` (GA spelling) in `dialect`."""
    return _BETA_NAMES.get(name, name) if dialect == BETA else name


def dialect_of_session(session: dict) -> str | None:
    """GA or beta by the shape of a session.update's session; None when it says neither."""
    keys = set(session)
    if keys & _GA_SESSION_KEYS:
        return GA
    if keys & _BETA_SESSION_KEYS:
        return BETA
    return None


def error_event(message: str, *, type: str = "invalid_request_error", code: str | None = None,
                param: str | None = None, event_id: str | None = None) -> dict:
    return {"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


# -- session settings ------------------------------------------------------------------------------
@dataclass
class TurnDetection:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def dump(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response}


@dataclass
class SessionConfig:
    instructions: str = ""
    voice: str | None = None
    audio_out: bool = True  # "audio" among the output modalities (with its transcript)
    input_rate: int = 24000
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    transcribe_input: bool = False  # input_audio_transcription: transcribe user audio turns
    max_output_tokens: int | None = None  # None: "inf" (the server's own cap applies)
    temperature: float = 0.8

    def dump(self, dialect: str, *, session_id: str, model: str) -> dict:
        td = self.turn_detection.dump() if self.turn_detection is not None else None
        transcription = {"model": model} if self.transcribe_input else None
        max_tokens: Any = self.max_output_tokens if self.max_output_tokens is not None else "inf"
        if dialect == BETA:
            return {
                "id": session_id, "object": "realtime.session", "model": model,
                "modalities": ["text", "audio"] if self.audio_out else ["text"],
                "instructions": self.instructions, "voice": self.voice, "input_audio_format": "pcm16",
                "input_audio_sample_rate": self.input_rate, "output_audio_format": "pcm16",
                "input_audio_transcription": transcription, "turn_detection": td, "tools": [],
                "tool_choice": "auto", "temperature": self.temperature, "max_response_output_tokens": max_tokens,
            }
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["audio"] if self.audio_out else ["text"], "instructions": self.instructions,
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": self.input_rate}, "transcription": transcription,
                          "noise_reduction": None, "turn_detection": td},
                "output": {"format": {"type": "audio/pcm", "rate": OUTPUT_RATE}, "voice": self.voice, "speed": 1.0},
            },
            "tools": [], "tool_choice": "auto", "max_output_tokens": max_tokens,
        }


def _num(value: Any, param: str, lo: float, hi: float, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{param} must be a number", param=param)
    if not lo <= value <= hi:
        raise ProtocolError(f"{param} must be in [{lo:g}, {hi:g}], got {value!r}", param=param)
    return int(value) if integer else float(value)


def _turn_detection(value: Any, current: TurnDetection | None, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"{param} must be an object or null", param=param)
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise ProtocolError(f"{param}.type {kind!r} is not supported; use 'server_vad' or null (manual turns)",
                            param=f"{param}.type", code="unsupported_turn_detection")
    td = TurnDetection(**vars(current)) if current is not None else TurnDetection()
    if value.get("threshold") is not None:
        td.threshold = _num(value["threshold"], f"{param}.threshold", 0.0, 1.0)
    if value.get("prefix_padding_ms") is not None:
        td.prefix_padding_ms = _num(value["prefix_padding_ms"], f"{param}.prefix_padding_ms", 0, 10_000, True)
    if value.get("silence_duration_ms") is not None:
        td.silence_duration_ms = _num(value["silence_duration_ms"], f"{param}.silence_duration_ms", 32, 10_000, True)
    for key in ("create_response", "interrupt_response"):
        if value.get(key) is not None:
            if not isinstance(value[key], bool):
                raise ProtocolError(f"{param}.{key} must be a boolean", param=f"{param}.{key}")
            setattr(td, key, value[key])
    return td


def _modalities(value: Any, param: str) -> bool:
    """True when audio output is asked for."""
    if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
        raise ProtocolError(f"{param} must be a list of 'text' / 'audio'", param=param)
    return "audio" in value


def _max_tokens(value: Any, param: str) -> int | None:
    if value == "inf" or value is None:
        return None
    return _num(value, param, 1, 1_000_000, True)


def _rate(value: Any, param: str) -> int:
    rate = _num(value, param, 1, 1_000_000, True)
    if rate not in INPUT_RATES:
        raise ProtocolError(f"{param}: input audio must be 16000 or 24000 Hz pcm16, got {rate}", param=param)
    return rate


def apply_session_update(cfg: SessionConfig, session: Any, dialect: str, check_voice) -> SessionConfig:
    """A new SessionConfig: `cfg` with the fields of a session.update's `session` (either shape).

    `check_voice(name) -> canonical name` raises ProtocolError for an unknown voice.
    """
    if not isinstance(session, dict):
        raise ProtocolError("session must be an object", param="session")
    new = SessionConfig(**{**vars(cfg)})
    if "instructions" in session:
        if not isinstance(session["instructions"], (str, type(None))):
            raise ProtocolError("session.instructions must be a string", param="session.instructions")
        new.instructions = session["instructions"] or ""
    if session.get("temperature") is not None:
        new.temperature = _num(session["temperature"], "session.temperature", 0.0, 2.0)
    if dialect == BETA:
        if "modalities" in session:
            new.audio_out = _modalities(session["modalities"], "session.modalities")
        if session.get("voice") is not None:
            new.voice = check_voice(session["voice"], "session.voice")
        fmt = session.get("input_audio_format")
        if fmt is not None and fmt != "pcm16":
            raise ProtocolError(f"input_audio_format {fmt!r} is not supported; use 'pcm16'",
                                param="session.input_audio_format")
        fmt = session.get("output_audio_format")
        if fmt is not None and fmt != "pcm16":
            raise ProtocolError(f"output_audio_format {fmt!r} is not supported; use 'pcm16'",
                                param="session.output_audio_format")
        if session.get("input_audio_sample_rate") is not None:
            new.input_rate = _rate(session["input_audio_sample_rate"], "session.input_audio_sample_rate")
        if "turn_detection" in session:
            new.turn_detection = _turn_detection(session["turn_detection"], cfg.turn_detection, "session.turn_detection")
        if "input_audio_transcription" in session:
            new.transcribe_input = session["input_audio_transcription"] is not None
        if "max_response_output_tokens" in session:
            new.max_output_tokens = _max_tokens(session["max_response_output_tokens"], "session.max_response_output_tokens")
        return new
    kind = session.get("type", "realtime")
    if kind != "realtime":
        raise ProtocolError(f"session.type {kind!r} is not supported here; use 'realtime'", param="session.type")
    if "output_modalities" in session:
        new.audio_out = _modalities(session["output_modalities"], "session.output_modalities")
    if "max_output_tokens" in session:
        new.max_output_tokens = _max_tokens(session["max_output_tokens"], "session.max_output_tokens")
    audio = session.get("audio")
    if audio is None:
        return new
    if not isinstance(audio, dict):
        raise ProtocolError("session.audio must be an object", param="session.audio")
    inp = audio.get("input") or {}
    out = audio.get("output") or {}
    if not isinstance(inp, dict) or not isinstance(out, dict):
        raise ProtocolError("session.audio.input / output must be objects", param="session.audio")
    fmt = inp.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
            raise ProtocolError("session.audio.input.format: only {'type': 'audio/pcm'} is supported",
                                param="session.audio.input.format")
        if fmt.get("rate") is not None:
            new.input_rate = _rate(fmt["rate"], "session.audio.input.format.rate")
    if "turn_detection" in inp:
        new.turn_detection = _turn_detection(inp["turn_detection"], cfg.turn_detection,
                                             "session.audio.input.turn_detection")
    if "transcription" in inp:
        new.transcribe_input = inp["transcription"] is not None
    fmt = out.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm" or \
                fmt.get("rate", OUTPUT_RATE) != OUTPUT_RATE:
            raise ProtocolError("session.audio.output.format: only {'type': 'audio/pcm', 'rate': 24000} is supported",
                                param="session.audio.output.format")
    if out.get("voice") is not None:
        new.voice = check_voice(out["voice"], "session.audio.output.voice")
    if out.get("speed") not in (None, 1, 1.0):
        raise ProtocolError("session.audio.output.speed: only 1.0 is supported", param="session.audio.output.speed")
    return new


# -- items ---------------------------------------------------------------------------------------
@dataclass
class Item:
    """One conversation item: a user turn (audio, text, images) or an assistant answer."""

    id: str
    role: str  # "user" | "assistant" | "system"
    audio: Any = None  # user: float32 16 kHz waveform
    text: str = ""  # user/system: typed text; assistant: the answer (its transcript when spoken)
    images: list[bytes] = field(default_factory=list)
    transcript: str | None = None  # user audio: transcription, when asked for
    status: str = "completed"  # "in_progress" | "completed" | "incomplete"
    spoken: bool = False  # assistant: the answer has audio
    audio_ms: int = 0  # assistant: ms of audio made (sent, once truncated)
    truncated: bool = False
    created: float = field(default_factory=time.time)

    @property
    def audio_seconds(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / 16000

    def content(self, dialect: str) -> list[dict]:
        if self.role == "assistant":
            if self.spoken:
                return [{"type": "audio" if dialect == BETA else "output_audio", "transcript": self.text}]
            return [{"type": "text" if dialect == BETA else "output_text", "text": self.text}]
        parts: list[dict] = []
        for _ in self.images:
            parts.append({"type": "input_image", "image_url": None})  # the frame itself is not echoed back
        if self.audio is not None:
            parts.append({"type": "input_audio", "transcript": self.transcript})
        if self.text or not parts:
            parts.append({"type": "input_text", "text": self.text})
        return parts

    def dump(self, dialect: str) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "status": self.status,
                "role": self.role, "content": self.content(dialect)}

    def message(self) -> dict | None:
        """This item as a chat message for the processor (None: nothing to tell the model)."""
        if self.role == "assistant":
            return {"role": "assistant", "content": self.text} if self.text.strip() else None
        if self.role == "system":
            return {"role": "system", "content": self.text} if self.text else None
        parts: list[dict] = [{"type": "image", "image": img} for img in self.images]
        if self.audio is not None and len(self.audio):
            parts.append({"type": "audio", "audio": self.audio})
        if self.text:
            parts.append({"type": "text", "text": self.text})
        return {"role": "user", "content": parts} if parts else None


def truncate_text(text: str, fraction: float) -> str:
    """The first `fraction` of `text`, cut back to a word boundary (what was heard of an answer)."""
    if fraction >= 1.0:
        return text
    if fraction <= 0.0:
        return ""
    n = int(len(text) * fraction)
    cut = text[:n]
    if n < len(text) and not text[n].isspace():
        space = cut.rfind(" ")
        cut = cut[:space] if space > 0 else cut
    return cut.rstrip()
