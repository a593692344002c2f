"""Per-request sampling over a batch of logits, on the logits' device.

Order of operations follows transformers' logits processors (repetition penalty, temperature,
top-k, top-p) so that a greedy or seeded request gives the same token as the reference; OpenAI's
presence and frequency penalties are applied first, over the generated tokens only.
"""

from __future__ import annotations

import math

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


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p as transformers applies them, over the last axis of [..., V]
    (one request's row or a batch of rows sharing the settings); removed entries become -inf."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
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
        return int(torch.argmax(_no_nan(logits))), torch.log_softmax(logits, -1)
    probs = filter_logits(logits, sp.temperature, sp.top_k, sp.top_p).softmax(-1)
    return int(draw(logits, probs, generator)), torch.log_softmax(logits, -1)


def draw(logits: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [V] or [B, V] (multinomial).

    A row that is no distribution (NaN or inf logits, from an overflow upstream) would make
    multinomial raise, on CUDA as a device-side assert that ends every request in the process:
    such a row draws its most likely token (from `logits`) instead, decided on the device (no sync).
    """
    broken = ~torch.isfinite(probs).all(-1, keepdim=True) | (probs.sum(-1, keepdim=True) <= 0)
    best = torch.nn.functional.one_hot(torch.argmax(_no_nan(logits), -1), probs.shape[-1]).to(probs.dtype)
    token = torch.multinomial(torch.where(broken, best, probs), 1, generator=generator)
    return token[..., 0]


def _no_nan(logits: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(logits, nan=float("-inf"))


def needs_own_pass(sp: SamplingParams, generator: torch.Generator | None) -> bool:
    """Penalties (they read the request's history), logprobs and a seeded generator are applied
    request by request; everything else is sampled for the whole batch at once."""
    return (
        generator is not None
        or sp.logprobs is not None
        or sp.repetition_penalty != 1.0
        or bool(sp.presence_penalty)
        or bool(sp.frequency_penalty)
    )


def sample_batch(logits: torch.Tensor, requests: list) -> list[tuple[int, torch.Tensor | None]]:
    """A token for each row of logits [B, V] (row i belongs to requests[i]); returns (token,
    log-probabilities or None) per row, the latter only where the request asks for logprobs.

    Greedy rows take one batched argmax and sampled rows one filter + multinomial per distinct
    (temperature, top_k, top_p), all on the logits' device, with a single copy of the chosen ids to
    the host: a decode step of 128 requests is not 128 round trips. Rows that need their own pass
    (`needs_own_pass`) go through `sample_one`, which gives the same token as before.
    """
    logits = logits.float()
    out: list = [None] * logits.shape[0]
    own, greedy, groups = _partition(requests)
    for i in own:
        req = requests[i]
        token, logprobs = sample_one(logits[i], req.sampling, req.prompt_ids, req.output_ids, req.generator)
        out[i] = (token, logprobs if req.sampling.logprobs is not None else None)
    if greedy or groups:
        rows, tokens = _batched_tokens(logits, greedy, groups)
        for i, token in zip(rows, tokens.tolist()):
            out[i] = (token, None)
    return out


def sample_batch_on_device(logits: torch.Tensor, requests: list) -> torch.Tensor:
    """Tokens [B] (long, on the logits' device, no host copy) for requests none of which
    `needs_own_pass`: what `sample_batch` picks for them, left on the device so that the next
    decode step can read them before the host does (the engine's overlapped steps)."""
    own, greedy, groups = _partition(requests)
    if own:
        raise ValueError("sample_batch_on_device: a request needs its own sampling pass")
    rows, picked = _batched_tokens(logits.float(), greedy, groups)
    if rows == list(range(len(rows))):
        return picked
    tokens = torch.empty_like(picked)
    tokens[torch.tensor(rows, device=logits.device)] = picked
    return tokens


def _partition(requests: list) -> tuple[list[int], list[int], dict[tuple, list[int]]]:
    """Row indices of the requests that need their own pass, of the greedy ones, and of the
    others grouped by (temperature, top_k, top_p)."""
    own: list[int] = []
    greedy: list[int] = []
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
        sp = req.sampling
        if needs_own_pass(sp, req.generator):
            own.append(i)
        elif sp.greedy:
            greedy.append(i)
        else:
            groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(i)
    return own, greedy, groups


def _batched_tokens(logits: torch.Tensor, greedy: list[int], groups: dict[tuple, list[int]]) -> tuple[list[int], torch.Tensor]:
    """(rows, tokens): the greedy rows, then each sampling group's rows, and their tokens in
    that order as one tensor on the device: one batched argmax, one filter + draw per distinct
    setting."""
    rows = greedy + [i for members in groups.values() for i in members]
    picked = []
    if greedy:
        sub = logits if len(greedy) == logits.shape[0] else logits[torch.tensor(greedy, device=logits.device)]
        picked.append(_no_nan(sub).argmax(-1))
    for (temperature, top_k, top_p), members in groups.items():
        sub = logits[torch.tensor(members, device=logits.device)]
        probs = filter_logits(sub, temperature, top_k, top_p).softmax(-1)
        picked.append(draw(sub, probs))
    return rows, picked[0] if len(picked) == 1 else torch.cat(picked)


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict:
    """The chosen token's log-probability and the k most likely alternatives."""
    entry = {"token": token, "logprob": _finite(float(logprobs[token])), "top": []}
    if k:
        values, ids = torch.topk(_no_nan(logprobs), k)
        entry["top"] = [(int(i), _finite(float(v))) for i, v in zip(ids, values)]
    return entry


def _finite(logprob: float) -> float:
    """JSON has no NaN or infinity: an impossible token gets OpenAI's floor, -9999."""
    return logprob if math.isfinite(logprob) else -9999.0
