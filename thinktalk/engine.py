"""The thinker's step loop: schedule -> run -> postprocess, with continuous batching.

Every step packs the new tokens of all running requests into one batch: whole prompts of
newly admitted requests (prefill) and one token of each decoding request. A request is admitted
when it arrives and leaves the batch the step it finishes or is aborted, so short and long
requests share the model without waiting for each other.

This is the reference (pure PyTorch) path: each request keeps its keys and values in a
contiguous per-request cache (`layers.attention.ContiguousKV`).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from .errors import ContextLengthError
from .layers.attention import ContiguousKV, SequenceKV
from .request import Request, Status
from .sampler import sample_one, top_logprobs

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request: Request
    new_token: int | None
    finished: bool


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # requests decoded together
    max_prefill_tokens: int = 16384  # prompt tokens admitted per step
    max_model_len: int | None = None  # default: the model's max_position_embeddings


@dataclass
class _Batch:
    requests: list[Request]
    input_ids: torch.Tensor
    positions: torch.Tensor  # [3, N]
    new_lens: list[int]
    prefill: list[bool] = field(default_factory=list)


class Engine:
    def __init__(self, model, eos_token_ids: list[int], config: EngineConfig | None = None, capture_layer: int | None = None):
        self.model = model
        self.thinker = model.thinker
        self.config = config or EngineConfig()
        text_cfg = self.thinker.cfg.text_config
        self.max_model_len = self.config.max_model_len or text_cfg.max_position_embeddings
        self.eos_token_ids = set(eos_token_ids)
        # hidden-state index the talker reads (transformers' numbering; 0 = embeddings)
        self.capture_layer = capture_layer
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- public API -------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        limit = self.max_model_len
        if len(req.prompt_ids) + 1 > limit:
            raise ContextLengthError(
                f"prompt is {len(req.prompt_ids)} tokens; the model's context is {limit} tokens", param="messages"
            )
        req.sampling.max_new_tokens = min(req.sampling.max_new_tokens, limit - len(req.prompt_ids))
        if req.sampling.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        req.kv = SequenceKV()
        if req.speaker is not None and self.capture_layer is not None:
            req.capture = {0: [], self.capture_layer: []}
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for req in list(queue):
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, "abort")
                    return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self._schedule()
        if batch is None:
            return []
        logits = self._run(batch)
        return self._postprocess(batch, logits)

    # -- the three phases ----------------------------------------------------------------------
    def _schedule(self) -> _Batch | None:
        budget = self.config.max_prefill_tokens
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.config.max_num_seqs:
            n = len(self.waiting[0].prompt_ids)
            if admitted and n > budget:
                break
            admitted.append(self.waiting.popleft())
            budget -= n
        for req in admitted:
            req.status = Status.RUNNING
        reqs = admitted + self.running
        if not reqs:
            return None
        ids, pos, lens = [], [], []
        for req in admitted:
            ids.append(torch.tensor(req.prompt_ids))
            pos.append(req.positions)
            lens.append(len(req.prompt_ids))
        for req in self.running:
            p = req.num_tokens - 1 + req.rope_delta
            ids.append(torch.tensor(req.output_ids[-1:]))
            pos.append(torch.full((3, 1), p, dtype=torch.long))
            lens.append(1)
        self.running = reqs
        return _Batch(
            reqs, torch.cat(ids).to(self.device), torch.cat(pos, dim=1).to(self.device), lens,
            [True] * len(admitted) + [False] * (len(reqs) - len(admitted)),
        )

    def _run(self, batch: _Batch) -> torch.Tensor:
        embeds, deepstack = self._embed(batch)
        kv = ContiguousKV([r.kv for r in batch.requests], batch.new_lens)
        capture = tuple(sorted({0, self.capture_layer})) if self.capture_layer is not None else ()
        hidden, captured = self.thinker(embeds, batch.positions, kv, deepstack, capture)
        last = torch.tensor(batch.new_lens, device=self.device).cumsum(0) - 1
        if capture:
            self._keep_hidden(batch, embeds, captured)
        return self.thinker.logits(hidden[last]).float()

    def _postprocess(self, batch: _Batch, logits: torch.Tensor) -> list[StepOutput]:
        outputs = []
        for req, row in zip(batch.requests, logits):
            token, logprobs = sample_one(row, req.sampling, req.prompt_ids, req.output_ids, req.generator)
            req.output_ids.append(token)
            if req.sampling.logprobs is not None:
                req.output_logprobs.append(top_logprobs(logprobs, token, req.sampling.logprobs))
            reason = None
            if token in self.eos_token_ids or token in req.sampling.stop_token_ids:
                reason = "stop"
            elif len(req.output_ids) >= req.sampling.max_new_tokens:
                reason = "length"
            if reason:
                self.running.remove(req)
                self._finish(req, reason)
            outputs.append(StepOutput(req, token, reason is not None))
        return outputs

    # -- helpers ------------------------------------------------------------------------------
    def _embed(self, batch: _Batch):
        parts, masks, feats = [], [], None
        start = 0
        for req, n, is_prefill in zip(batch.requests, batch.new_lens, batch.prefill):
            ids = batch.input_ids[start : start + n]
            e, deep = self.thinker.embed(ids, req.mm if is_prefill else None)
            parts.append(e)
            mask = torch.zeros(n, dtype=torch.bool, device=self.device)
            if deep is not None:
                mask = deep[0]
                feats = [d if feats is None else torch.cat([feats[i], d]) for i, d in enumerate(deep[1])]
            masks.append(mask)
            start += n
        embeds = torch.cat(parts)
        deepstack = (torch.cat(masks), feats) if feats is not None else None
        return embeds, deepstack

    def _keep_hidden(self, batch: _Batch, embeds: torch.Tensor, captured: dict[int, torch.Tensor]) -> None:
        start = 0
        for req, n in zip(batch.requests, batch.new_lens):
            if req.capture is not None:
                for layer in req.capture:
                    req.capture[layer].append(captured[layer][start : start + n])
            start += n

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.kv = None  # frees the request's keys and values
