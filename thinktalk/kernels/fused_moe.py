"""Fused mixture-of-experts (the experts part of `layers.moe.SparseMoE`) in Triton.

`fused_moe(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)` has the signature of
`layers.moe.moe_reference`, the pure-torch reference, so `SparseMoE.experts_fn` can be swapped.

How it works (no host synchronisation, so a decode step can be CUDA-graphed):

1. `moe_align` (three tiny Triton kernels; `moe_align_torch` is the same in torch ops): the N*K
   (token, slot) pairs are sorted by expert and each expert's group is padded to a multiple of BLOCK_M with a sentinel row. The result is a static-size row
   list `sorted_ids` (upper bound N*K + min(E, N*K) * (BLOCK_M - 1)) and one expert id per block of
   BLOCK_M rows (-1 for the unused tail blocks, whose programs exit at once).
2. `_gate_up_kernel`: a grouped GEMM, one program per (row block, column block of I). It gathers
   the block's token rows of `hidden`, multiplies them by the gate *and* the up half of that
   block's expert (two fp32 accumulators sharing the A tile) and writes act(gate) * up: the
   SiLU-and-mul is fused in the epilogue, so the [N*K, 2I] gate_up product never reaches memory.
3. `_down_kernel`: the same grouped GEMM against `down_proj`, scaling each row by its routing
   weight in the epilogue and writing fp32 rows of [N, K, H].
4. `_sum_slots_kernel`: the sum over the top-k slots in slot order (deterministic, no atomics) and
   the cast back to the input dtype, in one kernel (torch's sum + cast are two).

Accumulation is fp32; fp32 inputs use IEEE products (not TF32) so the kernel is comparable with
the reference. Only SiLU is fused; any other activation falls back to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.moe import moe_reference

from .common import available, dot_in_fp32, dot_precision, pdl_args, triton, wait_prior

if triton is not None:
    import triton.language as tl

__all__ = ["fused_moe", "moe_align", "moe_align_torch", "moe_reference", "available"]


def _align_shape(nk: int, num_experts: int, block_m: int) -> int:
    """Blocks of block_m rows enough for any routing: N*K rows + up to block_m - 1 padding per used expert."""
    return -(-(nk + min(num_experts, nk) * (block_m - 1)) // block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert, each expert's group padded to a multiple of block_m.

    Returns (sorted_ids [P] int32: flat index token*K + slot, or N*K for padding;
    expert_ids [P // block_m] int32: the expert of each block, -1 past the used blocks).
    P is a static upper bound, so shapes depend only on N*K, E and block_m. Three small Triton
    kernels where they can run (count per expert; prefix sums, block experts and padding; scatter
    with an atomic cursor per expert, so pairs of one expert land in any order), else torch. Up to
    ALIGN_ONE_PROGRAM pairs (a decode step of up to 128 sequences at top-8) the three steps run
    in one program: no zeroed counts, two launches fewer.
    """
    if not available(topk_ids.device):
        return moe_align_torch(topk_ids, num_experts, block_m)
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32)
    nk = ids.numel()
    num_blocks = _align_shape(nk, num_experts, block_m)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(num_experts + 1)  # + a bin for masked-off lanes
    pdl = pdl_args(device)
    if nk <= ALIGN_ONE_PROGRAM:
        _align_one_program_kernel[(1,)](
            ids, cursor, expert_ids, sorted_ids, nk, num_blocks,
            NUM_EXPERTS=num_experts, E_PAD=e_pad, BLOCK_M=block_m, PAIRS=triton.next_power_of_2(nk),
            **align_one_program_tiles(nk), **pdl,
        )
        return sorted_ids, expert_ids
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    chunk = 1024
    grid = (triton.cdiv(nk, chunk),)
    _align_count_kernel[grid](ids, counts, nk, NUM_EXPERTS=num_experts, E_PAD=e_pad, CHUNK=chunk, **pdl)
    _align_offsets_kernel[(1,)](
        counts, cursor, expert_ids, sorted_ids, nk, num_blocks,
        NUM_EXPERTS=num_experts, E_PAD=e_pad, BLOCK_M=block_m, BLOCKS=32, ROWS=1024, **pdl,
    )
    _align_scatter_kernel[grid](ids, cursor, sorted_ids, nk, CHUNK=chunk, **pdl)
    return sorted_ids, expert_ids


# Pairs up to which moe_align is one program (one CTA holds them all in registers)
ALIGN_ONE_PROGRAM = 1024
# That program's tiles by the most pairs they serve: block experts found BLOCKS at a time, padding
# rows written ROWS at a time, by num_warps warps. tune_fused_moe.py --align on an H100
# (tune_moe_align_h100.json), µs: 64 tokens (512 pairs) 10.19 with (32, 4 warps), none better by
# over 1%; 128 tokens 12.48 with (64, 16 warps) against 14.56.
ALIGN_ONE_PROGRAM_TILES = {512: dict(BLOCKS=32, ROWS=1024, num_warps=4),
                           ALIGN_ONE_PROGRAM: dict(BLOCKS=64, ROWS=1024, num_warps=16)}


