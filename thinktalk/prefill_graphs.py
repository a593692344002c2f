"""Prefill and mixed steps as piecewise CUDA graphs over padded token counts.

An eager prefill of 512 tokens launches ~1,100 kernels, most from Python (Triton's launcher costs
tens of µs each): on an H100 it took 48 ms of wall time for 20 ms of GPU work; replayed by
pieces it takes 22 ms (benchmarks/results/profile_decode_h100.txt, thinker_h100.json). A whole
prefill cannot be one graph, because attention depends on how the step's tokens split into
sequences and what each has cached. But everything else in a decoder layer treats tokens
independently: norms, projections, rotary, the MoE. So a step runs as L + 1 graph "pieces" with
attention between them, eagerly:

    piece 0        rotary table, layer 0 input norm, q/k/v              (graph)
    attention 0    the paged backend's `attend` on the real rows          (eager)
    piece i        layer i-1 o_proj, add + norm, MoE; layer i norm, q/k/v  (graph)
    ...
    piece L        layer L-1 o_proj, add + norm, MoE; final norm           (graph)

Pieces are captured for a set of padded token counts (buckets); a step of n tokens replays the
pieces of the smallest bucket >= n. Rows n..bucket-1 are padding: they carry stale values through
the per-token pieces (no row reads another, so they never reach a real one) and attention never
sees them (it gets rows [:n] only and writes its output back to rows [:n]). Pieces hand over
through static buffers (q, k, v, attention output, residual stream, layer output), so the
temporaries of one piece are free for the next and all buckets share one memory pool.

Steps with vision deepstack features (added to the visual rows after the first layers) run
eagerly, as do steps longer than the largest bucket. Off CUDA the same pieces run eagerly (what
the CPU tests compare with the reference path).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096)


class PrefillGraphs:
    def __init__(self, stack, max_tokens: int, capture_layers: tuple[int, ...] = (), min_tokens: int = 1):
        """stack: the thinker's DecoderStack; max_tokens: the largest bucket (rounded up to one);
        capture_layers: hidden-state indices the engine captures (0 is the input, kept by the caller)."""
        self.stack = stack
        self.layers = list(stack.layers)
        first = self.layers[0]
        attn = first.self_attn
        weight = first.input_layernorm.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.use_graphs = self.device.type == "cuda"
        self.buckets = [b for b in BUCKETS if b < max_tokens] + [next((b for b in BUCKETS if b >= max_tokens), max_tokens)]
        self.min_tokens = min_tokens
        # layer outputs kept in buffers; the last entry is the normed output, `final` (as in the stack)
        self.capture_layers = tuple(c for c in capture_layers if 0 < c < len(self.layers))
        big = self.buckets[-1]
        hidden = weight.shape[0]
        dev, dt = self.device, self.dtype
        self.embeds = torch.zeros(big, hidden, dtype=dt, device=dev)
        self.positions = torch.zeros(3, big, dtype=torch.float32, device=dev)
        self.q = torch.zeros(big, attn.num_heads, attn.head_dim, dtype=dt, device=dev)
        self.k = torch.zeros(big, attn.num_kv_heads, attn.head_dim, dtype=dt, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn = torch.zeros_like(self.q)
        self.out = torch.zeros(big, hidden, dtype=dt, device=dev)  # a layer's output (or MLP part of it)
        self.residual = torch.zeros(big, hidden, dtype=dt, device=dev)
        self.final = torch.zeros(big, hidden, dtype=dt, device=dev)
        self.captured = {c: torch.zeros(big, hidden, dtype=dt, device=dev) for c in self.capture_layers}
        self.cos = torch.zeros(big, attn.head_dim, dtype=torch.float32, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.mempool = None
        self.steps = 0

    def supports(self, num_tokens: int, deepstack) -> bool:
        return deepstack is None and self.min_tokens <= num_tokens <= self.buckets[-1]

    # -- the step ---------------------------------------------------------------------------------
    def run(self, embeds: torch.Tensor, positions: torch.Tensor, kv, capture: tuple[int, ...] = ()):
        """What `DecoderStack.forward(embeds, positions, kv, None, capture)` returns, by pieces."""
        n = embeds.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        self.embeds[:n].copy_(embeds)
        if positions.dim() == 1:
            positions = positions[None].expand(3, -1)
        self.positions[:, :n].copy_(positions)
        self.steps += 1
        graphs = self.graphs.get(bucket)
        for i in range(len(self.layers) + 1):
            if graphs is not None:
                graphs[i].replay()
            else:
                self._piece(i, bucket)
            if i < len(self.layers):
                layer = self.layers[i]
                out = kv.attend(layer.self_attn.layer, self.q[:n], self.k[:n], self.v[:n], layer.self_attn.scale)
                self.attn[:n].copy_(out)
        captured = {}
        for c in capture:
            if c == 0:
                captured[c] = embeds
            elif c in self.captured:
                captured[c] = self.captured[c][:n].clone()
            elif c == len(self.layers):
                captured[c] = self.final[:n].clone()
            else:
                raise ValueError(f"hidden state {c} is not captured by the prefill graphs ({self.capture_layers})")
        return self.final[:n], captured

    def _piece(self, i: int, bucket: int) -> None:
        """Piece i over rows [:bucket]: finish layer i-1 (if any), start layer i (or the final norm)."""
        b = slice(0, bucket)
        stack = self.stack
        if i == 0:
            cos, sin = stack.rotary_emb(self.positions[:, b])
            self.cos[b].copy_(cos)
            self.sin[b].copy_(sin)
            hidden, residual = self.embeds[b], None
        else:
            prev = self.layers[i - 1]
            hidden, residual = prev.post_attention(self.attn[b], self.residual[b])
            if i in self.captured:  # the layer's output itself is needed
                hidden, residual = stack.layer_output(hidden, residual), None
                self.captured[i][b].copy_(hidden)
        if i == len(self.layers):
            self.final[b].copy_(stack.final_norm(hidden, residual))
            return
        q, k, v, residual = self.layers[i].pre_attention(hidden, residual, self.cos[b], self.sin[b])
        self.q[b].copy_(q)
        self.k[b].copy_(k)
        self.v[b].copy_(v)
        self.residual[b].copy_(residual)

    # -- capture ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket's pieces, largest first (its pool then serves the smaller ones)."""
        if not self.use_graphs:
            return
        try:
            for bucket in sorted(self.buckets, reverse=True):
                self.graphs[bucket] = self._capture(bucket)
        except Exception as exc:  # noqa: BLE001 - a kernel that syncs with the host cannot be captured
            log.warning("prefill CUDA graphs not captured (%s); prefills run eagerly", exc)
            self.graphs.clear()
            self.use_graphs = False
            torch.cuda.synchronize(self.device)

    def _capture(self, bucket: int) -> list[torch.cuda.CUDAGraph]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for i in range(len(self.layers) + 1):  # compile Triton kernels, pick cuBLAS algorithms
                self._piece(i, bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        graphs = []
        for i in range(len(self.layers) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                self._piece(i, bucket)
            graphs.append(graph)
        return graphs
