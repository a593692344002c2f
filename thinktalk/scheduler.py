"""Admission, prefill/decode batching and preemption: which tokens the next step computes.

One view covers every request: its tokens are the prompt followed by what it generated so far,
and its KV pool (`kv_cache.py`) knows how many of them already have keys and values in the cache.
A step computes the next tokens of each running request: one for a decoding request (the token it
sampled last), a chunk of the prompt for a request still in prefill. Only a chunk that reaches the
request's last token yields logits to sample from.

- Decodes always run; prefill tokens share a budget of `max_prefill_tokens` per step. With
  `chunked_prefill` a long prompt is cut to fit the budget and continues next step, so decoding
  requests keep streaming meanwhile; without it whole prompts are admitted while the budget lasts
  (the first one of a step regardless of its length).
- A waiting request is admitted (first come, first served) when a decode seat is free and the
  pool has room for all its tokens; otherwise it waits. The pool may find a prefix of it already
  cached; only the rest is computed (a request that speaks gets the talker's hidden states of
  that prefix back from the pool, `PagedPool.gather_hidden`, done by the engine).
- When a decoding request needs a new block and none is free, the most recently admitted request
  is preempted: its blocks are freed and it goes back to the head of the queue, to be recomputed
  (prompt + generated tokens) when there is room; its full blocks usually survive in the prefix
  cache, so the recompute is mostly a lookup.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .request import Request, Status


@dataclass
class Batch:
    """What one step computes: prefill chunks first, then decodes."""

    requests: list[Request]
    starts: list[int]  # index (in prompt + output) of each request's first new token
    new_lens: list[int]  # new tokens of each request
    prefill: list[bool]  # chunk of a prompt (attention via SDPA) or a decode token
    sample: list[bool]  # the chunk ends at the request's last token: sample a new one
    input_ids: torch.Tensor = field(default=None)  # [N] on the CPU
    positions: torch.Tensor = field(default=None)  # [3, N] on the CPU

    @property
    def rows(self):
        return zip(self.requests, self.starts, self.new_lens, self.sample)


def token_slice(req: Request, start: int, end: int) -> list[int]:
    """Token ids start..end-1 of prompt + output, without copying the whole sequence."""
    n = len(req.prompt_ids)
    if end <= n:
        return req.prompt_ids[start:end]
    if start >= n:
        return req.output_ids[start - n : end - n]
    return req.prompt_ids[start:] + req.output_ids[: end - n]


def token_positions(req: Request, start: int, end: int) -> torch.Tensor:
    """M-RoPE positions [3, end - start] of tokens start..end-1: the prompt's own, then
    (index + rope_delta) on all three axes for generated tokens."""
    n = len(req.prompt_ids)
    parts = []
    if start < n:
        parts.append(req.positions[:, start : min(end, n)].cpu().long())
    if end > n:
        gen = torch.arange(max(start, n), end, dtype=torch.long) + req.rope_delta
        parts.append(gen[None].expand(3, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def decode_positions(rows: list[tuple[Request, int]]) -> torch.Tensor:
    """`token_positions` of one token per row, [3, len(rows)], built in one go."""
    cols = []
    for req, start in rows:
        if start >= len(req.prompt_ids):  # a generated token: index + rope_delta on all three axes
            p = start + req.rope_delta
            cols.append((p, p, p))
        else:  # the prompt's last token (after a chunked or cached prefill)
            cols.append(tuple(req.positions[:, start].tolist()))
    # as token_positions: long for integer positions, float where rope_delta is a float
    return torch.tensor(cols).T.contiguous()


def captured_tokens(req: Request) -> int:
    """Tokens whose hidden states the request already keeps for the talker."""
    return sum(x.shape[0] for x in req.capture[0]) if req.capture else 0


class Scheduler:
    def __init__(self, config, pool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "preemptions": 0}
        bm = pool.block_manager
        self.watermark = int(bm.num_blocks * config.kv_watermark) if bm is not None else 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of the queues, freeing its KV at once."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.pool.free(req)
                    return req
        return None

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req)

    def schedule(self) -> Batch | None:
        budget = self.config.max_prefill_tokens
        prefills, decodes = [], []  # (request, first new token, count)
        preempted = False
        for req in list(self.running):
            if req.status is not Status.RUNNING:
                continue  # preempted below, as the victim of an earlier request
            done = self.pool.num_computed(req)
            left = req.num_tokens - done
            if left > 1:  # a prompt still in prefill (its last token alone runs as a decode)
                if budget > 0:
                    prefills.append((req, done, min(left, budget)))
                    budget -= prefills[-1][2]
                continue
            # a slot for the token: preempt the newest requests until there is one
            while not self.pool.reserve(req, req.num_tokens):
                self._preempt(self.running[-1])
                preempted = True
                if req.status is not Status.RUNNING:
                    break  # it was the newest itself
            else:
                decodes.append((req, done, 1))
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if prefills and not self.config.chunked_prefill and req.num_tokens > budget:
                break
            # a request that speaks needs hidden states of every prompt token: a cached prefix is
            # only of use where the pool keeps them too (else at most the rows it already kept)
            max_cached = captured_tokens(req) if req.capture is not None and self.pool.hidden is None else None
            if not self.pool.admit(req, max_cached, keep_free=self.watermark if self.running else 0):
                break  # no room in the KV cache: wait for blocks to free up
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            done = self.pool.num_computed(req)
            self.stats["cached_tokens"] += done
            if req.num_cached_tokens is None:  # a re-admission after preemption is not the client's
                req.num_cached_tokens = min(done, len(req.prompt_ids))
            n = req.num_tokens - done
            n = min(n, budget) if self.config.chunked_prefill else n
            prefills.append((req, done, n))
            budget -= n
        if not prefills and not decodes:
            return None
        self.stats["prefill_tokens"] += sum(n for _, _, n in prefills)
        return self._batch(prefills, decodes)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _batch(self, prefills, decodes) -> Batch:
        rows = prefills + decodes
        reqs = [r for r, _, _ in rows]
        starts = [s for _, s, _ in rows]
        lens = [n for _, _, n in rows]
        ids = [token_slice(r, s, s + n) for r, s, n in rows]
        batch = Batch(
            reqs, starts, lens,
            prefill=[True] * len(prefills) + [False] * len(decodes),
            sample=[s + n == r.num_tokens for r, s, n in rows],
        )
        batch.input_ids = torch.tensor([t for part in ids for t in part], dtype=torch.long)
        parts = [token_positions(r, s, s + n) for r, s, n in prefills]
        if decodes:  # one tensor for all decode rows: per-row torch ops cost ~1 ms per 64 rows
            parts.append(decode_positions([(r, s) for r, s, _ in decodes]))
        batch.positions = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return batch