def align_one_program_tiles(nk: int) -> dict:
    """The one-program sort's tiles for nk pairs (nk <= ALIGN_ONE_PROGRAM)."""
    for most, tiles in sorted(ALIGN_ONE_PROGRAM_TILES.items()):
        if nk <= most:
            return tiles
    raise ValueError(f"{nk} pairs: the one-program expert sort takes up to {ALIGN_ONE_PROGRAM}")


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """`moe_align` in torch ops (no host sync either); pairs of one expert stay in index order."""
    device = topk_ids.device
    flat = topk_ids.flatten().long()
    nk = flat.numel()
    # scatter_add, not bincount: bincount reads the maximum back to the host (no CUDA graphs)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(nk, device=device) - (counts.cumsum(0) - counts)[by_expert]
    num_blocks = _align_shape(nk, num_experts, block_m)
    sorted_ids = torch.full((num_blocks * block_m,), nk, dtype=torch.int32, device=device)
    sorted_ids[starts[by_expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(block_start < ends[-1], expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids


# Up to this many (token, slot) pairs (a decode of 1-2 tokens at top-8) each pair gets its own
# block of rows: the expert sort costs more than the few repeated weight reads it would save.
PAIR_BLOCKS_MAX = 16


# Overrides of the decode regime's tiles (a few rows per expert): gate_up's (BLOCK_N, BLOCK_K,
# num_warps, num_stages) and the down projection's own where they differ (BLOCK_N_D, BLOCK_K_D,
# num_warps_d, num_stages_d); empty = the table below. Benchmarks set it to try a tuner's result
# (tune_fused_moe.py --wide / --down, bench_thinker.py --moe-decode-tiles) before it goes into the code.
DECODE_TILES: dict = {}


def _pick_config(nk: int, num_experts: int, hidden: int, inter: int) -> dict:
    """Tiles from benchmarks/results/tune_fused_moe_h200.json (H200, the thinker's shapes): long K
    tiles with deep pipelining while the kernel is bound by reading experts (decode), 64-row
    blocks once each expert has many rows (prefill)."""
    rows_per_expert = nk / max(1, min(num_experts, nk))
    if nk <= PAIR_BLOCKS_MAX:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 16:
        return {**dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4 if rows_per_expert > 2 else 3),
                **DECODE_TILES}
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


if triton is not None:

    @triton.jit
    def _align_count_kernel(ids_ptr, counts_ptr, nk, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
                            CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
        wait_prior(USE_PDL)
        offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < nk, other=NUM_EXPERTS)  # masked lanes: the spare bin
        hist = tl.histogram(ids, E_PAD)
        bins = tl.arange(0, E_PAD)
        tl.atomic_add(counts_ptr + bins, hist, mask=bins < NUM_EXPERTS)

    @triton.jit
    def _align_offsets_kernel(
        counts_ptr, cursor_ptr, expert_ids_ptr, sorted_ids_ptr, nk, num_blocks,
        NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr,
        ROWS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        experts = tl.arange(0, E_PAD)
        used = experts < NUM_EXPERTS
        counts = tl.load(counts_ptr + experts, mask=used, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, 0)
        tl.store(cursor_ptr + experts, ends - padded, mask=used)
        _align_block_experts(ends, used, tl.sum(padded, 0), expert_ids_ptr, sorted_ids_ptr, nk, num_blocks,
                             BLOCK_M, BLOCKS, ROWS)

    @triton.jit
    def _align_block_experts(ends, used, total, expert_ids_ptr, sorted_ids_ptr, nk, num_blocks,
                             BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr, ROWS: tl.constexpr):
        """Each block's expert (-1 past the used blocks) and every row set to the padding id nk."""
        for b0 in range(0, num_blocks, BLOCKS):
            blocks = b0 + tl.arange(0, BLOCKS)
            first_row = blocks * BLOCK_M
            # the block's expert: how many experts' groups end at or before its first row
            passed = (ends[None, :] <= first_row[:, None]) & used[None, :]
            expert = tl.sum(passed.to(tl.int32), 1)
            expert = tl.where(first_row < total, expert, -1)
            tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)
        for r0 in range(0, num_blocks * BLOCK_M, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            tl.store(sorted_ids_ptr + rows, tl.full((ROWS,), 0, tl.int32) + nk, mask=rows < num_blocks * BLOCK_M)

    @triton.jit
    def _align_one_program_kernel(
        ids_ptr, cursor_ptr, expert_ids_ptr, sorted_ids_ptr, nk, num_blocks,
        NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, PAIRS: tl.constexpr,
        BLOCKS: tl.constexpr, ROWS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """The three align kernels in one program, for up to PAIRS pairs: count, offsets, scatter."""
        wait_prior(USE_PDL)
        offs = tl.arange(0, PAIRS)
        ok = offs < nk
        ids = tl.load(ids_ptr + offs, mask=ok, other=NUM_EXPERTS)  # masked lanes: the spare bin
        experts = tl.arange(0, E_PAD)
        used = experts < NUM_EXPERTS
        counts = tl.where(used, tl.histogram(ids, E_PAD), 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, 0)
        tl.store(cursor_ptr + experts, ends - padded, mask=used)
        _align_block_experts(ends, used, tl.sum(padded, 0), expert_ids_ptr, sorted_ids_ptr, nk, num_blocks,
                             BLOCK_M, BLOCKS, ROWS)
        tl.debug_barrier()  # the cursors and the padding rows are written before any pair lands
        dest = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
        tl.store(sorted_ids_ptr + dest, offs, mask=ok)

    @triton.jit
    def _align_scatter_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, nk, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
        wait_prior(USE_PDL)
        offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        ok = offs < nk
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        dest = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
        tl.store(sorted_ids_ptr + dest, offs, mask=ok)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, w_ptr, out_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_rows, hidden_size, inter_size,
        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, PAIR_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(inter_size, BLOCK_N)
        pid_m = pid // n_blocks
        pid_n = pid % n_blocks
        expert = tl.load(expert_ids_ptr + pid_m)
        if expert < 0:
            return
        if PAIR_BLOCKS:  # block m is (token, slot) pair m alone; expert_ids are the flat top-k ids
            rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_rows)
        else:
            rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < num_rows
        tokens = rows // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter_size
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
        g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + inter_size * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(hidden_size, BLOCK_K)):
            k_ok = offs_k < hidden_size - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(
        a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_rows, hidden_size, inter_size,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, PAIR_BLOCKS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(hidden_size, BLOCK_N)
        pid_m = pid // n_blocks
        pid_n = pid % n_blocks
        expert = tl.load(expert_ids_ptr + pid_m)
        if expert < 0:
            return
        if PAIR_BLOCKS:
            rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_rows)
        else:
            rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < num_rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden_size
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(inter_size, BLOCK_K)):
            k_ok = offs_k < inter_size - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        route_w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * route_w[:, None]
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _sum_slots_kernel(src_ptr, out_ptr, hidden_size, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):
        wait_prior(USE_PDL)
        token = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < hidden_size
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for slot in range(TOP_K):  # in slot order, as torch's sum over the slot axis
            acc += tl.load(src_ptr + (token * TOP_K + slot) * hidden_size + offs, mask=ok, other=0.0)
        tl.store(out_ptr + token * hidden_size + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def fused_moe(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act=F.silu,
    config: dict | None = None,
) -> torch.Tensor:
    """hidden [N, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; topk_* [N, K] -> [N, H]."""
    if act is not F.silu or not available(hidden.device):
        return moe_reference(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)
    n, hidden_size = hidden.shape
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if n == 0:
        return torch.zeros_like(hidden)
    nk = n * top_k
    cfg = config or _pick_config(nk, num_experts, hidden_size, inter)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    pdl = pdl_args(hidden.device)
    launch = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **pdl)
    # the down projection may take its own tiles (K = I is short: its K loop is a few steps)
    bn_d, bk_d = cfg.get("BLOCK_N_D", bn), cfg.get("BLOCK_K_D", bk)
    launch_d = {**launch, "num_warps": cfg.get("num_warps_d", launch["num_warps"]),
                "num_stages": cfg.get("num_stages_d", launch["num_stages"])}
    upcast = dot_in_fp32(hidden.dtype)
    precision = dot_precision(torch.float32 if upcast else hidden.dtype)
    pair_blocks = nk <= PAIR_BLOCKS_MAX
    if pair_blocks:  # a block per (token, slot) pair: no sort by expert needed (3 kernels saved)
        expert_ids = topk_ids.reshape(-1)
        sorted_ids = expert_ids  # unused
    else:
        sorted_ids, expert_ids = moe_align(topk_ids, num_experts, bm)
    num_m_blocks = expert_ids.numel()

    inter_act = torch.empty(nk, inter, dtype=hidden.dtype, device=hidden.device)
    grid = (num_m_blocks * triton.cdiv(inter, bn),)
    _gate_up_kernel[grid](
        hidden, gate_up_proj, inter_act, sorted_ids, expert_ids,
        nk, hidden_size, inter,
        hidden.stride(0), hidden.stride(1),
        gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
        inter_act.stride(0), inter_act.stride(1),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, UPCAST=upcast,
        PAIR_BLOCKS=pair_blocks, **launch,
    )

    out = torch.empty(nk, hidden_size, dtype=torch.float32, device=hidden.device)
    weights = topk_weights.reshape(-1).contiguous()
    grid = (num_m_blocks * triton.cdiv(hidden_size, bn_d),)
    _down_kernel[grid](
        inter_act, down_proj, out, weights, sorted_ids, expert_ids,
        nk, hidden_size, inter,
        inter_act.stride(0), inter_act.stride(1),
        down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn_d, BLOCK_K=bk_d, PRECISION=precision, UPCAST=upcast,
        PAIR_BLOCKS=pair_blocks, **launch_d,
    )
    summed = torch.empty_like(hidden)
    block = min(1024, triton.next_power_of_2(hidden_size))
    _sum_slots_kernel[(n, triton.cdiv(hidden_size, block))](
        out, summed, hidden_size, TOP_K=top_k, BLOCK=block, num_warps=4, **pdl)
    return summed
