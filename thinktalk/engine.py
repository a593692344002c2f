"""The thinker's step loop: schedule -> run -> postprocess, with continuous batching.

Every step packs the new tokens of all running requests into one batch: the prompts (or, with
chunked prefill, prompt chunks) of newly admitted requests and one token of each decoding request. A request is admitted
when it arrives and leaves the batch the step it finishes or is aborted, so short and long
requests share the model without waiting for each other.

Where keys and values live is the KV pool's business (kv_cache.py): `kv_backend="contiguous"`
is the reference path, a growing tensor per request (`layers.attention.ContiguousKV`);
`kv_backend="paged"` shares a preallocated paged cache in blocks, with admission bounded by free
blocks, preemption by recompute and prefix reuse. Which tokens a step computes (admission, chunked
prefill, preemption) is decided by scheduler.py, the same for both.

A request that speaks keeps the thinker's hidden states the talker reads (`Request.capture`): the
rows of the tokens a step computes, and, for a prefix reused from the cache, token embeddings plus
the rows the paged pool kept for it (`_restore_hidden`, kv_cache.py). A multimodal prompt computed
after a cached prefix (or in chunks) runs the audio and vision encoders only over the media items
that the computed part holds (`_embed_prompt_rest`).

How a step runs on the GPU: a decode-only batch replays a CUDA graph of its padded batch size
(decode_graphs.py); any other step of up to `max_prefill_graph_tokens` tokens replays the
per-token halves of every layer as graph pieces with attention eager between them
(prefill_graphs.py); steps with vision deepstack features or more tokens run eagerly.

Overlapped decode steps (`overlap_steps`): between two synchronous decode steps the GPU idles
while the host copies the sampled ids, appends them, checks stops and stages the next step
(0.3-1 ms against a 3-25 ms step). Instead, a decode-only step is launched with its tokens
sampled on the device and copied to the host asynchronously; the next call launches the step
after it right away, reading those tokens on the device, and only then processes the earlier
step's tokens while the GPU runs. So `step()` returns each decode step's tokens one call later.
A request that stops on a sampled token (eos, a stop id, an abort) has one more token computed
and thrown away (its KV slot was reserved anyway; the blocks it frees are only reused by steps
launched later, on the same stream); one that reaches max_new_tokens is never continued. A call
that must schedule (a request waiting to be admitted, a prefill, a request that needs its own
sampling pass, a preemption) first lands the step in flight and returns its tokens. Steps with a
speaking request stay synchronous: the speech stage syncs after every step anyway, and reading
each token one call later makes the talker, which needs each new token and its hidden states,
start and go one loop iteration later (checked on the CPU). The one speech benchmark run with
overlapped speakers was also slower at 32 speakers (first audio 506 against 311 ms on an H100), but
it differed in more than that (README), so only the direction is known. Text-only decoding gained
4-5% (README).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from .decode_graphs import DecodeGraphs
from .errors import ContextLengthError, OutOfMemoryError
from .kernels import paged_attention as pa
from .kernels.common import set_programmatic_launch
from .kv_cache import ContiguousPool, PagedPool, plan_num_blocks
from .layers.attention import Attention, ContiguousKV, SequenceKV, fuse_qkv
from .layers.decoder import DecoderLayer
from .layers.mlp import GatedMLP, fuse_gate_up
from .layers.moe import SparseMoE
from .layers.norm import RMSNorm
from .multimodal.items import item_of_token, items_from, select_items
from .prefill_graphs import PrefillGraphs
from .request import Request, Status
from .sampler import needs_own_pass, sample_batch, sample_batch_on_device, top_logprobs
from .scheduler import Batch, Scheduler, captured_tokens, decode_positions, token_slice

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
    max_prefill_tokens: int = 16384  # prompt tokens computed per step
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    chunked_prefill: bool = True  # cut long prompts to the budget so decodes keep running
    kv_backend: str = "auto"  # "contiguous" (reference) | "paged" | "auto": paged on CUDA
    # paged KV cache
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from the memory budget below
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + activations + KV
    cpu_kv_cache_gib: float = 1.0  # KV budget on the CPU
    enable_prefix_caching: bool = True
    kv_watermark: float = 0.01  # share of blocks kept free when admitting (fewer preemptions)
    decode_attention: str = "auto"  # "auto" (Triton on CUDA) | "triton" | "torch"
    moe_kernel: str = "auto"  # "torch" (reference) | "triton" (fused MoE kernel) | "auto": triton on CUDA
    # RMSNorm (+ residual add), q/k norm + rotary, router softmax + top-k: "torch" (reference) |
    # "triton" (one fused kernel each, kernels/rms_norm.py, rope.py, router.py) | "auto": triton on CUDA
    layer_kernels: str = "auto"
    # the decode GEMVs (kernels/gemv.py: linears of up to 2 rows, 8 for narrow weights such as the
    # router; MoEs of up to 8 tokens) where the Triton kernels are installed; False keeps cuBLAS /
    # the grouped fused MoE there
    decode_gemv: bool = True
    # Hopper and newer: the Triton kernels launched with programmatic dependent launch, each placed
    # on the GPU while the kernel before it finishes (kernels/common.py). Off by default: on its own
    # it measured neutral (H100, one stream 288 vs 286 tok/s, 64 streams 2,721 vs 2,734). Process-
    # wide: the last engine built sets it for every model in the process (the speech stages use
    # the same kernels). With the L2 prefetch of the GEMVs' weights added it measured worse at one
    # stream (H100, back to back, thinker_norm_gemv_pdl_ab_h100.json: 274 vs 285 tok/s; 64
    # streams 2,697 vs 2,680).
    programmatic_launch: bool = False
    # with decode_gemv: each layer's residual add + RMSNorm folded into the GEMVs that read the
    # normed row, the q/k/v product and the MoE's router and gate-up (kernels/norm_gemv.py: two
    # kernels a layer fewer at a few decode rows). H100, back to back: one stream 291 vs 285
    # tok/s, 64 streams unchanged (2,679 vs 2,680; thinker_norm_gemv_pdl_ab_h100.json).
    fuse_norm_gemv: bool = True
    # with fuse_norm_gemv: the MoE's gate-up GEMV programs pick their experts from the router's
    # logits (norm_gemv.add_norm_moe's route_in_gate_up) instead of a top-k kernel before them
    # (one kernel a layer fewer). H100, back to back (thinker_fusion_route_in_gate_up_*_h100.json):
    # one stream 294.4 vs 291.2 tok/s, 64 streams 2,678 vs 2,676.
    route_in_gate_up: bool = True
    # decode-only steps through static buffers, replayed as CUDA graphs (decode_graphs.py); None:
    # on CUDA with the paged KV and the Triton kernels. True off CUDA runs the same step eagerly.
    cuda_graphs: bool | None = None
    max_graph_batch: int | None = None  # the largest graphed decode batch; None: max_num_seqs
    # prefill and mixed steps as piecewise CUDA graphs with attention run eagerly between the
    # pieces (prefill_graphs.py); None: where the decode graphs are. True off CUDA runs the pieces eagerly.
    prefill_graphs: bool | None = None
    max_prefill_graph_tokens: int = 4096  # steps with more tokens run eagerly
    # the vision encoder takes at most this many patches (whole frames) per pass, so a long video's
    # encoder activations stay those of one pass (models/vision_encoder.py); the KV budget leaves
    # room for one. None: all of a request's frames in one pass.
    vision_max_patches: int | None = 16384
    # launch the next decode step before processing this one's tokens (module docstring); None:
    # where the decode graphs are (CUDA). True off CUDA runs the same order synchronously.
    overlap_steps: bool | None = None


@dataclass
class InFlightStep:
    """A launched decode step whose sampled tokens the host has not read yet."""

    batch: Batch
    tokens: torch.Tensor  # [n] on the device: the next step's input ids
    host: torch.Tensor  # [n] pinned host copy of tokens, valid once `ready` has passed
    ready: torch.cuda.Event | None  # recorded after the copy (None off CUDA: copied already)


def _decode_batch(requests: list[Request], starts: list[int], positions: torch.Tensor | None = None) -> Batch:
    """A batch of one decode token per request (token index `starts[i]`), sampled; its input ids
    stay on the device (overlapped steps)."""
    n = len(requests)
    return Batch(requests, starts, [1] * n, [False] * n, [True] * n, input_ids=None, positions=positions)


# the module attributes use_triton_kernels may set on instances (each class holds its reference)
KERNEL_ATTRS = ("experts_fn", "topk_fn", "linear_fn", "kernel", "add_kernel", "qk_kernel", "norm_linear_fn",
                "norm_moe_fn", "act_mul_kernel")


def use_triton_kernels(model, moe: bool, layers: bool, decode_gemv: bool = True, fuse_norm_gemv: bool = True,
                       route_in_gate_up: bool = False) -> None:
    """Swap the Triton kernels into the model's modules (each has the signature of the torch
    reference it replaces, set as a class attribute; this sets instance attributes). With the layer
    kernels the attention's q/k/v projections also become one GEMM (`fuse_qkv`), as do a gated
    MLP's gate and up projections (`fuse_gate_up`, then one SiLU-and-multiply kernel), and the
    float linears take GEMVs for the few rows of a decode step (kernels/gemv.py); the MoE kernel
    is the fused grouped GEMM, GEMVs over the selected experts for a few tokens. fuse_norm_gemv
    (with decode_gemv): the decoder layers' input norm folded into their q/k/v GEMV (norm_gemv.py)
    and their post-attention norm into the MoE's router and gate-up GEMVs (route_in_gate_up: and
    the router's top-k into the gate-up GEMV). Kernels an earlier call set are removed first, so a
    model that serves several engines in turn runs each with its own choice (a torch engine after a
    Triton one gets the references back; the stacked q/k/v and gate/up weights stay, as both
    paths take them)."""
    from .kernels import gemv
    from .kernels.activation import silu_mul
    from .kernels.fused_moe import fused_moe
    from .kernels.norm_gemv import add_norm_linear, add_norm_moe
    from .kernels.rms_norm import add_rms_norm, rms_norm
    from .kernels.rope import qk_norm_rope
    from .kernels.router import softmax_topk

    linear = gemv.linear if decode_gemv else F.linear
    for module in model.modules():
        for name in KERNEL_ATTRS:  # back to the class's torch reference
            module.__dict__.pop(name, None)
        if isinstance(module, SparseMoE):
            if moe:
                module.experts_fn = gemv.experts if decode_gemv else fused_moe
            if layers:
                module.topk_fn = softmax_topk
                module.linear_fn = linear
        elif layers and isinstance(module, RMSNorm):
            module.kernel, module.add_kernel = rms_norm, add_rms_norm
        elif layers and isinstance(module, Attention):
            module.qk_kernel = qk_norm_rope
            module.linear_fn = linear
            fuse_qkv(module)
        elif layers and isinstance(module, DecoderLayer):
            fuse = decode_gemv and fuse_norm_gemv
            module.norm_linear_fn = add_norm_linear if fuse else None
            norm_moe = partial(add_norm_moe, route_in_gate_up=True) if route_in_gate_up else add_norm_moe
            module.norm_moe_fn = norm_moe if fuse and moe and isinstance(module.mlp, SparseMoE) else None
        elif layers and isinstance(module, GatedMLP):  # the talker's shared expert, the code predictor
            module.linear_fn = linear
            if fuse_gate_up(module):
                module.act_mul_kernel = silu_mul


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
        # "auto": the fast path (paged KV, fused MoE) on CUDA, the pure-torch reference on CPU;
        # resolved on a copy so a config shared by several engines keeps saying "auto"
        on_cuda = self.device.type == "cuda"
        self.config = replace(
            self.config,
            kv_backend=("paged" if on_cuda else "contiguous") if self.config.kv_backend == "auto" else self.config.kv_backend,
            moe_kernel=("triton" if on_cuda else "torch") if self.config.moe_kernel == "auto" else self.config.moe_kernel,
            layer_kernels=("triton" if on_cuda else "torch") if self.config.layer_kernels == "auto" else self.config.layer_kernels,
        )
        use_triton_kernels(model, moe=self.config.moe_kernel == "triton", layers=self.config.layer_kernels == "triton",
                           decode_gemv=self.config.decode_gemv, fuse_norm_gemv=self.config.fuse_norm_gemv,
                           route_in_gate_up=self.config.route_in_gate_up)
        set_programmatic_launch(self.config.programmatic_launch)  # before the kernels' warm-up and graph capture
        visual = getattr(self.thinker, "visual", None)
        if visual is not None:
            visual.max_patches_per_pass = self.config.vision_max_patches
        self.pool = self._make_pool()
        self.block_manager = self.pool.block_manager  # None on the contiguous path
        if self.block_manager is not None:  # a request must fit the whole cache
            self.max_model_len = min(self.max_model_len, self.block_manager.num_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, self.pool)
        self.decode_graphs = self._make_decode_graphs()
        self.prefill_graphs = self._make_prefill_graphs()
        overlap = self.config.overlap_steps
        self.overlap_steps = self.decode_graphs is not None and (overlap is None and on_cuda or bool(overlap))
        self._in_flight: InFlightStep | None = None
        if on_cuda and (self.config.moe_kernel == "triton" or self.config.layer_kernels == "triton"):
            self.warm_up_kernels()
        self._mm_embeds: dict[str, tuple] = {}  # full-prompt embeddings of multimodal requests in prefill

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self):
        return self.scheduler.running

    @property
    def stats(self) -> dict[str, int]:
        """Counters: prefill_tokens computed, cached_tokens reused from the prefix cache, preemptions."""
        return self.scheduler.stats

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
        if req.speaker is not None and self.capture_layer is not None:
            req.capture = {0: [], self.capture_layer: []}
        self.scheduler.add(req)

    def abort(self, request_id: str) -> Request | None:
        req = self.scheduler.remove(request_id)  # frees its KV blocks at once
        if req is not None:
            self._finish(req, "abort")
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        if self._in_flight is not None:  # overlapped decoding (module docstring)
            landing, nxt = self._in_flight, self._continuation(self._in_flight)
            self._in_flight = self._launch(nxt, landing.tokens, landing.batch) if nxt is not None else None
            return self._land(landing)
        batch = self._schedule()
        if batch is None:
            return []
        if self._can_overlap(batch):
            self._in_flight = self._launch(batch)
            return []
        try:
            logits = self._run(batch)
        except torch.OutOfMemoryError:
            culprit = self._out_of_memory_culprit(batch)
            if culprit is None:
                raise
        else:
            return self._postprocess(batch, logits)
        # out of the except block: the error's traceback, which holds the failed step's tensors, is gone
        return self._refuse_out_of_memory(culprit)

    # -- the three phases ----------------------------------------------------------------------
    def _schedule(self) -> Batch | None:
        return self.scheduler.schedule()

    def _run(self, batch: Batch) -> torch.Tensor:
        if self.decode_graphs is not None and self.decode_graphs.supports(batch):
            logits, captured = self.decode_graphs.run(batch)
            if captured:
                self._keep_hidden(batch, captured)
            return logits
        self._restore_hidden(batch)
        embeds, deepstack = self._embed(batch)
        kv = self.pool.backend(batch, self.device)
        capture = tuple(sorted({0, self.capture_layer})) if self.capture_layer is not None else ()
        positions = batch.positions.to(self.device, non_blocking=True)
        if self.prefill_graphs is not None and self.prefill_graphs.supports(embeds.shape[0], deepstack):
            hidden, captured = self.prefill_graphs.run(embeds, positions, kv, capture)
        else:
            hidden, captured = self.thinker(embeds, positions, kv, deepstack, capture)
        if capture:
            self._keep_hidden(batch, captured)
            if self.pool.hidden is not None:
                self.pool.store_hidden(kv.slot_mapping, captured)
        last = torch.tensor(batch.new_lens).cumsum(0) - 1
        rows = last[torch.tensor(batch.sample, dtype=torch.bool)].to(self.device)
        return self.thinker.logits(hidden[rows]).float()

    def _postprocess(self, batch: Batch, logits: torch.Tensor | None, sampled=None) -> list[StepOutput]:
        """Commit the step's tokens and take what it sampled (from `logits`, or `sampled`: the
        (token, logprobs) of each sampling row, already drawn)."""
        outputs = []
        if sampled is None:
            sampled = sample_batch(logits, [req for req, _, _, sample in batch.rows if sample])
        sampled = iter(sampled)
        for req, start, n, sample in batch.rows:
            self.pool.commit(req, start + n)
            if start + n >= len(req.prompt_ids):
                self._mm_embeds.pop(req.request_id, None)
            if not sample:
                continue  # a prompt chunk that does not reach the end: nothing to sample yet
            token, logprobs = next(sampled)
            req.output_ids.append(token)
            if req.sampling.logprobs is not None:
                req.output_logprobs.append(top_logprobs(logprobs, token, req.sampling.logprobs))
            reason = None
            if token in self.eos_token_ids or token in req.sampling.stop_token_ids:
                reason = "stop"
            elif len(req.output_ids) >= req.sampling.max_new_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(req)
                self._finish(req, reason)
            outputs.append(StepOutput(req, token, reason is not None))
        return outputs

    # -- overlapped decode steps -----------------------------------------------------------------
    def _can_overlap(self, batch: Batch) -> bool:
        return (self.overlap_steps and self.decode_graphs.supports(batch)
                and not any(needs_own_pass(r.sampling, r.generator) or r.capture is not None for r in batch.requests))

    def _continuation(self, prev: InFlightStep) -> Batch | None:
        """The decode step after `prev`, before its tokens are known on the host: every request
        of it still running and below max_new_tokens after its token, one position further. None
        where the scheduler must decide instead (module docstring)."""
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return None  # a request may be admitted
        alive = [(r, s + 1) for r, s in zip(prev.batch.requests, prev.batch.starts) if r.status is Status.RUNNING]
        if len(alive) != len(self.running):
            return None  # something else runs (a prefill, a preempted request's recompute)
        rows = [(r, s) for r, s in alive if len(r.output_ids) + 1 < r.sampling.max_new_tokens]
        if not rows:
            return None
        if not all(self.pool.reserve(r, s + 1) for r, s in rows):
            return None  # a slot needs a preemption: the scheduler's call
        return _decode_batch([r for r, _ in rows], [s for _, s in rows], decode_positions(rows))

    def _launch(self, batch: Batch, prev_tokens: torch.Tensor | None = None, prev: Batch | None = None) -> InFlightStep:
        """Run a decode-only batch and sample it on the device; its input ids are `batch.input_ids`
        or, for a continuation, the rows of `prev_tokens` of its requests in `prev`."""
        device_ids = None
        if prev_tokens is not None:
            device_ids = prev_tokens
            if batch.requests != prev.requests:
                where = {id(r): i for i, r in enumerate(prev.requests)}
                index = torch.tensor([where[id(r)] for r in batch.requests])
                device_ids = prev_tokens[index.to(self.device, non_blocking=True)]
        logits, _ = self.decode_graphs.run(batch, device_ids)  # no speaking request: nothing captured to keep
        tokens = sample_batch_on_device(logits, batch.requests)
        on_cuda = self.device.type == "cuda"
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=on_cuda)
        host.copy_(tokens, non_blocking=on_cuda)
        ready = None
        if on_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return InFlightStep(batch, tokens, host, ready)

    def _land(self, step: InFlightStep) -> list[StepOutput]:
        """Process a launched step's tokens (`_postprocess` for tokens already sampled); rows of
        requests that stopped meanwhile are dropped."""
        if step.ready is not None:
            step.ready.synchronize()
        keep = [i for i, r in enumerate(step.batch.requests) if r.status is Status.RUNNING]
        batch = step.batch
        if len(keep) < len(batch.requests):
            batch = _decode_batch([batch.requests[i] for i in keep], [batch.starts[i] for i in keep])
        tokens = step.host.tolist()
        return self._postprocess(batch, None, [(tokens[i], None) for i in keep])

    # -- helpers ------------------------------------------------------------------------------
    def _embed(self, batch: Batch):
        ids_all = batch.input_ids.to(self.device, non_blocking=True)
        parts, masks, feats = [], [], None
        offset = 0
        for req, start, n, _ in batch.rows:
            ids = ids_all[offset : offset + n]
            if req.mm is not None and start < len(req.prompt_ids):
                e, deep = self._embed_prompt_part(req, ids, start, n)
            else:
                e, deep = self.thinker.embed(ids)
            parts.append(e)
            mask = torch.zeros(n, dtype=torch.bool, device=self.device)
            if deep is not None:
                mask = deep[0]
                feats = [d if feats is None else torch.cat([feats[i], d]) for i, d in enumerate(deep[1])]
            masks.append(mask)
            offset += n
        embeds = torch.cat(parts)
        deepstack = (torch.cat(masks), feats) if feats is not None else None
        return embeds, deepstack

    def _embed_prompt_part(self, req: Request, ids: torch.Tensor, start: int, n: int):
        """Embeddings of tokens start..start+n-1 of a multimodal request (its media scattered in)."""
        prompt_len = len(req.prompt_ids)
        if start == 0 and n == prompt_len:
            return self.thinker.embed(ids, req.mm)
        # a chunk or a suffix after a cached prefix: the rest of the prompt is embedded once (the
        # encoders see only the media it needs) and kept until the prompt is done
        rest = self._mm_embeds.get(req.request_id)
        if rest is None or rest[0] > start:  # none yet, or a recompute from further back
            rest = self._mm_embeds[req.request_id] = self._embed_prompt_rest(req, start)
        lo, full, deep = rest
        end = min(start + n, prompt_len)
        e = full[start - lo : end - lo]
        if end < start + n:  # generated tokens after the prompt (recompute after preemption)
            e = torch.cat([e, self.thinker.embed(ids[end - start :])[0]])
        if deep is None:
            return e, None
        mask = torch.zeros(n, dtype=torch.bool, device=self.device)
        mask[: end - start] = deep[0][start - lo : end - lo]
        first = int(deep[0][: start - lo].sum())
        count = int(mask.sum())
        if count == 0:
            return e, None
        return e, (mask, [f[first : first + count] for f in deep[1]])

    def _embed_prompt_rest(self, req: Request, start: int):
        """(lo, embeddings of prompt tokens lo.., deepstack of those or None) for computing the
        prompt from `start` on: only the media items with placeholders at or after `start` are
        encoded (those wholly inside a cached prefix are not), and lo <= start is where the first of
        them begins, so each is scattered whole. Without per-item digests: all of it, from 0."""
        items = req.media_items
        owner = item_of_token(req.prompt_ids, items) if items else None
        lo, mm = 0, req.mm
        if owner is not None:
            lo, keep = items_from(owner, start)
            if len(keep) < len(items):
                mm = select_items(req.mm, items, keep)
        prompt = torch.tensor(req.prompt_ids[lo:], device=self.device)
        return (lo, *self.thinker.embed(prompt, mm))

    def _restore_hidden(self, batch: Batch) -> None:
        """Hidden states of a reused prefix for requests that speak (the talker reads every prompt
        position; a cached prefix is not recomputed). Tokens kept..start-1 of a prefill row: layer
        0 is the token embedding (what the talker reads of it, at text positions; at media
        placeholders it holds the placeholder's embedding, which the talker never reads), the
        captured layer comes from the pool's side tensor, read now while the request holds the
        blocks. Only prefill rows can start past what was kept: admission adds one."""
        if self.pool.hidden is None:
            return
        for req, start, _, prefill in zip(batch.requests, batch.starts, batch.new_lens, batch.prefill):
            if not prefill or req.capture is None:
                continue
            kept = captured_tokens(req)
            if kept >= start:
                continue
            for layer in req.capture:
                if layer == 0:
                    ids = torch.tensor(token_slice(req, kept, start), dtype=torch.long, device=self.device)
                    rows = self.thinker.embed(ids)[0]
                else:
                    rows = self.pool.gather_hidden(req, kept, start)
                req.capture[layer].append(rows)

    def _keep_hidden(self, batch: Batch, captured: dict[int, torch.Tensor]) -> None:
        offset = 0
        for req, start, n, _ in batch.rows:
            if req.capture is not None:
                # rows already kept (a recompute after preemption repeats them) are skipped
                skip = min(n, max(0, captured_tokens(req) - start))
                for layer in req.capture:
                    if skip < n:
                        req.capture[layer].append(captured[layer][offset + skip : offset + n])
            offset += n

    def _make_pool(self):
        cfg = self.config
        if cfg.kv_backend == "contiguous":
            return ContiguousPool()
        if cfg.kv_backend != "paged":
            raise ValueError(f"kv_backend must be 'contiguous' or 'paged', not {cfg.kv_backend!r}")
        text = self.thinker.cfg.text_config
        dtype = next(self.thinker.parameters()).dtype
        head_dim = text.get("head_dim") or text.hidden_size // text.num_attention_heads
        # the talker's hidden states of cached prefixes (kv_cache.py): only with prefix reuse
        hidden_size = text.hidden_size if self.capture_layer is not None and cfg.enable_prefix_caching else 0
        num_blocks = plan_num_blocks(cfg, text, dtype, self.device, self.max_model_len, profile=self._profile_prefill,
                                     hidden_size=hidden_size)
        t = self.thinker.cfg
        return PagedPool(
            text.num_hidden_layers, num_blocks, cfg.block_size, text.num_key_value_heads, head_dim, dtype,
            self.device, cfg.enable_prefix_caching,
            placeholder_ids=frozenset(t.get(k) for k in ("audio_token_id", "image_token_id", "video_token_id") if t.get(k) is not None),
            decode_attention=cfg.decode_attention, hidden_size=hidden_size, hidden_layer=self.capture_layer,
        )

    def _make_decode_graphs(self) -> DecodeGraphs | None:
        cfg = self.config
        use = cfg.cuda_graphs
        if use is None:
            use = (self.device.type == "cuda" and cfg.kv_backend == "paged" and cfg.moe_kernel == "triton"
                   and self.pool.decode_fn is pa.paged_attention)
        if not use:
            return None
        if cfg.kv_backend != "paged":
            raise ValueError("cuda_graphs needs kv_backend='paged'")
        capture = tuple(sorted({0, self.capture_layer})) if self.capture_layer is not None else ()
        graphs = DecodeGraphs(self.thinker, self.pool, cfg.max_graph_batch or cfg.max_num_seqs, self.max_model_len, capture)
        graphs.capture_all()
        return graphs

    def _make_prefill_graphs(self) -> PrefillGraphs | None:
        cfg = self.config
        use = cfg.prefill_graphs
        if use is None:
            use = self.decode_graphs is not None and self.device.type == "cuda"
        if not use:
            return None
        capture = tuple(sorted({0, self.capture_layer})) if self.capture_layer is not None else ()
        graphs = PrefillGraphs(self.thinker.model, min(cfg.max_prefill_graph_tokens, cfg.max_prefill_tokens), capture)
        graphs.capture_all()
        return graphs

    # Prefill lengths that reach every fused-MoE tile config (kernels/fused_moe._pick_config) with
    # both of Triton's integer specialisations (multiple of 16 or not), and the decode GEMVs' row
    # counts (kernels/gemv.py: 1, 2, 3..4 and 5..8 rows compile apart)
    WARMUP_PREFILL_LENS = (1, 2, 3, 5, 16, 40, 64, 100, 160, 300, 512, 1000, 2048)

    @torch.inference_mode()
    def warm_up_kernels(self, lengths=WARMUP_PREFILL_LENS) -> None:
        """Compile the Triton kernels a prefill of each length needs now, not on a live request:
        a new tile config or specialisation costs ~1 s of JIT the first time it runs (a realtime
        turn whose prompt outgrew the earlier ones paid seconds)."""
        for n in lengths:
            self._dummy_prefill(n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _profile_prefill(self) -> None:
        """The activation peak to leave room for when sizing KV: a dummy text prefill of the
        largest step and a vision encoder pass of the most patches it takes at once, both while
        the embeddings of a whole multimodal prompt are held (a media prompt's are computed once
        and kept while its chunks prefill: `_mm_embeds`)."""
        visual = getattr(self.thinker, "visual", None)
        deepstack = len(visual.deepstack_visual_indexes) if visual is not None else 0
        held = self._prompt_embeddings(1 + deepstack)
        self._dummy_prefill(self.config.max_prefill_tokens)
        # while the media are encoded, the encoder's output and the token embeddings before the
        # scatter are there too (models/thinker.py: embed)
        during = self._prompt_embeddings(2)
        self._dummy_vision_pass()
        del held, during

    def _prompt_embeddings(self, rows_per_token: int) -> torch.Tensor:
        """A buffer of rows_per_token hidden-size rows for each of max_model_len tokens: what
        `_mm_embeds` holds at most for one request is 1 + deepstack layers of them (its
        embeddings, and the deepstack features of as many visual tokens)."""
        text = self.thinker.cfg.text_config
        dtype = next(self.thinker.parameters()).dtype
        return torch.empty(self.max_model_len, rows_per_token * text.hidden_size, dtype=dtype, device=self.device)

    def _dummy_vision_pass(self) -> None:
        """The vision encoder over zero pixels of square frames filling one pass (vision_max_patches)."""
        visual = getattr(self.thinker, "visual", None)
        most = self.config.vision_max_patches
        if visual is None or not most:
            return
        merge = visual.spatial_merge_size
        side = max(merge, int(most**0.5) // merge * merge)  # a frame of side x side patches
        frames = max(1, most // (side * side))
        dtype = next(visual.parameters()).dtype
        pixels = torch.zeros(frames * side * side, visual.patch_embed.patch_dim, dtype=dtype, device=self.device)
        visual(pixels, torch.tensor([[frames, side, side]]))

    def _dummy_prefill(self, n: int) -> None:
        """A text prefill of n (at most max_model_len) zero ids outside the KV cache, logits of the last."""
        n = min(n, self.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)[None].expand(3, -1)
        hidden, _ = self.thinker(self.thinker.embed(ids)[0], positions, ContiguousKV([SequenceKV()], [n]))
        self.thinker.logits(hidden[-1:])

    @staticmethod
    def _out_of_memory_culprit(batch: Batch) -> Request | None:
        """The request to refuse when a step runs out of accelerator memory: its largest prompt
        part (one with media first: the encoders run on it). None for a decode-only step, which
        has no request to blame (its buffers are fixed): that stays fatal. The step committed
        nothing, so the batch's other requests run it again next time."""
        prompt_rows = [row for row in batch.rows if row[1] < len(row[0].prompt_ids)]
        if not prompt_rows:
            return None
        return max(prompt_rows, key=lambda row: (row[0].mm is not None, row[2]))[0]

    def _refuse_out_of_memory(self, req: Request) -> list[StepOutput]:
        """Finish `req` with reason "error" and an OutOfMemoryError saying what to do; its blocks
        and embeddings are freed, the allocator's cached blocks given back."""
        self.scheduler.remove(req.request_id)  # frees its KV blocks
        free = ""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free = f" ({torch.cuda.mem_get_info(self.device)[0] / 2**30:.1f} GiB free now)"
        log.warning("request %s ran out of accelerator memory in its prefill; refused", req.request_id)
        req.error = OutOfMemoryError(
            f"the request needs more accelerator memory than the server has free{free}: send shorter or "
            "fewer media (fewer video frames, a lower resolution) or a shorter prompt", param="messages")
        self._finish(req, "error")
        return [StepOutput(req, None, True)]

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.kv = None  # its keys and values (the pool freed its blocks)
        self._mm_embeds.pop(req.request_id, None)
