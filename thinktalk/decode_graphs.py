"""The thinker's decode step as CUDA graphs, one per padded batch size.

A decode step of the 30B MoE issues ~3,000 small kernels; launched from Python they cost ~100 ms
of host time against ~8 ms of GPU work (benchmarks/results/profile_decode_h200.txt). Replaying a
captured graph launches them all at once. A graph replays fixed tensors, so everything a step
varies lives in static buffers that each step overwrites before the replay:

    input_ids [B]      positions [3, B]      slot_mapping [B]  (where each new key/value goes,
                                                               and the talker's hidden state)
    block_tables [B, W]    context_lens [B]   (what each query attends to)

where B is the largest graph's batch and W the block-table width of a max_model_len sequence.
A batch of n decodes runs the graph of the smallest bucket >= n; rows n..bucket-1 are padding
that attends to, and writes into, a scratch block the block manager never hands out, so they can
never touch a real sequence's keys. The paged-attention kernel's split count is fixed per bucket
(its grid is part of the graph); splits beyond a short context write -inf and drop out.

Only decode-only steps replay (prefill chunks have data-dependent shapes and run eagerly), and
only with kernels that never synchronise with the host (the Triton fused MoE, the Triton paged
attention). Off CUDA the same static-buffer step runs eagerly, which is what the CPU tests check
against the reference path; on CUDA a capture failure falls back to eager with a warning.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .kernels import paged_attention as pa
from .scheduler import Batch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def buckets_up_to(max_batch: int) -> list[int]:
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class StaticDecodeAttention:
    """The `AttentionBackend` of a graphed decode step: views of the static buffers."""

    def __init__(self, pool, slot_mapping, block_tables, context_lens, num_splits: int | None):
        self.pool = pool
        self.slot_mapping, self.block_tables, self.context_lens = slot_mapping, block_tables, context_lens
        self.num_splits = num_splits

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache, slots = self.store_target(layer)
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
        return self.attend_stored(layer, q, scale)

    def store_target(self, layer: int):
        """(k_cache, v_cache [slots, Hkv, D], slot_mapping): where this step's new keys and values
        go; the layer's q/k kernel writes them there (kernels/rope.py), saving two copies a layer."""
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        return k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:]), self.slot_mapping

    def attend_stored(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the new tokens once their keys and values are in the cache."""
        return self.pool.decode_fn(q, self.pool.k[layer], self.pool.v[layer], self.block_tables, self.context_lens,
                                   scale, num_splits=self.num_splits)


class DecodeGraphs:
    def __init__(self, thinker, pool, max_batch: int, max_model_len: int, capture_layers: tuple[int, ...] = ()):
        self.thinker, self.pool = thinker, pool
        self.device = pool.k[0].device
        self.use_graphs = self.device.type == "cuda"
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = max_batch
        self.capture_layers = capture_layers
        bs = pool.block_size
        width = -(-max_model_len // bs)
        dev = self.device
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        # float: a video's rope_delta can be fractional (the rotary table takes floats anyway)
        self.positions = torch.zeros(3, max_batch, dtype=torch.float32, device=dev)
        self.slot_mapping = torch.full((max_batch,), pool.scratch_block * bs, dtype=torch.long, device=dev)
        self.block_tables = torch.full((max_batch, width), pool.scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        # host staging (pinned on CUDA so the copies are asynchronous)
        pin = self.use_graphs
        self._rows = torch.zeros(3, max_batch, dtype=torch.long, pin_memory=pin)  # ids, slot, context len
        self._pos = torch.zeros(3, max_batch, dtype=torch.float32, pin_memory=pin)
        self._tables = torch.zeros(max_batch, width, dtype=torch.int32, pin_memory=pin)
        self._rows_np, self._pos_np, self._tables_np = self._rows.numpy(), self._pos.numpy(), self._tables.numpy()
        # which request's block table each staging row holds, and how many entries of it: a
        # request keeps its row from step to step, so only its newest entries are written
        kv_heads = pool.k[0].shape[2]
        self.num_splits = {
            b: (pa._num_splits(b, kv_heads, max_model_len, 64, dev) if self.use_graphs else None) for b in self.buckets
        }
        self._row_owner: list[tuple[object, int]] = [(None, 0)] * max_batch
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]] = {}
        self.mempool = None
        self.steps = 0  # decode steps run through the static buffers (graphed or not)

    # -- the step ---------------------------------------------------------------------------------
    def supports(self, batch: Batch) -> bool:
        return not any(batch.prefill) and len(batch.requests) <= self.max_batch

    def run(self, batch: Batch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [n, V] (float32) of a decode-only batch and the captured hidden states [n, H]."""
        n = len(batch.requests)
        bucket = next(b for b in self.buckets if b >= n)
        self._fill(batch, bucket)
        self.steps += 1
        if self.use_graphs and bucket not in self.graphs:
            self._capture(bucket)
        if bucket in self.graphs:
            graph, logits, captured = self.graphs[bucket]
            graph.replay()
        else:
            logits, captured = self._forward(bucket)
        return logits[:n], {layer: h[:n].clone() for layer, h in captured.items()}

    def _fill(self, batch: Batch, bucket: int) -> None:
        """Write the batch into the static buffers; rows past the batch become padding."""
        n = len(batch.requests)
        bs = self.pool.block_size
        rows, pos, tables = self._rows_np, self._pos_np, self._tables_np
        rows[0, :n] = batch.input_ids.numpy()
        pos[:, :n] = batch.positions.numpy()
        width = 1
        for i, (req, start) in enumerate(zip(batch.requests, batch.starts)):
            table = req.kv.block_table
            used = start // bs + 1
            owner, written = self._row_owner[i]
            if owner is not req.kv or written > used:
                written = 0
            tables[i, written:used] = table[written:used]
            self._row_owner[i] = (req.kv, used)
            rows[1, i] = table[start // bs] * bs + start % bs
            rows[2, i] = start + 1
            width = max(width, used)
        self._stage_padding(n, bucket)
        self._upload(bucket, width)

    def _stage_padding(self, first: int, bucket: int) -> None:
        """Staging rows first..bucket-1 become padding: token 0 at position 0, writing and reading
        the scratch block."""
        scratch, bs = self.pool.scratch_block, self.pool.block_size
        self._rows_np[0, first:bucket] = 0
        self._pos_np[:, first:bucket] = 0
        self._rows_np[1, first:bucket] = scratch * bs
        self._rows_np[2, first:bucket] = 1
        self._tables_np[first:bucket, 0] = scratch
        for i in range(first, bucket):
            self._row_owner[i] = (None, 0)

    def _upload(self, bucket: int, width: int) -> None:
        """Copy the staging rows of the bucket (block tables up to `width` entries) to the device."""
        nb = self.use_graphs
        self.input_ids[:bucket].copy_(self._rows[0, :bucket], non_blocking=nb)
        self.positions[:, :bucket].copy_(self._pos[:, :bucket], non_blocking=nb)
        self.slot_mapping[:bucket].copy_(self._rows[1, :bucket], non_blocking=nb)
        self.context_lens[:bucket].copy_(self._rows[2, :bucket], non_blocking=nb)
        self.block_tables[:bucket, :width].copy_(self._tables[:bucket, :width], non_blocking=nb)

    def _forward(self, bucket: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        kv = StaticDecodeAttention(self.pool, self.slot_mapping[:bucket], self.block_tables[:bucket],
                                   self.context_lens[:bucket], self.num_splits[bucket])
        embeds = self.thinker.embed(self.input_ids[:bucket])[0]
        hidden, captured = self.thinker(embeds, self.positions[:, :bucket], kv, None, self.capture_layers)
        if self.pool.hidden is not None:  # the talker's layer, kept for prefix reuse (kv_cache.py)
            self.pool.store_hidden(self.slot_mapping[:bucket], captured)
        return self.thinker.logits(hidden).float(), captured

    # -- capture ----------------------------------------------------------------------------------
    def capture_all(self) -> None:
        """Capture every bucket, largest first (its memory pool then serves the smaller ones)."""
        if not self.use_graphs:
            return
        for bucket in sorted(self.buckets, reverse=True):
            self._stage_padding(0, bucket)  # every row writes and reads the scratch block only
            self._upload(bucket, 1)
            self._capture(bucket)

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        # The buffers hold the current batch (or padding); warm-up and capture only write to the
        # slots they name, which are the very slots the replay writes next anyway.
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile Triton kernels, pick cuBLAS algorithms
                    self._forward(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                logits, captured = self._forward(bucket)
            self.graphs[bucket] = (graph, logits, captured)
        except Exception as exc:  # a kernel that syncs with the host cannot be captured
            log.warning("decode CUDA graph for batch %d not captured (%s); running it eagerly", bucket, exc)
            self.use_graphs = False
            torch.cuda.synchronize(self.device)
