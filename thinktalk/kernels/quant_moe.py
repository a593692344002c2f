"""Fused mixture-of-experts with quantized expert weights (int4 / int8 / fp8 weight-only).

`quant_fused_moe(hidden, gate_up, down, topk_weights, topk_ids, act)` has the signature of
`layers.moe.moe_reference`; `gate_up` and `down` are the stacked expert weights in a quantized
form: anything with `.qweight [E, N, K']`, `.scale [E, Nb, Kb]`, `.zero` (or None), `.fmt` (a
QFormat) and `.in_features` — `layers.quant_linear.QuantWeight`, or `QuantTensor` below.

It is `kernels.fused_moe` with the weight tiles dequantized in registers: the same token->expert
alignment (`fused_moe.moe_align`, reused, not copied: pass `align=` to swap it), one grouped GEMM
for gate and up with SiLU(gate) * up fused in the epilogue, one grouped GEMM for down with the
routing weight applied in the epilogue, a deterministic sum over the top-k slots.

`quant_moe_reference` is the pure-torch path with the same signature: `moe_reference` over
experts dequantized one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.moe import moe_reference
from .common import available, dot_in_fp32, dot_precision, triton
from .fused_moe import moe_align
from .quant_format import QFormat, dequantize
from .quant_gemm import _dequant_tile, as_bytes, pick_block_k, scale_per_tile, zero_args  # noqa: F401

if triton is not None:
    import triton.language as tl

__all__ = ["quant_fused_moe", "quant_moe_reference", "QuantTensor"]


@dataclass
class QuantTensor:
    """A bare quantized (stacked) weight: the fields the MoE functions read."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: QFormat
    in_features: int

    @property
    def shape(self):
        return (*self.qweight.shape[:-1], self.in_features)


class _Dequantized:
    """Looks like a stacked [E, N, K] weight to moe_reference; experts are dequantized on access."""

    def __init__(self, w, dtype: torch.dtype):
        self.w, self.dtype = w, dtype
        self.shape = (*w.qweight.shape[:-1], w.in_features)

    def __getitem__(self, e: int) -> torch.Tensor:
        w = self.w
        zero = None if w.zero is None else w.zero[e]
        return dequantize(w.qweight[e], w.scale[e], zero, w.fmt, w.in_features, dtype=self.dtype)


def quant_moe_reference(hidden, gate_up, down, topk_weights, topk_ids, act=F.silu) -> torch.Tensor:
    """moe_reference with the experts' weights dequantized (in hidden's dtype) as they are visited."""
    return moe_reference(
        hidden, _Dequantized(gate_up, hidden.dtype), _Dequantized(down, hidden.dtype), topk_weights, topk_ids, act
    )


