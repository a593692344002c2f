"""Where the thinker's keys and values live: the KV pools behind the scheduler and the attention.

A pool places each admitted request's KV (`Request.kv`), says how many of its tokens are already
computed, grows it, frees it, and builds the per-step `AttentionBackend` the model's attention
layers call. Two pools share that interface:

- `ContiguousPool`: the reference path, one growing tensor per request and layer
  (`layers.attention.ContiguousKV`); never full.
- `PagedPool`: one [num_blocks, block_size, kv_heads, head_dim] K and V tensor per layer, shared
  out in blocks by `block_manager.BlockManager` (admission bounded by free blocks, prefix reuse).
  Its backend, `PagedAttention`, writes the step's new keys/values into their slots, then runs
  prefill chunks through SDPA (only the uncached suffix is computed; the reused prefix is read
  from the cache) and all decode tokens through one paged-attention call: the Triton kernel on
  CUDA, its torch reference elsewhere (see kernels/paged_attention.py).

Hidden states for the talker: a request that speaks needs, for every prompt position, the
thinker's layer-0 embedding and its layer-`accept_hidden_layer` hidden state (speech.py), and
a prefix found in the cache is not recomputed. So when the engine captures a layer (a talker is
loaded) and prefix caching is on, the paged pool also holds `hidden` [num_blocks + 1, block_size,
H], aligned with the KV blocks: the engine writes that layer's output of every token it computes
into the token's slot (`store_hidden`; one index_copy per step, inside the decode CUDA graph too),
and a speaking request admitted with a cached prefix reads its rows back (`gather_hidden`) while
it holds the blocks. Layer 0 needs no such store: where the talker reads it (text positions) it is
the token embedding, recomputed from the ids. The side tensor costs hidden_size / (2 x layers x
kv_heads x head_dim) of the KV: 2,048 / 49,152 = 4% for the full model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .block_manager import BlockManager, SeqBlocks, block_hash, media_digest
from .kernels import paged_attention as pa
from .layers.attention import ContiguousKV, SequenceKV
from .multimodal.items import item_of_token
from .request import Request
from .scheduler import Batch, token_positions, token_slice

log = logging.getLogger(__name__)


class ContiguousPool:
    """Reference KV: a `SequenceKV` per request; unbounded."""

    block_manager = None
    hidden = None  # no prefix reuse, so no hidden states to give back

    def admit(self, req: Request, max_cached: int | None = None, keep_free: int = 0) -> bool:
        req.kv = SequenceKV()
        return True

    def num_computed(self, req: Request) -> int:
        return req.kv.length

    def reserve(self, req: Request, num_tokens: int) -> bool:
        return True

    def commit(self, req: Request, num_tokens: int) -> None:
        pass  # SequenceKV grows as the layers write it

    def free(self, req: Request) -> None:
        req.kv = None

    def backend(self, batch: Batch, device: torch.device) -> ContiguousKV:
        return ContiguousKV([r.kv for r in batch.requests], batch.new_lens)


@dataclass
class PagedSeq(SeqBlocks):
    # media of the prompt, mixed into the hash of each block holding its placeholders: the index
    # of the item each prompt token is a placeholder of (-1: none), and the items' digests
    media_owner: np.ndarray | None = None
    media_digests: list[bytes] = field(default_factory=list)


class PagedPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        enable_prefix_caching: bool = True,
        placeholder_ids: frozenset[int] = frozenset(),
        decode_attention: str = "auto",
        hidden_size: int = 0,
        hidden_layer: int | None = None,
    ):
        """hidden_size > 0 (with hidden_layer, the captured layer whose states it keeps): hold
        the side tensor of hidden states described in the module docstring."""
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.placeholder_ids = frozenset(placeholder_ids)
        # one block more than the manager hands out: the scratch block, where the padding rows of a
        # CUDA-graphed decode step write and read (decode_graphs.py), so they never touch a sequence
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.hidden_layer = hidden_layer if hidden_size else None
        self.hidden = torch.zeros(num_blocks + 1, block_size, hidden_size, dtype=dtype, device=device) if hidden_size else None
        if decode_attention not in ("auto", "triton", "torch"):
            raise ValueError(f"decode_attention must be auto, triton or torch, not {decode_attention!r}")
        use_triton = decode_attention == "triton" or (decode_attention == "auto" and torch.device(device).type == "cuda")
        if use_triton and not pa.available(device):
            raise RuntimeError("decode_attention='triton' needs CUDA (or TRITON_INTERPRET=1) and triton")
        self.decode_fn = pa.paged_attention if use_triton else pa.paged_attention_reference

    # -- the pool interface -----------------------------------------------------------------------
    def admit(self, req: Request, max_cached: int | None = None, keep_free: int = 0) -> bool:
        """Blocks for all of the request's tokens, reusing its longest cached prefix; False: no room."""
        bm, bs = self.block_manager, self.block_size
        seq = PagedSeq()
        if req.mm is not None and bm.enable_prefix_caching:
            self._index_media(req, seq)
        n = req.num_tokens
        limit = (n - 1) // bs  # the last token is always computed: its logits are needed
        if max_cached is not None:
            limit = min(limit, max_cached // bs)
        hashes: list[bytes] = []
        while bm.enable_prefix_caching and len(hashes) < limit:
            h = self._hash(req, seq, len(hashes), hashes[-1] if hashes else None)
            if h not in bm.cached:
                break
            hashes.append(h)
        cached = bm.match_prefix(hashes)
        if not bm.can_allocate(n, cached, keep_free=keep_free):
            return False
        bm.allocate(seq, n, cached, hashes)
        req.kv = seq
        return True

    def num_computed(self, req: Request) -> int:
        return req.kv.num_computed

    def reserve(self, req: Request, num_tokens: int) -> bool:
        return self.block_manager.append(req.kv, num_tokens)

    def commit(self, req: Request, num_tokens: int) -> None:
        seq = req.kv
        self.block_manager.commit(seq, num_tokens, lambda i, prev: self._hash(req, seq, i, prev))

    def free(self, req: Request) -> None:
        if isinstance(req.kv, SeqBlocks):
            self.block_manager.free_seq(req.kv)
        req.kv = None

    def backend(self, batch: Batch, device: torch.device) -> "PagedAttention":
        return PagedAttention(self, batch, device)

    # -- hidden states for the talker ---------------------------------------------------------------
    def store_hidden(self, slot_mapping: torch.Tensor, captured: dict[int, torch.Tensor]) -> None:
        """Write the kept layer's hidden states of a step's tokens [N, H] into their slots [N]."""
        if self.hidden is not None:
            flat = self.hidden.view(-1, self.hidden.shape[-1])
            flat.index_copy_(0, slot_mapping, captured[self.hidden_layer].to(flat.dtype))

    def gather_hidden(self, req: Request, start: int, end: int) -> torch.Tensor:
        """The kept layer's hidden states [end - start, H] of tokens start..end-1 of a request that
        holds their blocks (read at admission: a block given back may be handed out again)."""
        assert end <= req.kv.num_computed, "only computed tokens have hidden states"
        slots = _slots(req.kv.block_table, start, end, self.block_size).to(self.hidden.device)
        return self.hidden.view(-1, self.hidden.shape[-1])[slots]

    # -- helpers ------------------------------------------------------------------------------
    def _index_media(self, req: Request, seq: PagedSeq) -> None:
        """Which media item each prompt token is a placeholder of, from `req.media_items` (one digest
        per item, computed when the request was made). A request without them, or whose prompt does
        not match them, gets one digest of all its media for every placeholder (no reuse across
        different media, nor of earlier items when one is added)."""
        items = req.media_items or []
        owner = item_of_token(req.prompt_ids, items) if items else None
        if owner is not None:
            seq.media_owner, seq.media_digests = owner, [it.digest for it in items]
            return
        ids = np.asarray(req.prompt_ids, dtype=np.int64)
        seq.media_owner = np.where(np.isin(ids, list(self.placeholder_ids)), 0, -1)
        seq.media_digests = [media_digest(vars(req.mm).values())]

    def _hash(self, req: Request, seq: PagedSeq, index: int, prev: bytes | None) -> bytes:
        start, end = index * self.block_size, (index + 1) * self.block_size
        ids = token_slice(req, start, end)
        extra = None
        if seq.media_owner is not None:
            owners = seq.media_owner[start:end]  # prompt tokens only: generated ones carry no media
            owners = np.unique(owners[owners >= 0])
            if owners.size:
                extra = b"".join(seq.media_digests[i] for i in owners)
        return block_hash(prev, ids, token_positions(req, start, end).numpy(), extra)


def _slots(table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of tokens start..end-1 of one sequence."""
    t = torch.arange(start, end)
    return torch.tensor(table, dtype=torch.long)[t // block_size] * block_size + t % block_size


class PagedAttention:
    """The paged `AttentionBackend` of one step; the batch holds prefill chunks first, then decodes."""

    def __init__(self, pool: PagedPool, batch: Batch, device: torch.device):
        self.pool = pool
        bs = pool.block_size
        new_slots, prefill_ctx, self.prefills = [], [], []
        dec_tables, dec_lens = [], []
        offset = 0
        for req, start, n, is_prefill in zip(batch.requests, batch.starts, batch.new_lens, batch.prefill):
            table = req.kv.block_table
            new_slots.append(_slots(table, start, start + n, bs))
            if is_prefill:  # prefill chunk: attend with SDPA
                # a chunk starting at 0 attends to its own new keys; later chunks read the context
                if start > 0:
                    prefill_ctx.append(_slots(table, 0, start + n, bs))
                self.prefills.append((offset, offset + n, start > 0))
            else:
                assert n == 1, "a decode computes one token"
                dec_tables.append(table)
                dec_lens.append(start + 1)
            offset += n
        self.num_decode = len(dec_lens)
        self.decode_start = offset - self.num_decode
        assert all(end <= self.decode_start for _, end, _ in self.prefills), "prefills must precede decodes"
        # one host-to-device copy for all slot indices
        sizes = [s.numel() for s in new_slots] + [s.numel() for s in prefill_ctx]
        flat = torch.cat(new_slots + prefill_ctx).to(device, non_blocking=True)
        parts = list(torch.split(flat, sizes))
        self.slot_mapping = torch.cat(parts[: len(new_slots)])
        ctx = iter(parts[len(new_slots):])
        self.prefills = [(a, b, next(ctx) if has_ctx else None) for a, b, has_ctx in self.prefills]
        if self.num_decode:
            width = max(len(t) for t in dec_tables)
            tables = torch.zeros(self.num_decode, width, dtype=torch.int32)
            for i, t in enumerate(dec_tables):
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
            self.block_tables = tables.to(device, non_blocking=True)
            self.context_lens = torch.tensor(dec_lens, dtype=torch.int32).to(device, non_blocking=True)
            self.max_context_len = max(dec_lens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        flat_k.index_copy_(0, self.slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, self.slot_mapping, v.to(flat_v.dtype))
        out = torch.empty_like(q)
        for start, end, ctx in self.prefills:
            if ctx is None:  # the whole context is this chunk
                out[start:end] = pa.prefill_attention(q[start:end], k[start:end], v[start:end], scale)
            else:  # cached prefix or earlier chunks: read the context back from the cache
                out[start:end] = pa.prefill_attention(q[start:end], flat_k[ctx], flat_v[ctx], scale)
        if self.num_decode:
            d = self.decode_start
            out[d:] = self.pool.decode_fn(
                q[d:], k_cache, v_cache, self.block_tables, self.context_lens, scale,
                max_context_len=self.max_context_len,
            )
        return out


# -- sizing ---------------------------------------------------------------------------------------
def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, hidden_size: int = 0
) -> int:
    """Keys and values of one block, plus its rows of the hidden-state side tensor when hidden_size > 0."""
    return (2 * num_layers * num_kv_heads * head_dim + hidden_size) * block_size * torch.empty((), dtype=dtype).element_size()


def plan_num_blocks(
    config, text_cfg, dtype: torch.dtype, device: torch.device, max_model_len: int, profile=None, hidden_size: int = 0
) -> int:
    """How many blocks the paged cache gets.

    config.num_kv_blocks if set. On CUDA: what is left of gpu_memory_utilization x total memory
    after the weights (already loaded) and the activation peak of `profile()` (a dummy prefill of
    max_prefill_tokens, run by the engine). Elsewhere: cpu_kv_cache_gib. Never more than
    max_num_seqs full-length requests need. hidden_size > 0: each block also holds that many
    values per token of the hidden-state side tensor (`PagedPool.hidden`).
    """
    if config.num_kv_blocks:
        return int(config.num_kv_blocks)
    head_dim = text_cfg.get("head_dim") or text_cfg.hidden_size // text_cfg.num_attention_heads
    per_block = bytes_per_block(text_cfg.num_hidden_layers, config.block_size, text_cfg.num_key_value_heads, head_dim, dtype,
                                hidden_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        if profile is not None:
            profile()
        peak = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = total * config.gpu_memory_utilization - (total - free) - peak
        source = f"{config.gpu_memory_utilization:.0%} of {total / 2**30:.1f} GiB, activations {peak / 2**30:.2f} GiB"
    else:
        budget = config.cpu_kv_cache_gib * 2**30
        source = f"cpu_kv_cache_gib={config.cpu_kv_cache_gib}"
    blocks = int(budget // per_block)
    most = -(-config.max_num_seqs * max_model_len // config.block_size)  # more could never be used
    blocks = min(blocks, most)
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache ({source}); lower max_prefill_tokens or raise the budget")
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB; %s)", blocks, config.block_size, blocks * per_block / 2**30, source)
    return blocks
