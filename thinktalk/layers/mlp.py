"""Gated (SwiGLU) feed-forward block."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.activation import silu_mul_reference
from .quant_linear import apply_linear, stack_linears

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    # gate and up projections in one GEMM: set by `fuse_gate_up` (their weights become views of it),
    # followed by `act_mul_kernel` (SiLU-and-multiply; the engine swaps in kernels/activation.py's
    # Triton kernel on GPU)
    gate_up_weight: torch.Tensor | None = None
    gate_up_proj: nn.Module | None = None  # quantized projections: one QuantLinear over both
    act_mul_kernel = staticmethod(silu_mul_reference)
    # the fused gate/up product and a plain down_proj's; the engine swaps in kernels/gemv.linear
    linear_fn = staticmethod(F.linear)

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None or self.gate_up_proj is not None:
            x2 = x.reshape(-1, x.shape[-1])
            gate_up = self.linear_fn(x2, self.gate_up_weight) if self.gate_up_weight is not None else self.gate_up_proj(x2)
            return apply_linear(self.down_proj, self.act_mul_kernel(gate_up).view(*x.shape[:-1], -1), self.linear_fn)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def fuse_gate_up(mlp: GatedMLP) -> bool:
    """Stack gate_proj's and up_proj's weights into one tensor, theirs becoming views of it (no
    extra memory), so the two projections are one GEMM. Only SiLU blocks of plain bias-free
    Linears of one dtype, or QuantLinears of one format (`stack_quant_linears`). Returns whether
    it fused."""
    if mlp.gate_up_weight is not None or mlp.gate_up_proj is not None:
        return True
    if mlp.act is not F.silu:
        return False
    stack = stack_linears((mlp.gate_proj, mlp.up_proj))
    if isinstance(stack, torch.Tensor):
        mlp.gate_up_weight = stack
    elif stack is not None:
        object.__setattr__(mlp, "gate_up_proj", stack)  # not a submodule: state dicts keep the parts
    return stack is not None
