"""Sampling parameters, the guide's presets, and the state of one request in the engine."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

import torch

from .errors import InputError

GREEDY_BELOW_TEMPERATURE = 1e-5  # (vLLM's threshold too)
# a penalty beyond these scales logits past float32's range (NaN probabilities); no use needs them
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0

# The presets of the Qwen3-Omni user guide. top_k 0 means "off".
PRESETS: dict[str, dict[str, Any]] = {
    "creative": dict(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=1024),
    "factual": dict(temperature=0.3, top_p=0.7, top_k=0, repetition_penalty=1.0, max_new_tokens=512),
    "conversational": dict(temperature=0.6, top_p=0.85, top_k=30, repetition_penalty=1.05, max_new_tokens=256),
}


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # transformers' rule, over prompt and output
    presence_penalty: float = 0.0  # OpenAI's rules, over the output
    frequency_penalty: float = 0.0
    max_new_tokens: int = 512
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # number of top logprobs to return per token (0 = only the chosen)

    def validate(self) -> "SamplingParams":
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("repetition_penalty", MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)!r} {why}", param=name)
        return self

    @property
    def greedy(self) -> bool:
        # a temperature this small is argmax anyway, and dividing by it overflows float32
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


def sampling_from(preset: str | None = None, **overrides: Any) -> SamplingParams:
    """A preset's values with explicit (non-None) overrides on top."""
    base: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", param="preset")
        base.update(PRESETS[preset])
    known = {f.name for f in fields(SamplingParams)}
    for key, value in overrides.items():
        if key not in known:
            raise InputError(f"unknown sampling parameter {key!r}", param=key)
        if value is not None:
            base[key] = value
    return SamplingParams(**base).validate()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)  # a request is itself, not its fields: two users may send the same prompt, and
class Request:        # comparing fields would compare tensors (the scheduler's list.remove did)
    """One conversation turn: a rendered, tokenized prompt and what to do with it."""

    prompt_ids: list[int]
    positions: torch.Tensor  # [3, len(prompt_ids)] M-RoPE positions of the prompt
    rope_delta: float  # decode position = tokens so far + rope_delta (fractional for some videos)
    sampling: SamplingParams
    mm: Any = None  # models.thinker.MultimodalInputs of this prompt, or None
    media_items: list | None = None  # multimodal.items.MediaItem of mm, in placeholder order (prefix-cache keys)
    speaker: str | None = None  # set: speak the answer with this voice
    speech_max_frames: int | None = None  # cap on codec frames (12.5/s); None: the talker's default
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # filled by the engine
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: Exception | None = None  # why, when finish_reason is "error"
    kv: Any = None
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
    capture: dict[int, list[torch.Tensor]] | None = None  # hidden states kept for the talker
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def with_sampling(self, **changes: Any) -> "Request":
        return replace(self, sampling=replace(self.sampling, **changes))
