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

`add_norm_gemv_reference` (the unfused torch reference: add_rms_norm_reference, then F.linear) has
the same signature and result up to that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import available, pdl_args, prefetch_l2, triton, wait_prior
from .gemv import GEMV_MAX_ROWS_WIDE, gemv_config, gemv_supported, linear, prefetch_consts
from .quant_gemv import DEFAULT_STAGES
from .rms_norm import add_rms_norm, add_rms_norm_reference

if triton is not None:
    import triton.language as tl

__all__ = ["add_norm_gemv", "add_norm_gemv_reference", "add_norm_linear", "norm_gemv_supported"]


def add_norm_gemv_reference(x, residual, norm_weight, eps, weight):
    """(rms_norm(x + residual) @ weight^T, x + residual), unfused, in torch."""
    normed, total = add_rms_norm_reference(x, residual, norm_weight, eps)
    return F.linear(normed, weight), total


def norm_gemv_supported(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor) -> bool:
    """A few rows (GEMV_MAX_ROWS_WIDE) of a float weight `gemv` takes, with a residual and a norm
    weight of the input's shape and dtype."""
    return (x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS_WIDE and residual.shape == x.shape
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


def add_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [M, K] (M <= GEMV_MAX_ROWS_WIDE), weight [N, K] -> (y [M, N], x + residual [M, K])."""
    if not norm_gemv_supported(x, residual, norm_weight, weight):
        raise ValueError("add_norm_gemv takes 1..2 rows of a contiguous float weight of the input's dtype "
                         "(add_norm_linear routes the rest)")
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x)
    cfg = config or gemv_config(m, n, k, weight.element_size())
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
