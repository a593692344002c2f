"""RMSNorm, optionally fused with the residual add before it, as one Triton kernel per call.

In a decode step the norms are tiny (a few rows of 2,048) and the torch version is six kernels
(cast, square, mean, rsqrt, two multiplies); at 4 norms x 48 layers that was ~1,100 launches of a
one-token step. `rms_norm` does it in one program per row. `add_rms_norm` also adds the residual
first and returns the sum (the new residual stream), as the decoder layer needs both.

Numerics follow `layers.norm.RMSNorm`: the sum is rounded to the input dtype (as torch's add),
statistics in float32, the normalised row rounded to the input dtype, then multiplied by the
weight in that dtype. Only the order of the sum of squares differs from torch's reduction.
`rms_norm_reference` / `add_rms_norm_reference` are the torch versions (CPU, and test oracles).
"""

from __future__ import annotations

import torch

from .common import available, pdl_args, triton, wait_prior_next_first

if triton is not None:
    import triton.language as tl

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_reference", "add_rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual)."""
    total = residual + x
    return rms_norm_reference(total, weight, eps), total


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
        stride_x, stride_r, stride_o, stride_s,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior_next_first(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        y = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        out = w.to(tl.float32) * y.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    shape, n_cols = x.shape, x.shape[-1]
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        res = residual.reshape(-1, n_cols)
        if res.stride(-1) != 1:
            res = res.contiguous()
        total = torch.empty_like(rows)
    else:
        res, total = rows, out  # unused
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, out, total,
            rows.stride(0), res.stride(0), out.stride(0), total.stride(0),
            n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols),
            num_warps=4 if n_cols >= 1024 else 1, **pdl_args(x.device),
        )
    return out.view(shape), (total.view(shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of `rms_norm_reference` (over the last axis of any shape)."""
    if not available(x.device):
        return rms_norm_reference(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton version of `add_rms_norm_reference`."""
    if not available(x.device):
        return add_rms_norm_reference(x, residual, weight, eps)
    return _launch(x, residual, weight, eps)
