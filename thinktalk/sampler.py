"""Per-request sampling over a batch of logits, on the logits' device.

Order of operations follows transformers' logits processors (repetition penalty, temperature,
top-k, top-p) so that a greedy or seeded request gives the same token as the reference; OpenAI's
presence and frequency penalties are applied first, over the generated tokens only.
"""

from __future__ import annotations

import torch

from .request import SamplingParams


def apply_penalties(
    logits: torch.Tensor, sp: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """logits [V] float32 of one request; returns the penalised logits."""
    if output_ids and (sp.presence_penalty or sp.frequency_penalty):
        ids = torch.tensor(output_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[0])[: logits.shape[0]].float()
        logits = logits - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0).float()
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        picked = logits[seen]
        picked = torch.where(picked < 0, picked * sp.repetition_penalty, picked / sp.repetition_penalty)
        logits = logits.clone()
        logits[seen] = picked
    return logits


def filter_logits(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p as transformers applies them; removed entries become -inf."""
    logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= 1 - sp.top_p
        remove_sorted[-1] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_one(
    logits: torch.Tensor,
    sp: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    generator: torch.Generator | None,
) -> tuple[int, torch.Tensor]:
    """Returns the chosen token and the log-probabilities it was drawn from (after penalties)."""
    logits = apply_penalties(logits.float(), sp, prompt_ids, output_ids)
    if sp.greedy:
        return int(torch.argmax(logits)), torch.log_softmax(logits, -1)
    filtered = filter_logits(logits, sp)
    probs = filtered.softmax(-1)
    token = torch.multinomial(probs, 1, generator=generator)
    return int(token), torch.log_softmax(logits, -1)


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict:
    """The chosen token's log-probability and the k most likely alternatives."""
    entry = {"token": token, "logprob": float(logprobs[token]), "top": []}
    if k:
        values, ids = torch.topk(logprobs, k)
        entry["top"] = [(int(i), float(v)) for i, v in zip(ids, values)]
    return entry
