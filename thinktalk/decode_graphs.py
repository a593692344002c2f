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

import torch

from .kernels import paged_attention as pa
from .scheduler import Batch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def warm_and_capture(body, pool=None, device=None, warmups: int = 2):
    """Run `body` a few times on a side stream (compiling Triton kernels, picking cuBLAS
    algorithms), then capture it into a CUDA graph (in memory pool `pool`); (graph, its outputs)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = body()
    return graph, out


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


class PagedDecodeBuffers:
    """What a paged decode step reads from static buffers, shared by the thinker's `DecodeGraphs`
    and the talker's `speech_graphs.TalkerDecodeSteps` (they differ in their inputs and outputs):

        positions [3, B]   slot_mapping [B]   block_tables [B, W]   context_lens [B]

    staged on the host (pinned on CUDA, so the uploads are asynchronous), with the rows past a
    batch made padding on the scratch block, the paged-attention split count fixed per bucket,
    and `_replay` running a bucket's graph (captured on first use) or its forward eagerly.
    A subclass stages its own inputs and defines `_forward(bucket)` (a tuple of outputs) and
    `_capture(bucket)` (storing `(graph, *outputs)` in `self.graphs`)."""

    def __init__(self, pool, max_batch: int, width: int, max_context: int):
        """width: the block-table entries one sequence may use; max_context: the longest context
        (what fixes each bucket's split count)."""
        self.pool = pool
        self.device = dev = pool.k[0].device
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = max_batch
        bs, scratch = pool.block_size, pool.scratch_block
        # float: a video's rope_delta can be fractional (the rotary table takes floats anyway)
        self.positions = torch.zeros(3, max_batch, dtype=torch.float32, device=dev)
        self.slot_mapping = torch.full((max_batch,), scratch * bs, dtype=torch.long, device=dev)
        self.block_tables = torch.full((max_batch, width), scratch, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self._rows = torch.zeros(2, max_batch, dtype=torch.long, pin_memory=pin)  # slot, context len
        self._pos = torch.zeros(3, max_batch, dtype=torch.float32, pin_memory=pin)
        self._tables = torch.zeros(max_batch, width, dtype=torch.int32, pin_memory=pin)
        self._rows_np, self._pos_np, self._tables_np = self._rows.numpy(), self._pos.numpy(), self._tables.numpy()
        # which sequence's block table each staging row holds, and how many entries of it: a
        # sequence keeps its row from step to step, so only its newest entries are written
        self._row_owner: list[tuple[object, int]] = [(None, 0)] * max_batch
        # the uploads out of the pinned staging buffers run asynchronously: the next step may not
        # overwrite them before they have (with the engine's overlapped steps the host stages step
        # k+1 while step k may still wait behind step k-1 on the GPU)
        self._uploaded: torch.cuda.Event | None = None
        kv_heads = pool.k[0].shape[2]
        fixed = dev.type == "cuda" and pa.available(dev)  # the grid is part of the graph
        self.num_splits = {b: (pa._num_splits(b, kv_heads, max_context, 64, dev) if fixed else None) for b in self.buckets}
        self.graphs: dict[int, tuple] = {}
        self.mempool = None
        self.steps = 0  # decode steps run through the static buffers (graphed or not)

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def _stage_rows(self, seqs, starts, positions, bucket: int) -> None:
        """Stage and upload one decode token per sequence (`SeqBlocks`; the token at index start,
        position column `positions[:, i]`); rows past them become padding."""
        n = len(seqs)
        bs = self.pool.block_size
        self._wait_staging()
        rows, tables = self._rows_np, self._tables_np
        self._pos_np[:, :n] = positions
        width = 1
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            table = seq.block_table
            used = start // bs + 1
            owner, written = self._row_owner[i]
            if owner is not seq or written > used:
                written = 0
            tables[i, written:used] = table[written:used]
            self._row_owner[i] = (seq, used)
            rows[0, i] = table[start // bs] * bs + start % bs
            rows[1, i] = start + 1
            width = max(width, used)
        self._stage_padding(n, bucket)
        self._upload(bucket, width)

    def _stage_padding(self, first: int, bucket: int) -> None:
        """Staging rows first..bucket-1 become padding: position 0, writing and reading the
        scratch block."""
        scratch, bs = self.pool.scratch_block, self.pool.block_size
        self._wait_staging()
        self._pos_np[:, first:bucket] = 0
        self._rows_np[0, first:bucket] = scratch * bs
        self._rows_np[1, first:bucket] = 1
        self._tables_np[first:bucket, 0] = scratch
        for i in range(first, bucket):
            self._row_owner[i] = (None, 0)

    def _upload(self, bucket: int, width: int) -> None:
        """Copy the staging rows of the bucket (block tables up to `width` entries) to the device."""
        nb = self.device.type == "cuda"
        self.positions[:, :bucket].copy_(self._pos[:, :bucket], non_blocking=nb)
        self.slot_mapping[:bucket].copy_(self._rows[0, :bucket], non_blocking=nb)
        self.context_lens[:bucket].copy_(self._rows[1, :bucket], non_blocking=nb)
        self.block_tables[:bucket, :width].copy_(self._tables[:bucket, :width], non_blocking=nb)
        if nb:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    def _wait_staging(self) -> None:
        """Block until the last uploads out of the staging buffers have run (a no-op unless
        the GPU is still behind them)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def _attention(self, bucket: int) -> StaticDecodeAttention:
        return StaticDecodeAttention(self.pool, self.slot_mapping[:bucket], self.block_tables[:bucket],
                                     self.context_lens[:bucket], self.num_splits[bucket])

    def _replay(self, bucket: int) -> tuple:
        """The bucket's outputs for what is staged: its graph replayed (captured first if needed)
        or, without graphs, its forward run eagerly."""
        self.steps += 1
        if self.use_graphs and bucket not in self.graphs:
            self._capture(bucket)
        if bucket in self.graphs:
            graph, *outputs = self.graphs[bucket]
            graph.replay()
            return tuple(outputs)
        return self._forward(bucket)

    def _capture_padded(self, bucket: int) -> None:
        """Capture a bucket at start-up: every row is padding, so the warm-up and capture runs
        write and read the scratch block only."""
        self._stage_padding(0, bucket)
        self._upload(bucket, 1)
        self._capture(bucket)


class DecodeGraphs(PagedDecodeBuffers):
    def __init__(self, thinker, pool, max_batch: int, max_model_len: int, capture_layers: tuple[int, ...] = ()):
        super().__init__(pool, max_batch, -(-max_model_len // pool.block_size), max_model_len)
        self.thinker = thinker
        self.use_graphs = self.device.type == "cuda"
        self.capture_layers = capture_layers
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._ids = torch.zeros(max_batch, dtype=torch.long, pin_memory=self.use_graphs)
        self._ids_np = self._ids.numpy()

    # -- the step ---------------------------------------------------------------------------------
    def supports(self, batch: Batch) -> bool:
        return not any(batch.prefill) and len(batch.requests) <= self.max_batch

    def run(self, batch: Batch, device_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [n, V] (float32) of a decode-only batch and the captured hidden states [n, H].
        device_ids: the batch's input ids as a device tensor [n] (tokens the previous step sampled
        that the host has not seen yet), instead of `batch.input_ids`."""
        n = len(batch.requests)
        bucket = self.bucket(n)
        self._fill(batch, bucket, device_ids)
        logits, captured = self._replay(bucket)
        return logits[:n], {layer: h[:n].clone() for layer, h in captured.items()}

    def _fill(self, batch: Batch, bucket: int, device_ids: torch.Tensor | None = None) -> None:
        """Write the batch into the static buffers; rows past the batch become padding (token 0)."""
        n = len(batch.requests)
        self._wait_staging()
        first = 0 if device_ids is None else n
        if device_ids is None:
            self._ids_np[:n] = batch.input_ids.numpy()
        self._ids_np[n:bucket] = 0
        self.input_ids[first:bucket].copy_(self._ids[first:bucket], non_blocking=self.use_graphs)
        if device_ids is not None:
            self.input_ids[:n].copy_(device_ids)
        self._stage_rows([r.kv for r in batch.requests], batch.starts, batch.positions.numpy(), bucket)

    def _forward(self, bucket: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        kv = self._attention(bucket)
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
            self._capture_padded(bucket)

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        # The buffers hold the current batch (or padding); warm-up and capture only write to the
        # slots they name, which are the very slots the replay writes next anyway.
        try:
            if self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()
            graph, (logits, captured) = warm_and_capture(lambda: self._forward(bucket), self.mempool, self.device)
            self.graphs[bucket] = (graph, logits, captured)
        except Exception as exc:  # a kernel that syncs with the host cannot be captured
            log.warning("decode CUDA graph for batch %d not captured (%s); running it eagerly", bucket, exc)
            self.use_graphs = False
            torch.cuda.synchronize(self.device)
