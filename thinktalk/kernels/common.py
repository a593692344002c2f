"""What the Triton kernels share: where they can run, and the interpreter's bf16 workaround."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


# Read once, when the kernel modules are imported: that is when @triton.jit decides between the
# compiler and the CPU interpreter, so setting the variable later changes nothing.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRET


def available(device: torch.device | str) -> bool:
    """True where the Triton kernels can run: CUDA, or anywhere under TRITON_INTERPRET=1."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands must be upcast to fp32 first.

    Triton's CPU interpreter keeps bf16 data as raw uint16 and multiplies those integers in
    `tl.dot` (triton 3.8), so under TRITON_INTERPRET=1 the kernels upcast bf16 tiles; compiled
    kernels always multiply in the input dtype on the tensor cores.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE products, not TF32, so results are comparable with the torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"
