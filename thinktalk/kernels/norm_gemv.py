"""The residual add + RMSNorm before a projection, folded into that projection's decode GEMV.

A decoder layer starts with `add_rms_norm(x, residual)` and hands the normed row to the fused q/k/v
GEMV. At one decode row the norm is a kernel of its own (~2 µs on an H100, 48 a step, plus its gap
in the graph) for 4 KB of data. Here the GEMV does it: the norm of a row is

    y = g * h * rsqrt(mean(h^2) + eps),   h = x + residual

and the product W y = rsqrt(mean(h^2) + eps) * (W (g * h)): every program accumulates W (g * h)
and sum(h^2) over the same K loop in which it streams its weight rows, and scales its outputs by
the row's rsqrt at the end. No pass before the weight stream, no second kernel; program 0 also
writes h, the new residual stream.

Numerics: h is rounded to the input dtype as the unfused kernel rounds it (so the residual stream
is bit-identical), the statistics are fp32 as there; the normed row is not rounded to the input
dtype before the product (the unfused path rounds it twice: after the rsqrt and after the weight),
so outputs differ from the unfused path's at that rounding's level.

    add_norm_gemv(x, residual, norm_weight, eps, weight)   x, residual [M, K] (M <= 2) ->
                                                           (normed(x + residual) @ weight^T, x + residual)
    add_norm_linear(...)                                   the same for any M: the GEMV where it
                                                           applies, else add_rms_norm + gemv.linear

The layer's second norm (after attention) feeds the MoE: its router and its experts' gate-up
product both read the normed row. `add_norm_moe` folds it into both, the same way: the router GEMV
(program 0 writing the new residual h) and the gate-up GEMV over the selected experts, which reads
h, multiplies by g and scales gate and up by the rsqrt before SiLU(gate) * up; the router's softmax
+ top-k is folded into the gate-up GEMV too (each of its programs picks its expert from the
logits, with route_in_gate_up); the down GEMV is kernels/gemv.py's: three kernels instead of five
(norm, router, top-k, gate-up, down), four without route_in_gate_up. For the few tokens the MoE
GEMVs take (GEMV_MAX_TOKENS), float experts, no shared expert; else the caller runs the norm and
the MoE as before.

    add_norm_moe(x, residual, norm_weight, eps, moe)       -> (moe(norm(x + residual)), x + residual) or None

`add_norm_gemv_reference` / `add_norm_moe_reference` (the unfused torch references) have the
same signatures and results up to that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import available, pdl_args, prefetch_l2, triton, wait_prior
from .gemv import (
    GEMV_MAX_TOKENS, float_expert_args, gemv_config, gemv_max_rows, gemv_supported, linear, moe_gemv_config,
    prefetch_consts,
)
from .quant_gemv import DEFAULT_STAGES
from .quant_moe_gemv import run_moe_down
from .rms_norm import add_rms_norm, add_rms_norm_reference
from .router import MAX_EXPERTS, softmax_topk

if triton is not None:
    import triton.language as tl

    from .router import routed_experts

__all__ = ["add_norm_gemv", "add_norm_gemv_reference", "add_norm_linear", "norm_gemv_supported", "add_norm_moe",
           "add_norm_moe_reference", "norm_gemv_config", "norm_moe_config"]


def add_norm_gemv_reference(x, residual, norm_weight, eps, weight):
    """(rms_norm(x + residual) @ weight^T, x + residual), unfused, in torch."""
    normed, total = add_rms_norm_reference(x, residual, norm_weight, eps)
    return F.linear(normed, weight), total


def norm_gemv_supported(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor) -> bool:
    """The rows `gemv.linear` gives a GEMV (`gemv_max_rows`: more for a narrow weight such as the
    router's) of a float weight it takes, with a residual and a norm weight of the
    input's shape and dtype."""
    return (x.dim() == 2 and 0 < x.shape[0] <= gemv_max_rows(weight) and residual.shape == x.shape
            and residual.dtype == x.dtype and norm_weight.dtype == x.dtype and norm_weight.shape == x.shape[-1:]
            and gemv_supported(x, weight))


if triton is not None:

    @triton.jit
    def _add_norm_gemv_kernel(
        x_ptr, r_ptr, g_ptr, w_ptr, out_ptr, sum_ptr,
        M, N, K, eps,
        stride_xm, stride_rm, stride_wn, stride_om, stride_sm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        STAGES: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 1,
    ):
        """Program n: BLOCK_N rows of the output for all M rows; program 0 also writes h = x + r."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        if PREFETCH > 0:  # the weight rows' first lines asked of L2 while the kernel before finishes
            lines = tl.minimum(tl.arange(0, PREFETCH) * LINE, K - 1)
            prefetch_l2(w_ptr + tl.minimum(offs_n, N - 1)[:, None] * stride_wn + lines[None, :], USE_PDL)
        wait_prior(USE_PDL)
        n_ok = offs_n < N
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        writer = pid == 0
        for step in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            cols = step * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = cols < K
            if EVEN_K:  # no K mask on the weight: its loads stay 128 bits wide
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None], other=0.0)
            else:
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0.0)
            w = w.to(tl.float32)
            g = tl.load(g_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                ok = k_ok & (m < M)
                x = tl.load(x_ptr + m * stride_xm + cols, mask=ok, other=0.0)
                r = tl.load(r_ptr + m * stride_rm + cols, mask=ok, other=0.0)
                h = (r.to(tl.float32) + x.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded as torch's add
                tl.store(sum_ptr + m * stride_sm + cols, h, mask=ok & writer)
                hf = h.to(tl.float32)
                squares += tl.where(rows == m, tl.sum(hf * hf, axis=0), 0.0)
                part = tl.sum(w * (hf * g)[None, :], axis=1)
                acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
        acc = acc * tl.rsqrt(squares / K + eps)[None, :]
        o_ptrs = out_ptr + rows[None, :] * stride_om + offs_n[:, None]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (rows < M)[None, :])


def norm_gemv_config(m: int, n: int, k: int, elem_bytes: int = 2) -> dict:
    """Tiles of `_add_norm_gemv_kernel`. One decode row: from `bench_quant_gemv.py --sweep-norm` on
    an H100 (sweep_norm_h100.json), µs against the plain GEMV's tiles: the router (128 x 2048) one
    row a program, 1,024 bytes of it a step, one warp, 8 steps in flight, 3.08 vs 4.59; q/k/v
    (5120 x 2048) 8 rows a program, 9.73 vs 10.30; the thinker at one stream 303.2 vs 294.6 tok/s
    (thinker_norm_tiles*_h100.json). More rows: the plain GEMV's (gemv.gemv_config)."""
    if m == 1 and elem_bytes == 2 and k % 512 == 0:
        if n <= 256:
            return dict(BLOCK_N=1, BLOCK_K=512, SPLIT_K=1, num_warps=1, num_stages=8)
        if n >= 4096:
            return dict(BLOCK_N=8, BLOCK_K=256, SPLIT_K=1, num_warps=2, num_stages=4)
    return gemv_config(m, n, k, elem_bytes)


def norm_moe_config(tokens: int, top_k: int, hidden: int, inter: int, elem_bytes: int = 2) -> dict:
    """Tiles of `add_norm_moe`'s gate-up and down kernels: the MoE GEMVs' (gemv.moe_gemv_config)."""
    return moe_gemv_config(tokens, top_k, hidden, inter, elem_bytes)


def add_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [M, K] (M <= gemv_max_rows(weight)), weight [N, K] -> (y [M, N], x + residual [M, K])."""
    if not norm_gemv_supported(x, residual, norm_weight, weight):
        raise ValueError("add_norm_gemv takes the few rows gemv.linear gives a GEMV, of a contiguous float weight "
                         "of the input's dtype (add_norm_linear routes the rest)")
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x)
    cfg = config or norm_gemv_config(m, n, k, weight.element_size())
    block_k = cfg["BLOCK_K"]
    pdl = pdl_args(x.device)
    _add_norm_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, residual, norm_weight, weight, out, total,
        m, n, k, eps,
        x.stride(0), residual.stride(0), weight.stride(0), out.stride(0), total.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        STAGES=cfg.get("num_stages", DEFAULT_STAGES), num_warps=cfg.get("num_warps", 4),
        **pdl, **prefetch_consts(weight, k, pdl),
    )
    return out, total


def add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual) for x [N, K]: the fused GEMV for the few rows
    it takes, else the norm kernel and `gemv.linear` (cuBLAS past a few rows)."""
    if available(x.device) and norm_gemv_supported(x, residual, norm_weight, weight):
        return add_norm_gemv(x, residual, norm_weight, eps, weight)
    normed, total = add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight), total


