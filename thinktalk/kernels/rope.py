"""The attention's q/k RMSNorm and rotary embedding as one Triton kernel.

Qwen3 normalises every query and key head (q_norm, k_norm) and then rotates it. In torch that is
~6 kernels per norm and ~6 per rotation (casts, rotate_half's slices and cat, multiplies, add):
~24 launches per layer for a one-token decode. `qk_norm_rope` runs one program per (token, head)
of q and k together.

With `store=(k_cache, v_cache, slots)` (caches flat [slots, Hk, D]) the same kernel also writes
the rotated keys and the values into the KV cache at the tokens' slots: in a decode step that
saves the cache's two index_copy kernels per layer.

Numerics follow `layers.attention.Attention` (RMSNorm as layers/norm.py, then
`layers.rotary.apply_rotary`: cos/sin rounded to the input dtype, each product and the sum rounded
to it, as torch's bf16 ops do). `qk_norm_rope_reference` is that torch code.
"""

from __future__ import annotations

import torch

from ..layers.rotary import apply_rotary
from .common import available, pdl_args, triton, wait_prior
from .rms_norm import rms_norm_reference

if triton is not None:
    import triton.language as tl

__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps: float, v=None, store=None):
    """q [N, Hq, D], k [N, Hk, D]; cos/sin [N, D] float32 -> rotated, normalised (q, k).
    store: (k_cache, v_cache [S, Hk, D], slots [N] long): also write k (rotated) and v there."""
    q = rms_norm_reference(q, q_weight, eps)
    k = rms_norm_reference(k, k_weight, eps)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if store is not None:
        k_cache, v_cache, slots = store
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
    return q, k


if triton is not None:

    @triton.jit
    def _norm_rope_head(src, dst, w_ptr, cos_ptr, sin_ptr, eps, HALF: tl.constexpr, cache, STORE: tl.constexpr):
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
        if STORE:
            ct = cache.dtype.element_ty
            tl.store(cache + offs, o1.to(dt).to(ct))
            tl.store(cache + HALF + offs, o2.to(dt).to(ct))

    @triton.jit
    def _qk_norm_rope_kernel(
        q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_c, stride_s,
        stride_qon, stride_qoh, stride_kon, stride_koh,
        num_q_heads, num_k_heads, eps,
        v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_vn, stride_vh, stride_cs, stride_ch,
        HALF: tl.constexpr, STORE: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cos = cos_ptr + tok * stride_c
        sin = sin_ptr + tok * stride_s
        if head < num_q_heads:
            _norm_rope_head(q_ptr + tok * stride_qn + head * stride_qh, qo_ptr + tok * stride_qon + head * stride_qoh,
                            qw_ptr, cos, sin, eps, HALF, qo_ptr, False)
        elif head < num_q_heads + num_k_heads:
            h = head - num_q_heads
            if STORE:
                slot = tl.load(slots_ptr + tok).to(tl.int64)
                _norm_rope_head(k_ptr + tok * stride_kn + h * stride_kh, ko_ptr + tok * stride_kon + h * stride_koh,
                                kw_ptr, cos, sin, eps, HALF, kc_ptr + slot * stride_cs + h * stride_ch, True)
            else:
                _norm_rope_head(k_ptr + tok * stride_kn + h * stride_kh, ko_ptr + tok * stride_kon + h * stride_koh,
                                kw_ptr, cos, sin, eps, HALF, ko_ptr, False)
        else:  # (STORE only) copy a value head into the cache
            h = head - num_q_heads - num_k_heads
            slot = tl.load(slots_ptr + tok).to(tl.int64)
            offs = tl.arange(0, 2 * HALF)
            vals = tl.load(v_ptr + tok * stride_vn + h * stride_vh + offs)
            tl.store(vc_ptr + slot * stride_cs + h * stride_ch + offs, vals.to(vc_ptr.dtype.element_ty))


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float, v=None, store=None):
    """Triton version of `qk_norm_rope_reference` (same arguments, same result to rounding)."""
    head_dim = q.shape[-1]
    if (not available(q.device) or head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1)
            or q.stride(-1) != 1 or k.stride(-1) != 1 or q_weight.dtype != q.dtype
            or (store is not None and (v.stride(-1) != 1 or store[0].stride(-1) != 1 or store[0].stride() != store[1].stride()))):
        return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, v, store)
    n, hq, _ = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    if store is not None:
        k_cache, v_cache, slots = store
        extra = (v, k_cache, v_cache, slots, v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1))
    else:
        extra = (q, q, q, q, 0, 0, 0, 0)  # unused
    if n:
        _qk_norm_rope_kernel[(n, hq + hk + (hk if store is not None else 0))](
            q, k, q_weight, k_weight, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            hq, hk, eps, *extra, HALF=head_dim // 2, STORE=store is not None, num_warps=1,
            **pdl_args(q.device),
        )
    return q_out, k_out
