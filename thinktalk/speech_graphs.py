"""Static-shape speech backends for the GPU: the talker's KV paged like the thinker's, its decode
step and each frame's code-predictor loop as CUDA graphs per batch-size bucket.

* `PagedTalker` keeps every speaking request's talker KV in a `kv_cache.PagedPool` (per layer one
  K and one V tensor [num_blocks + 1, block_size, kv_heads, head_dim], the extra one being the
  scratch block), shared out by `block_manager.BlockManager` without prefix caching (a talker
  prompt is its request's own). The stage takes a request's blocks as it grows: its prompt's at
  admission (admission is bounded by free blocks), then one more whenever a decode token starts
  a new block; all of them go back at once when it finishes or is cancelled. Memory is what the
  pool was given, whatever the number of requests: 20 KiB per token for the full talker in bf16
  (2 x 20 layers x 2 kv heads x 128 x 2 bytes), 40 MiB per 2,048 tokens; by default 2,048 tokens
  per request allowed to speak at once, at least 8,192 (`plan_talker_blocks`).
  Prefills run eagerly through the thinker's `PagedAttention` (packed, causal over the prompt,
  written into the request's blocks). Decode steps run through `TalkerDecodeSteps`, the pattern
  of decode_graphs.py: persistent buffers (input embeddings, positions, slot mapping, block
  tables, context lengths) overwritten before each step, one CUDA graph per batch bucket replayed
  over them (captured once: no capacity to outgrow, nothing to re-capture); padding rows of a
  bucket write and read the scratch block; the paged-attention split count is fixed per bucket.
  Off CUDA the same buffers run eagerly (what the CPU tests compare with the reference backend).
  graphs=False (backend "paged") skips the buffers: prefill and decode rows go through one eager
  `PagedAttention` forward, like the thinker's eager step.
* `GraphPredictor` runs a frame's 15 code-predictor steps (`speech_stage.predict_frame_static`)
  as one CUDA graph per bucket and sampling mode (greedy / with noise), or eagerly (graphs=False,
  which is how the CPU tests exercise the graph body).

Graph capture needs a talker MoE without host synchronisation: with graphs=True the talker's
MoE and layers take the fused Triton kernels (`engine.use_triton_kernels`, as the engine does on CUDA).
Per-step inputs reach the device from pinned host memory (no synchronising pageable copies).
"""

from __future__ import annotations

import bisect
import logging

import torch

from .block_manager import SeqBlocks
from .decode_graphs import PagedDecodeBuffers, warm_and_capture
from .kernels import paged_attention as pa
from .kv_cache import PagedAttention, PagedPool, bytes_per_block
from .scheduler import Batch
from .speech_stage import ResidualPick, StaticFrameKV, predict_frame_static, predictor_positions, to_device

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_BLOCK_SIZE = 16
# the default pool: this many tokens per request allowed to speak at once (the old slot capacity),
# but shared, so one long answer may use what short ones leave; and never less than MIN_POOL_TOKENS,
# so that even a single-user setup speaks after a long prompt (every user turn's positions are in
# the talker's prompt): 160 MiB for the full talker in bf16
TOKENS_PER_REQUEST = 2048
MIN_POOL_TOKENS = 8192
DEFAULT_MAX_BATCH = 64  # graphed decode batch when the stage sets no max_active


def _head_dim(cfg) -> int:
    return cfg.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads


def bucket_for(n: int, buckets=BUCKETS) -> int | None:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


