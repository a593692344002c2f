"""Static-shape speech backends for the GPU: talker KV in slots, CUDA graphs per batch-size bucket.

* `SlotTalker` keeps every speaking request's talker KV in a static slot: per layer one tensor
  [slots, kv_heads, capacity, head_dim]. Prefills run eagerly (packed, causal attention over the
  prompt, as the reference); decode steps run over the slot range [0, bucket) as one CUDA graph per
  bucket (graphs=True) or eagerly over the decoding slots (graphs=False). In a graph replay, slots
  that do not decode this step compute a throw-away row: their key/value lands at their current
  length, the position their next real token overwrites, and their outputs are not read.
  Capacity grows by doubling when a request outgrows it (graphs are then captured again).
  Memory: `kv_bytes` = 2 x layers x slots x kv_heads x capacity x head_dim x 2 bytes, 40 MiB per
  slot at 2,048 tokens for the full talker; the slot count is the stage's max_active (Omni sizes
  it to the engine's max_num_seqs), so a single-user setup holds one slot, not 64 (2.5 GiB).
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
import torch.nn.functional as F

from .layers.attention import causal_attention
from .speech_stage import ResidualPick, StaticFrameKV, predict_frame_static, predictor_positions, to_device

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def _head_dim(cfg) -> int:
    return cfg.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads


def bucket_for(n: int, buckets=BUCKETS) -> int | None:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def _warm_and_capture(body, warmups: int = 2):
    """Run `body` a few times on a side stream, then capture it; returns (graph, outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


# -- talker KV in slots -------------------------------------------------------------------------
class SlotPrefill:
    """Attention backend of a packed prefill: each sequence starts at position 0 of its slot."""

    def __init__(self, pool: "SlotTalker", slots: list[int], new_lens: list[int]):
        self.pool, self.slots, self.new_lens = pool, slots, new_lens

    def attend(self, layer, q, k, v, scale):
        keys, values = self.pool.k[layer], self.pool.v[layer]
        outs, start = [], 0
        for slot, n in zip(self.slots, self.new_lens):
            end = start + n
            keys[slot, :, :n] = k[start:end].transpose(0, 1)
            values[slot, :, :n] = v[start:end].transpose(0, 1)
            outs.append(causal_attention(q[start:end], k[start:end], v[start:end], scale))
            start = end
        return torch.cat(outs)


class SlotDecode:
    """Attention backend of one decode token per row. rows: slot ids [B] (eager) or None (slots
    [0, B), the graph's layout); write_pos [B]: where each row's key/value goes (= its length)."""

    def __init__(self, pool: "SlotTalker", rows: torch.Tensor | None, write_pos: torch.Tensor):
        self.pool, self.rows, self.write_pos = pool, rows, write_pos
        b = write_pos.shape[0]
        self.index = torch.arange(b, device=write_pos.device) if rows is None else rows
        cap = pool.capacity
        self.mask = (torch.arange(cap, device=write_pos.device)[None, :] <= write_pos[:, None])[:, None, None, :]

    def attend(self, layer, q, k, v, scale):
        keys, values = self.pool.k[layer], self.pool.v[layer]
        b, hq, d = q.shape
        hkv = k.shape[1]
        keys[self.index, :, self.write_pos] = k
        values[self.index, :, self.write_pos] = v
        if self.rows is None:
            kb, vb = keys[:b], values[:b]
        else:
            kb, vb = keys.index_select(0, self.rows), values.index_select(0, self.rows)
        # the query heads sharing a kv head ride along the query-length axis: no repeated keys
        qg = q.view(b, hkv, hq // hkv, d)
        out = F.scaled_dot_product_attention(qg, kb, vb, attn_mask=self.mask, scale=scale)
        return out.reshape(b, hq, d)


class SlotTalker:
    """Talker backend with static slot KV (see module docstring)."""

    def __init__(self, talker, num_slots: int = 64, capacity: int = 2048, *, graphs: bool = True):
        if num_slots < 1 or capacity < 1:
            raise ValueError(f"SlotTalker needs at least one slot and one token, got {num_slots} x {capacity}")
        self.talker = talker
        text = talker.cfg.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = _head_dim(text)
        self.hidden_size = text.hidden_size
        self.device = talker.codec_head.weight.device
        self.dtype = talker.codec_head.weight.dtype
        self.num_slots = num_slots
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._grow(capacity)
        log.info("talker KV: %d slots x %d tokens (%.0f MiB)", num_slots, capacity,
                 self.kv_bytes(talker.cfg, num_slots, capacity, self.dtype) / 2**20)
        self.lengths = [0] * num_slots
        self.free = list(range(num_slots))  # kept sorted: the lowest slot first keeps buckets small
        self.graphs_on = graphs and self.device.type == "cuda"
        if self.graphs_on:
            from .engine import use_triton_kernels
            from .kernels.common import available

            if not available(self.device):
                self.graphs_on = False
            else:
                use_triton_kernels(talker, moe=True, layers=True)
        self._graphs: dict[int, dict] = {}

    @staticmethod
    def kv_bytes(talker_cfg, num_slots: int, capacity: int, dtype: torch.dtype) -> int:
        """Bytes of the slot KV for `num_slots` slots of `capacity` tokens (talker_config given)."""
        text = talker_cfg.text_config
        per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * _head_dim(text)
        return per_token * num_slots * capacity * torch.empty((), dtype=dtype).element_size()

    # -- slots ------------------------------------------------------------------------------------
    def open(self, job) -> bool:
        if not self.free:
            return False
        job.kv = self.free.pop(0)
        self.lengths[job.kv] = 0
        return True

    def close(self, job) -> None:
        slot = job.kv
        job.kv = None
        self.lengths[slot] = 0
        bisect.insort(self.free, slot)

    def kv_tokens(self, job) -> int:
        return self.lengths[job.kv]

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        shape = (self.num_slots, self.kv_heads, capacity, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, : self.capacity] = old
        self.k, self.v, self.capacity = new_k, new_v, capacity
        self._graphs = {}  # they point at the old tensors

    def _ensure(self, length: int) -> None:
        if length > self.capacity:
            cap = self.capacity
            while cap < length:
                cap *= 2
            self._grow(cap)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, prefill, decode, dec_embeds, dec_positions):
        hiddens, logits = [], []
        if prefill:
            slots = [j.kv for j in prefill]
            new_lens = [j.prompt.embeds.shape[0] for j in prefill]
            self._ensure(max(new_lens) + 1)
            embeds = torch.cat([j.prompt.embeds for j in prefill])
            positions = torch.cat([j.prompt.positions.to(torch.float32) for j in prefill], dim=1)
            hidden = self.talker(embeds, positions, SlotPrefill(self, slots, new_lens))
            last, total = [], 0
            for n in new_lens:
                total += n
                last.append(total - 1)
            hidden = hidden.index_select(0, to_device(last, torch.long, self.device))
            hiddens.append(hidden)
            logits.append(self.talker.logits(hidden).float())
            for slot, n in zip(slots, new_lens):
                self.lengths[slot] = n
        if decode:
            slots = [j.kv for j in decode]
            self._ensure(max(self.lengths) + 1)
            bucket = self.bucket(max(slots) + 1)
            if self.graphs_on and bucket is not None:
                h, lg = self._decode_graph(bucket, slots, dec_embeds, dec_positions)
            else:
                rows = to_device(slots, torch.long, self.device)
                wpos = to_device([self.lengths[s] for s in slots], torch.long, self.device)
                h = self.talker(dec_embeds, dec_positions, SlotDecode(self, rows, wpos))
                lg = self.talker.logits(h).float()
            hiddens.append(h)
            logits.append(lg)
            for slot in slots:
                self.lengths[slot] += 1
        return torch.cat(hiddens), torch.cat(logits)

    def bucket(self, rows: int) -> int | None:
        """The graph batch size that covers slots [0, rows)."""
        return bucket_for(rows, tuple(b for b in BUCKETS if b < self.num_slots) + (self.num_slots,))

    def warm(self, rows: int) -> None:
        """Capture the decode graph that serves `rows` speaking requests (start-up, nothing speaking)."""
        bucket = self.bucket(rows)
        if self.graphs_on and bucket is not None and bucket not in self._graphs:
            self._capture(bucket)

    def _decode_graph(self, bucket: int, slots: list[int], embeds: torch.Tensor, positions: torch.Tensor):
        entry = self._graphs.get(bucket)
        if entry is None:
            try:
                entry = self._capture(bucket)
            except Exception as exc:  # noqa: BLE001 - e.g. a talker MoE kernel that syncs: run eagerly
                log.warning("talker decode CUDA graph capture failed (%r); decoding eagerly", exc)
                self.graphs_on = False
                self._graphs = {}
                rows = to_device(slots, torch.long, self.device)
                wpos = to_device([self.lengths[s] for s in slots], torch.long, self.device)
                h = self.talker(embeds, positions, SlotDecode(self, rows, wpos))
                return h, self.talker.logits(h).float()
        rows = to_device(slots, torch.long, self.device)
        entry["wpos"].copy_(to_device(self.lengths[:bucket], torch.long, self.device), non_blocking=True)
        entry["embeds"].index_copy_(0, rows, embeds.to(self.dtype))
        entry["positions"].index_copy_(1, rows, positions.to(torch.float32))
        entry["graph"].replay()
        return entry["hidden"].index_select(0, rows), entry["logits"].index_select(0, rows)

    def _capture(self, bucket: int) -> dict:
        entry = {
            "embeds": torch.zeros(bucket, self.hidden_size, dtype=self.dtype, device=self.device),
            "positions": torch.zeros(3, bucket, dtype=torch.float32, device=self.device),
            "wpos": torch.zeros(bucket, dtype=torch.long, device=self.device),
        }
        # warm-up writes land at the current lengths of live slots: overwritten by their next token
        entry["wpos"].copy_(torch.tensor(self.lengths[:bucket], dtype=torch.long))

        def body():
            hidden = self.talker(entry["embeds"], entry["positions"], SlotDecode(self, None, entry["wpos"]))
            return hidden, self.talker.logits(hidden).float()

        entry["graph"], (entry["hidden"], entry["logits"]) = _warm_and_capture(body)
        self._graphs[bucket] = entry
        return entry


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

        entry["graph"], (entry["codes"], entry["summed"]) = _warm_and_capture(body)
        self._graphs[(bucket, sampled)] = entry
        return entry
