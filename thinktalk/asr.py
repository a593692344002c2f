"""Speech to text with the thinker: the model card's prompts and OpenAI's transcription formats.

Qwen3-Omni has no separate ASR head; transcription and speech translation are chat turns with the
audio and an instruction, as the model card and its cookbooks write them:

    ASR:          "Transcribe the <language> audio into text."   (Chinese: "请将这段中文语音转换为纯文本。")
    translation:  "Listen to the provided <language> speech and produce a translation in <target> text."

The model gives no timestamps, so the subtitle and verbose formats carry one segment spanning the
whole audio.
"""

from __future__ import annotations

import zlib
from typing import Any

from .errors import InputError

# ISO 639-1 (and Cantonese's 639-3) codes of the model's speech input languages
LANGUAGES = {
    "en": "English", "zh": "Chinese", "ko": "Korean", "ja": "Japanese", "de": "German", "ru": "Russian",
    "it": "Italian", "fr": "French", "es": "Spanish", "pt": "Portuguese", "ms": "Malay", "nl": "Dutch",
    "id": "Indonesian", "tr": "Turkish", "vi": "Vietnamese", "yue": "Cantonese", "ar": "Arabic", "ur": "Urdu",
    "hi": "Hindi",
}
TEXT_FORMATS = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
JSON_FORMATS = ("json", "verbose_json")


def language_name(value: Any) -> str | None:
    """A language code or name -> the name the prompts use; None for none given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    key = str(value).strip().lower()
    if key in LANGUAGES:
        return LANGUAGES[key]
    for name in LANGUAGES.values():
        if name.lower() == key:
            return name
    raise InputError(f"unsupported language {value!r}; use one of {', '.join(sorted(LANGUAGES))}", param="language")


def asr_instruction(task: str, language: str | None, target: str = "English") -> str:
    """The instruction of a transcription ("transcribe") or speech translation ("translate") turn."""
    if task == "transcribe":
        if language == "Chinese":
            return "请将这段中文语音转换为纯文本。"
        return f"Transcribe the {language} audio into text." if language else "Transcribe the audio into text."
    source = f"{language} " if language else ""
    return f"Listen to the provided {source}speech and produce a translation in {target} text."


def timestamp(seconds: float, sep: str) -> str:
    """hh:mm:ss<sep>mmm (sep ',' for SRT, '.' for WebVTT)."""
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def transcript_text(text: str, fmt: str, seconds: float) -> str:
    """The body of a text, srt or vtt answer."""
    if fmt == "text":
        return text + "\n" if text else ""
    if fmt == "srt":
        return f"1\n{timestamp(0, ',')} --> {timestamp(seconds, ',')}\n{text}\n\n"
    if fmt == "vtt":
        return f"WEBVTT\n\n{timestamp(0, '.')} --> {timestamp(seconds, '.')}\n{text}\n\n"
    raise ValueError(f"not a text format: {fmt!r}")


def transcript_json(text: str, fmt: str, seconds: float, prompt_tokens: int, output_ids: list[int], *,
                    task: str = "transcribe", language: str | None = None, temperature: float = 0.0,
                    logprobs: list[float] | None = None) -> dict[str, Any]:
    """The body of a json or verbose_json answer, with token usage."""
    usage = {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": len(output_ids),
             "total_tokens": prompt_tokens + len(output_ids)}
    if fmt == "json":
        return {"text": text, "usage": usage}
    raw = text.encode("utf-8")
    segment = {
        "id": 0, "seek": 0, "start": 0.0, "end": round(seconds, 3), "text": text, "tokens": list(output_ids),
        "temperature": temperature, "avg_logprob": sum(logprobs) / len(logprobs) if logprobs else 0.0,
        "compression_ratio": len(raw) / len(zlib.compress(raw)) if raw else 0.0, "no_speech_prob": 0.0,
    }
    spoken = "english" if task == "translate" else (language or "unknown").lower()
    return {"task": task, "language": spoken, "duration": round(seconds, 3), "text": text, "segments": [segment],
            "usage": usage}


def input_audio_seconds(req, processor) -> float:
    """Seconds of audio in a prepared request, from its mel frames."""
    mask = (getattr(req, "mm_inputs", None) or {}).get("feature_attention_mask")
    if mask is None:
        return 0.0
    return float(mask.sum()) * processor.mel.hop_length / processor.mel.sampling_rate