# -- sizing -------------------------------------------------------------------------------------
def talker_block_bytes(talker_cfg, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one talker KV block (K and V, every layer); talker_cfg: the checkpoint's talker_config."""
    text = talker_cfg.text_config
    return bytes_per_block(text.num_hidden_layers, block_size, text.num_key_value_heads, _head_dim(text), dtype)


def talker_kv_bytes(talker_cfg, num_blocks: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes the talker's pool allocates for `num_blocks` blocks (the scratch block included)."""
    return (num_blocks + 1) * talker_block_bytes(talker_cfg, block_size, dtype)


def plan_talker_blocks(talker_cfg, dtype: torch.dtype, *, block_size: int = DEFAULT_BLOCK_SIZE,
                       num_blocks: int | None = None, gib: float | None = None,
                       max_active: int | None = None) -> int:
    """Blocks of the talker's pool: `num_blocks` if given, else as many as `gib` GiB hold, else
    TOKENS_PER_REQUEST per request speaking at once (max_active, default DEFAULT_MAX_BATCH), at
    least MIN_POOL_TOKENS."""
    if num_blocks is not None:
        blocks = int(num_blocks)
    elif gib is not None:
        blocks = int(gib * 2**30 // talker_block_bytes(talker_cfg, block_size, dtype))
    else:
        tokens = max((max_active or DEFAULT_MAX_BATCH) * TOKENS_PER_REQUEST, MIN_POOL_TOKENS)
        blocks = -(-tokens // block_size)
    if blocks < 1:
        raise ValueError(f"the talker's KV pool needs at least one block (got {blocks}; num_blocks={num_blocks}, gib={gib})")
    return blocks


# -- the talker's decode step through static buffers ----------------------------------------------
class TalkerDecodeSteps(PagedDecodeBuffers):
    """One decode token per speaking request through persistent buffers, a CUDA graph per bucket.

    The talker's counterpart of decode_graphs.DecodeGraphs (the paged buffers, padding and
    replay are theirs, `PagedDecodeBuffers`): the inputs are embeddings (the last frame's summed
    codec embedding + trailing text), not token ids, and the outputs are the final hidden states
    (the code predictor reads them) and the first-codebook logits.

        embeds [B, H]   positions [3, B]   slot_mapping [B]   block_tables [B, W]   context_lens [B]

    W is the most blocks one request may hold (`PagedTalker.table_width`).
    """

    def __init__(self, talker, pool: PagedPool, max_batch: int, width: int, use_graphs: bool):
        super().__init__(pool, max_batch, width, width * pool.block_size)
        self.talker = talker
        self.use_graphs = use_graphs
        hidden = talker.cfg.text_config.hidden_size
        # padding rows keep whatever embeddings the buffer holds: any finite row will do
        self.embeds = torch.zeros(max_batch, hidden, dtype=pool.k[0].dtype, device=self.device)

    def run(self, seqs: list[SeqBlocks], embeds: torch.Tensor, positions: list[float]):
        """Hidden states [n, H] and logits [n, V] (float32) of one decode token per sequence; each
        sequence's blocks must already hold its new token (`num_computed` is where it goes)."""
        n = len(seqs)
        bucket = self.bucket(n)
        self._stage_rows(seqs, [seq.num_computed for seq in seqs], positions, bucket)
        self.embeds[:n].copy_(embeds.to(self.embeds.dtype))
        hidden, logits = self._replay(bucket)
        return hidden[:n], logits[:n]

    def _forward(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.talker(self.embeds[:bucket], self.positions[:, :bucket], self._attention(bucket))
        return hidden, self.talker.logits(hidden).float()

    # -- capture ----------------------------------------------------------------------------------
    def warm(self, rows: int) -> None:
        """Capture the graph that serves `rows` requests (start-up, nothing speaking): every row of
        the bucket is padding, so the warm-up and capture runs touch only the scratch block."""
        bucket = self.bucket(rows)
        if not self.use_graphs or bucket is None or bucket in self.graphs:
            return
        self._capture_padded(bucket)

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        # the buffers hold the current batch (or padding): warm-up and capture write only the slots
        # they name, which the replay of this very step writes next anyway
        try:
            if self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()
            graph, (hidden, logits) = warm_and_capture(lambda: self._forward(bucket), self.mempool, self.device)
            self.graphs[bucket] = (graph, hidden, logits)
        except Exception as exc:  # noqa: BLE001 - e.g. a talker MoE kernel that syncs: run eagerly
            log.warning("talker decode CUDA graph for batch %d not captured (%r); decoding eagerly", bucket, exc)
            self.use_graphs = False
            self.graphs = {}
            torch.cuda.synchronize(self.device)


# -- talker KV in blocks ------------------------------------------------------------------------
class PagedTalker:
    """Talker backend with paged KV (see the module docstring). The stage calls, per request:
    `fits` / `open` at admission, `reserve` before each forward that adds tokens, `close` at the end."""

    preemptible = True  # the stage may free a request's blocks and recompute them later

    def __init__(self, talker, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 max_batch: int = DEFAULT_MAX_BATCH, graphs: bool = True, decode_attention: str = "auto"):
        self.talker = talker
        text = talker.cfg.text_config
        self.device = talker.codec_head.weight.device
        self.dtype = talker.codec_head.weight.dtype
        triton_ok = pa.available(self.device) and self.device.type == "cuda"
        use_graphs = graphs and triton_ok
        if use_graphs:
            from .engine import use_triton_kernels

            # the folded norms were measured on the thinker only (its MoE has no shared expert,
            # so the talker's MoE would keep its norm anyway): the talker keeps the norm kernels
            use_triton_kernels(talker, moe=True, layers=True, fuse_norm_gemv=False)
        if decode_attention == "auto" and not triton_ok:
            decode_attention = "torch"  # e.g. CUDA without triton: the reference decode attention
        self.pool = PagedPool(text.num_hidden_layers, num_blocks, block_size, text.num_key_value_heads,
                              _head_dim(text), self.dtype, self.device, enable_prefix_caching=False,
                              decode_attention=decode_attention)
        self.block_manager = self.pool.block_manager
        self.block_size = block_size
        # the most blocks one request may hold: the whole pool, or what the talker's positions reach
        max_len = text.get("max_position_embeddings") or num_blocks * block_size
        self.table_width = min(num_blocks, -(-max_len // block_size))
        log.info("talker KV: %d blocks of %d tokens (%.0f MiB)", num_blocks, block_size,
                 talker_kv_bytes(talker.cfg, num_blocks, block_size, self.dtype) / 2**20)
        self.steps = TalkerDecodeSteps(talker, self.pool, max_batch, self.table_width, use_graphs) if graphs else None

    # -- blocks -----------------------------------------------------------------------------------
    def fits(self, num_tokens: int) -> bool:
        """Whether a request could ever hold num_tokens (the whole pool, at most `table_width` blocks)."""
        return self.block_manager.blocks_for(num_tokens) <= self.table_width

    def open(self, job, num_tokens: int, keep_free: int = 0) -> bool:
        """Blocks for the request's first num_tokens, leaving keep_free blocks free; False: no room."""
        if not self.block_manager.can_allocate(num_tokens, keep_free=keep_free):
            return False
        seq = SeqBlocks()
        self.block_manager.allocate(seq, num_tokens)
        job.kv = seq
        return True

    def reserve(self, job, num_tokens: int) -> bool:
        """Room for the request to hold num_tokens in all; False (nothing taken) when no block is free."""
        return self.block_manager.append(job.kv, num_tokens)

    def close(self, job) -> None:
        self.block_manager.free_seq(job.kv)
        job.kv = None

    def kv_tokens(self, job) -> int:
        return job.kv.num_computed

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, prefills, decode, dec_embeds, dec_positions):
        """prefills: (job, embeds [L, H], positions [3, L]) each, computed from position 0; decode:
        jobs taking one token each (dec_embeds [D, H], dec_positions: D floats).
        Returns (hidden [P + D, H], logits [P + D, V] float32) of each request's last new token."""
        static = self.steps is not None and decode and self.steps.bucket(len(decode)) is not None
        eager_decode = [] if static else decode
        hiddens, logits = [], []
        if prefills or eager_decode:
            h = self._eager(prefills, eager_decode, dec_embeds if eager_decode else None, dec_positions)
            hiddens.append(h)
            logits.append(self.talker.logits(h).float())
        if static:
            h, lg = self.steps.run([j.kv for j in decode], dec_embeds, dec_positions)
            hiddens.append(h)
            logits.append(lg)
        for job, embeds, _ in prefills:
            job.kv.num_computed = embeds.shape[0]
        for job in decode:
            job.kv.num_computed += 1
        return torch.cat(hiddens), torch.cat(logits)

    def _eager(self, prefills, decode, dec_embeds, dec_positions) -> torch.Tensor:
        """One packed forward through `PagedAttention`: prefills first, then decode rows."""
        jobs = [j for j, _, _ in prefills] + list(decode)
        new_lens = [e.shape[0] for _, e, _ in prefills] + [1] * len(decode)
        starts = [0] * len(prefills) + [j.kv.num_computed for j in decode]
        prefill = [True] * len(prefills) + [False] * len(decode)
        batch = Batch(jobs, starts, new_lens, prefill, [True] * len(jobs))
        embeds = [e.to(self.dtype) for _, e, _ in prefills]
        positions = [p.to(torch.float32) for _, _, p in prefills]
        if decode:
            embeds.append(dec_embeds.to(self.dtype))
            positions.append(to_device(dec_positions, torch.float32, self.device)[None].expand(3, -1))
        hidden = self.talker(torch.cat(embeds), torch.cat(positions, dim=1), PagedAttention(self.pool, batch, self.device))
        last, total = [], 0
        for n in new_lens:
            total += n
            last.append(total - 1)
        return hidden.index_select(0, to_device(last, torch.long, self.device))

    def warm(self, rows: int) -> None:
        """Capture the decode graph that serves `rows` speaking requests (start-up, nothing speaking)."""
        if self.steps is not None:
            self.steps.warm(rows)


# -- the code predictor -------------------------------------------------------------------------
class GraphPredictor:
    """A frame's 15 code-predictor steps on a static cache: one CUDA graph per (bucket, sampling)."""

    def __init__(self, talker, *, graphs: bool = True, max_bucket: int = 128, compile: bool = False):
        """compile: run the frame's loop through torch.compile before capturing it (fused elementwise
        kernels). Measured on an H200 (full-size talker, bf16): 11.6 -> 5.2 ms per frame at batch 1,
        codes equal, but 80-150 s of compilation per batch-size bucket, so it is off by default."""
        self.talker = talker
        self._frame = torch.compile(predict_frame_static, dynamic=False) if compile else predict_frame_static
        cp = talker.code_predictor.cfg
        self.groups = talker.num_code_groups
        self.layers = cp.num_hidden_layers
        self.kv_heads = cp.num_key_value_heads
        self.head_dim = cp.get("head_dim") or cp.hidden_size // cp.num_attention_heads
        self.vocab = cp.vocab_size
        self.device = talker.codec_head.weight.device
        self.dtype = talker.codec_head.weight.dtype
        self.graphs_on = graphs and self.device.type == "cuda"
        self.buckets = tuple(b for b in BUCKETS if b <= max_bucket)
        self._graphs: dict[tuple[int, bool], dict] = {}

    def _kv(self, batch: int) -> StaticFrameKV:
        return StaticFrameKV(self.layers, batch, self.groups, self.kv_heads, self.head_dim, self.dtype, self.device)

    def __call__(self, hidden: torch.Tensor, first_code: torch.Tensor, pick: ResidualPick):
        b = hidden.shape[0]
        bucket = bucket_for(b, self.buckets)
        if not self.graphs_on or bucket is None:
            return predict_frame_static(self.talker, hidden, first_code, pick, self._kv(b),
                                        predictor_positions(b, self.groups, self.device))
        sampled = pick.noise is not None
        entry = self._graphs.get((bucket, sampled))
        if entry is None:
            try:
                entry = self._capture(bucket, sampled, pick.sampling)
            except Exception as exc:  # noqa: BLE001 - run the same loop eagerly
                log.warning("code predictor CUDA graph capture failed (%r); running it eagerly", exc)
                self.graphs_on = False
                self._graphs = {}
                return self(hidden, first_code, pick)
        entry["hidden"][:b].copy_(hidden)
        entry["code"][:b].copy_(first_code)
        if sampled:
            entry["noise"][:, :b].copy_(pick.noise)
            entry["greedy"][:b].copy_(pick.greedy if pick.greedy is not None else torch.zeros_like(entry["greedy"][:b]))
        entry["graph"].replay()
        return entry["codes"][:b].clone(), entry["summed"][:b].clone()

    def _capture(self, bucket: int, sampled: bool, sampling) -> dict:
        entry = {
            "hidden": torch.zeros(bucket, self.talker.cfg.text_config.hidden_size, dtype=self.dtype, device=self.device),
            "code": torch.zeros(bucket, dtype=torch.long, device=self.device),
        }
        if sampled:
            entry["noise"] = torch.ones(self.groups - 1, bucket, self.vocab, device=self.device)
            entry["greedy"] = torch.ones(bucket, dtype=torch.bool, device=self.device)
            pick = ResidualPick(sampling, entry["greedy"], entry["noise"])
        else:
            pick = ResidualPick(sampling, None, None)
        # the graph reads these eager tensors: keep them alive with it
        kv = entry["kv"] = self._kv(bucket)
        positions = entry["positions"] = predictor_positions(bucket, self.groups, self.device)
        entry["pick"] = pick

        def body():
            return self._frame(self.talker, entry["hidden"], entry["code"], pick, kv, positions)

        entry["graph"], (entry["codes"], entry["summed"]) = warm_and_capture(body)
        self._graphs[(bucket, sampled)] = entry
        return entry
