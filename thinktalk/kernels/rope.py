"""The attention's q/k RMSNorm and rotary embedding as one Triton kernel.

Qwen3 normalises every query and key head (q_norm, k_norm) and then rotates it. In torch that is
~6 kernels per norm and ~6 per rotation (casts, rotate_half's slices and cat, multiplies, add):
~24 launches per layer for a one-token decode. `qk_norm_rope` runs one program per (token, head)
of q and k together.

Numerics follow `layers.attention.Attention` (RMSNorm as layers/norm.py, then
`layers.rotary.apply_rotary`: cos/sin rounded to the input dtype, each product and the sum rounded
to it, as torch's bf16 ops do). `qk_norm_rope_reference` is that torch code.
"""

from __future__ import annotations

import torch

from ..layers.rotary import apply_rotary
from .common import available, triton
from .rms_norm import rms_norm_reference

if triton is not None:
    import triton.language as tl

__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps: float):
    """q [N, Hq, D], k [N, Hk, D]; cos/sin [N, D] float32 -> rotated, normalised (q, k)."""
    q = rms_norm_reference(q, q_weight, eps)
    k = rms_norm_reference(k, k_weight, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


if triton is not None:

    @triton.jit
    def _norm_rope_head(src, dst, w_ptr, cos_ptr, sin_ptr, eps, HALF: tl.constexpr):
        offs = tl.arange(0, HALF)
        dt = dst.dtype.element_ty
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + HALF + offs).to(tl.float32)
        var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
        rs = tl.rsqrt(var + eps)
        w1 = tl.load(w_ptr + offs).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
        n1 = (w1 * (x1 * rs).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        n2 = (w2 * (x2 * rs).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        c1 = tl.load(cos_ptr + offs).to(dt).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + offs).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + offs).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + offs).to(dt).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each op rounded like torch's
        o1 = (n1 * c1).to(dt).to(tl.float32) + (-n2 * s1).to(dt).to(tl.float32)
        o2 = (n2 * c2).to(dt).to(tl.float32) + (n1 * s2).to(dt).to(tl.float32)
        tl.store(dst + offs, o1.to(dt))
        tl.store(dst + HALF + offs, o2.to(dt))

    @triton.jit
    def _qk_norm_rope_kernel(
        q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_c, stride_s,
        stride_qon, stride_qoh, stride_kon, stride_koh,
        num_q_heads, eps,
        HALF: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cos = cos_ptr + tok * stride_c
        sin = sin_ptr + tok * stride_s
        if head < num_q_heads:
            _norm_rope_head(q_ptr + tok * stride_qn + head * stride_qh, qo_ptr + tok * stride_qon + head * stride_qoh,
                            qw_ptr, cos, sin, eps, HALF)
        else:
            h = head - num_q_heads
            _norm_rope_head(k_ptr + tok * stride_kn + h * stride_kh, ko_ptr + tok * stride_kon + h * stride_koh,
                            kw_ptr, cos, sin, eps, HALF)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float):
    """Triton version of `qk_norm_rope_reference` (same arguments, same result to rounding)."""
    head_dim = q.shape[-1]
    if (not available(q.device) or head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1)
            or q.stride(-1) != 1 or k.stride(-1) != 1 or q_weight.dtype != q.dtype):
        return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
    n, hq, _ = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    if n:
        _qk_norm_rope_kernel[(n, hq + hk)](
            q, k, q_weight, k_weight, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            hq, eps, HALF=head_dim // 2, num_warps=1,
        )
    return q_out, k_out