if triton is not None:

    @triton.jit
    def _q_gate_up_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_rows, hidden_size, inter_size,
        stride_xm, stride_xk,
        stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
        stride_om, stride_on,
        IS_FP8: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr,
        SBN: tl.constexpr, SBK: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(inter_size, BLOCK_N)
        pid_m = pid // n_blocks
        pid_n = pid % n_blocks
        expert = tl.load(expert_ids_ptr + pid_m)
        if expert < 0:
            return
        e64 = expert.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_ids_ptr + offs_m)
        row_ok = rows < num_rows
        tokens = rows // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter_size
        q_e = q_ptr + e64 * stride_qe
        s_e = s_ptr + e64 * stride_se
        z_e = z_ptr + e64 * stride_ze
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden_size
            a = tl.load(x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = _dequant_tile(
                q_e, s_e, z_e, offs_k, offs_n, k0, k_ok, n_ok,
                stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
                IS_FP8, INT4, HAS_ZERO, ZP, SBN, SBK, SCALE_PER_TILE,
            )
            u = _dequant_tile(  # the up rows follow the gate rows
                q_e, s_e, z_e, offs_k, offs_n + inter_size, k0, k_ok, n_ok,
                stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
                IS_FP8, INT4, HAS_ZERO, ZP, SBN, SBK, SCALE_PER_TILE,
            )
            if UPCAST:
                a = a.to(tl.float32)
            else:
                g = g.to(a.dtype)
                u = u.to(a.dtype)
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _q_down_kernel(
        a_ptr, q_ptr, s_ptr, z_ptr, out_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr,
        num_rows, hidden_size, inter_size,
        stride_am, stride_ak,
        stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
        stride_om, stride_on,
        IS_FP8: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr,
        SBN: tl.constexpr, SBK: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(hidden_size, BLOCK_N)
        pid_m = pid // n_blocks
        pid_n = pid % n_blocks
        expert = tl.load(expert_ids_ptr + pid_m)
        if expert < 0:
            return
        e64 = expert.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_ids_ptr + offs_m)
        row_ok = rows < num_rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden_size
        q_e = q_ptr + e64 * stride_qe
        s_e = s_ptr + e64 * stride_se
        z_e = z_ptr + e64 * stride_ze
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter_size, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < inter_size
            a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _dequant_tile(
                q_e, s_e, z_e, offs_k, offs_n, k0, k_ok, n_ok,
                stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
                IS_FP8, INT4, HAS_ZERO, ZP, SBN, SBK, SCALE_PER_TILE,
            )
            if UPCAST:
                a = a.to(tl.float32)
            else:
                w = w.to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        route_w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * route_w[:, None]
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


def _pick_config(nk: int, num_experts: int, fmt_gu: QFormat, fmt_d: QFormat, hidden: int, inter: int) -> dict:
    rows_per_expert = nk / max(1, min(num_experts, nk))
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
    return dict(
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K_GU=pick_block_k(fmt_gu, hidden), BLOCK_K_D=pick_block_k(fmt_d, inter),
        num_warps=4, num_stages=3 if block_m < 64 else 2,
    )


def expert_weight_args(w, view=as_bytes):
    """(stored weight as a kernel reads it (`view`), scale, zero), their [E, N, K'] strides, and
    the format's constexprs, of stacked quantized experts; the fused MoE and the decode GEMVs
    (quant_moe_gemv.py, viewing int4/int8 as 32-bit words) both read experts this way."""
    q = view(w.qweight)
    z, (szn, szk) = zero_args(w.zero, w.scale)
    sze = w.zero.stride(0) if w.zero is not None else 0
    strides = (*q.stride(), *w.scale.stride(), sze, szn, szk)
    fmt = w.fmt
    consts = dict(HAS_ZERO=w.zero is not None, ZP=fmt.implicit_zero, SBN=fmt.block_n, SBK=fmt.block_k)
    return (q, w.scale, z), strides, consts


def quant_fused_moe(
    hidden: torch.Tensor,
    gate_up,
    down,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act=F.silu,
    config: dict | None = None,
    align=moe_align,
) -> torch.Tensor:
    """hidden [N, H]; gate_up [E, 2I, H] and down [E, H, I] quantized; topk_* [N, K] -> [N, H]."""
    if act is not F.silu or not available(hidden.device):
        return quant_moe_reference(hidden, gate_up, down, topk_weights, topk_ids, act)
    n, hidden_size = hidden.shape
    num_experts, two_i = gate_up.qweight.shape[:2]
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if n == 0:
        return torch.zeros_like(hidden)
    nk = n * top_k
    cfg = config or _pick_config(nk, num_experts, gate_up.fmt, down.fmt, hidden_size, inter)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    bk_gu = cfg.get("BLOCK_K_GU", cfg.get("BLOCK_K", 64))
    bk_d = cfg.get("BLOCK_K_D", cfg.get("BLOCK_K", 64))
    launch = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    upcast = dot_in_fp32(hidden.dtype)
    precision = dot_precision(torch.float32 if upcast else hidden.dtype)
    sorted_ids, expert_ids = align(topk_ids, num_experts, bm)
    num_m_blocks = expert_ids.numel()

    inter_act = torch.empty(nk, inter, dtype=hidden.dtype, device=hidden.device)
    ptrs, strides, consts = expert_weight_args(gate_up)
    grid = (num_m_blocks * triton.cdiv(inter, bn),)
    _q_gate_up_kernel[grid](
        hidden, *ptrs, inter_act, sorted_ids, expert_ids,
        nk, hidden_size, inter,
        hidden.stride(0), hidden.stride(1), *strides, inter_act.stride(0), inter_act.stride(1),
        **consts, IS_FP8=gate_up.fmt.method == "fp8", INT4=gate_up.fmt.method == "int4",
        SCALE_PER_TILE=scale_per_tile(gate_up.fmt, bk_gu),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk_gu, PRECISION=precision, UPCAST=upcast, **launch,
    )

    out = torch.empty(nk, hidden_size, dtype=torch.float32, device=hidden.device)
    weights = topk_weights.reshape(-1).contiguous()
    ptrs, strides, consts = expert_weight_args(down)
    grid = (num_m_blocks * triton.cdiv(hidden_size, bn),)
    _q_down_kernel[grid](
        inter_act, *ptrs, out, weights, sorted_ids, expert_ids,
        nk, hidden_size, inter,
        inter_act.stride(0), inter_act.stride(1), *strides, out.stride(0), out.stride(1),
        **consts, IS_FP8=down.fmt.method == "fp8", INT4=down.fmt.method == "int4",
        SCALE_PER_TILE=scale_per_tile(down.fmt, bk_d),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk_d, PRECISION=precision, UPCAST=upcast, **launch,
    )
    return out.view(n, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
