"""SiLU-and-multiply of a gated MLP as one Triton kernel.

A SwiGLU block computes down(silu(gate(x)) * up(x)). With gate and up as one GEMM
(`layers.mlp.fuse_gate_up`) the [N, 2I] product holds gate then up; `silu_mul` turns it into
[N, I] in one kernel where torch takes two (silu, then the multiply). The code predictor runs
this 75 times per speech frame, the talker's shared expert 20 times.

Numerics follow torch's: silu computed in float32 and rounded to the input dtype, the product
computed in float32 from the two rounded operands and rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import available, pdl_args, triton, wait_prior

if triton is not None:
    import triton.language as tl

__all__ = ["silu_mul", "silu_mul_reference"]


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate columns first) -> silu(gate) * up [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(src_ptr, out_ptr, inter, stride_s, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        wait_prior(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        dt = out_ptr.dtype.element_ty
        gate = tl.load(src_ptr + row * stride_s + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(src_ptr + row * stride_s + inter + offs, mask=ok, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (act * up).to(dt), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_mul_reference` (same argument, same result to rounding)."""
    if not available(gate_up.device) or gate_up.dim() != 2 or gate_up.stride(-1) != 1 or gate_up.shape[-1] % 2:
        return silu_mul_reference(gate_up)
    n, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block, num_warps=4, **pdl_args(gate_up.device))
    return out
