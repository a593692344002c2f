"""RMSNorm as Qwen3 computes it: statistics in float32, scale applied in the input dtype.

The math lives in kernels/rms_norm.py (the torch reference and a fused Triton kernel with the same
signature); the engine swaps `kernel`/`add_kernel` on the instances for the Triton ones on GPU.
"""

import torch
from torch import nn

from ..kernels.rms_norm import add_rms_norm_reference, rms_norm_reference


class RMSNorm(nn.Module):
    kernel = staticmethod(rms_norm_reference)
    add_kernel = staticmethod(add_rms_norm_reference)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the norm after it, fused."""
        return self.add_kernel(x, residual, self.weight, self.eps)