def add_norm_moe_reference(x, residual, norm_weight, eps, moe):
    """(moe(rms_norm(x + residual)), x + residual), unfused, in torch (moe: a layers.moe.SparseMoE)."""
    from ..layers.moe import moe_reference, route

    normed, total = add_rms_norm_reference(x, residual, norm_weight, eps)
    weights, ids = route(normed, moe.gate.weight, moe.top_k, moe.norm_topk_prob)
    return moe_reference(normed, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids, moe.act), total


if triton is not None:

    @triton.jit
    def _moe_gate_up_norm_kernel(
        h_ptr, g_ptr, w_ptr, logits_ptr, route_w_ptr, route_ids_ptr, out_ptr,
        hidden_size, inter_size, num_experts, eps,
        stride_hm, stride_we, stride_wn, stride_lm, stride_om,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
        USE_PDL: tl.constexpr, ROUTE_HERE: tl.constexpr,
    ):
        """Program (pair, n block): SiLU(gate) * up of BLOCK_N rows of the pair's expert for the
        normed row of the pair's token, h [token] read un-normed (quant_moe_gemv's gate-up kernel
        with the norm folded in as in _add_norm_gemv_kernel). The pair's expert comes from the
        router's logits: each program does the token's softmax + top-k itself (router.py's
        `routed_experts`, 128 logits in registers) instead of waiting for a kernel of its own;
        the (token, slot 0, block 0) program writes the token's routing weights and ids for the
        down kernel. ROUTE_HERE off: the routing is already in route_w / route_ids (router.py's
        kernel ran before)."""
        wait_prior(USE_PDL)
        pair = tl.program_id(0)
        pid_n = tl.program_id(1)
        token = pair // TOP_K
        if ROUTE_HERE:
            slot = pair - token * TOP_K
            route_w, route_ids = routed_experts(logits_ptr + token * stride_lm, num_experts, TOP_K, K_PAD, E_PAD,
                                                NORMALIZE)
            slots = tl.arange(0, K_PAD)
            writer = (slots < TOP_K) & (slot == 0) & (pid_n == 0)
            tl.store(route_w_ptr + token * TOP_K + slots, route_w.to(route_w_ptr.dtype.element_ty), mask=writer)
            tl.store(route_ids_ptr + token * TOP_K + slots, route_ids, mask=writer)
            expert = tl.sum(tl.where(slots == slot, route_ids, 0))
        else:
            expert = tl.load(route_ids_ptr + pair)
        h_row = h_ptr + token * stride_hm
        w_e = w_ptr + expert * stride_we
        offs_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_u = offs_g + inter_size  # the up rows follow the gate rows
        n_ok = offs_g < inter_size
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for step in tl.range(0, tl.cdiv(hidden_size, BLOCK_K), num_stages=STAGES):
            cols = step * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = cols < hidden_size
            if EVEN_K:
                w_mask = n_ok[:, None]
            else:
                w_mask = n_ok[:, None] & k_ok[None, :]
            wg = tl.load(w_e + offs_g[:, None] * stride_wn + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
            wu = tl.load(w_e + offs_u[:, None] * stride_wn + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
            h = tl.load(h_row + cols, mask=k_ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
            squares += h * h
            xg = (h * g)[None, :]
            acc_g += tl.sum(wg * xg, axis=1)
            acc_u += tl.sum(wu * xg, axis=1)
        scale = tl.rsqrt(tl.sum(squares, axis=0) / hidden_size + eps)
        gate = acc_g * scale
        out = gate * tl.sigmoid(gate) * (acc_u * scale)  # silu(gate) * up
        tl.store(out_ptr + pair * stride_om + offs_g, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def add_norm_moe(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, moe,
                 config: dict | None = None, route_in_gate_up: bool = False):
    """(moe(rms_norm(x + residual)), x + residual) for a layers.moe.SparseMoE with float experts and
    no shared expert, x [N, H] of up to GEMV_MAX_TOKENS tokens; None where that does not hold (or
    the kernels do not run here): the caller then runs the norm and the MoE itself. config: the
    gate-up and down tiles (norm_moe_config's keys; benchmarks sweep them). route_in_gate_up: the
    gate-up programs pick their experts from the logits (the engine's default: EngineConfig); else
    the router's softmax + top-k kernel runs between the router and the gate-up GEMVs."""
    experts = moe.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    router = moe.gate.weight
    if (moe.shared_expert is not None or moe.act is not F.silu or not available(x.device)
            or not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor)  # quantized experts
            or x.shape[0] > GEMV_MAX_TOKENS or router.shape[0] > MAX_EXPERTS
            or not norm_gemv_supported(x, residual, norm_weight, router)
            or not gemv_supported(x, gate_up) or not gemv_supported(x, down)):
        return None
    n, hidden_size = x.shape
    logits, total = add_norm_gemv(x, residual, norm_weight, eps, router)
    num_experts, top_k = router.shape[0], moe.top_k
    inter = gate_up.shape[1] // 2
    cfg = config or norm_moe_config(n, top_k, hidden_size, inter, x.element_size())
    pdl = pdl_args(x.device)
    if route_in_gate_up:
        route_w = torch.empty(n * top_k, dtype=x.dtype, device=x.device)
        route_ids = torch.empty(n * top_k, dtype=torch.int64, device=x.device)
    else:
        route_w, route_ids = (t.reshape(-1) for t in softmax_topk(logits, top_k, moe.norm_topk_prob))
    inter_act = torch.empty(n * top_k, inter, dtype=x.dtype, device=x.device)
    block_k = cfg["BLOCK_K_GU"]
    _moe_gate_up_norm_kernel[(n * top_k, triton.cdiv(inter, cfg["BLOCK_N_GU"]))](
        total, norm_weight, gate_up, logits, route_w, route_ids, inter_act,
        hidden_size, inter, num_experts, eps,
        total.stride(0), gate_up.stride(0), gate_up.stride(1), logits.stride(0), inter_act.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(num_experts),
        NORMALIZE=moe.norm_topk_prob, BLOCK_N=cfg["BLOCK_N_GU"], BLOCK_K=block_k, EVEN_K=hidden_size % block_k == 0,
        STAGES=cfg.get("num_stages", DEFAULT_STAGES), num_warps=cfg.get("num_warps_gu", 4), ROUTE_HERE=route_in_gate_up,
        **pdl,
    )
    out = run_moe_down(inter_act, route_w, route_ids, n, top_k, hidden_size, inter, cfg, float_expert_args(down), pdl)
    return out, total
