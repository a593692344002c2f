"""Sparse mixture-of-experts block shared by the thinker and the talker.

Experts are stored stacked (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) so a
fused grouped-GEMM kernel can read them directly; the checkpoint's per-expert tensors are packed
into these on load (see weights/names.py). The talker adds a sigmoid-gated shared expert.

`moe_reference` is the pure-torch path: it visits experts in index order and accumulates with
index_add_, the same order of floating-point operations as the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.router import softmax_topk_reference
from .mlp import ACTIVATIONS, GatedMLP


def route(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int, normalize: bool, topk_fn=softmax_topk_reference,
          linear_fn=F.linear):
    """Softmax router: returns (top-k weights in hidden's dtype, top-k expert ids)."""
    return topk_fn(linear_fn(hidden, router_weight), top_k, normalize)


def moe_reference(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act=F.silu,
) -> torch.Tensor:
    """hidden [N, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; topk_* [N, K] -> [N, H]."""
    out = torch.zeros_like(hidden)
    num_experts = gate_up_proj.shape[0]
    hit = torch.bincount(topk_ids.flatten(), minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        token_idx, slot = torch.where(topk_ids == e)
        x = hidden[token_idx]
        gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, down_proj[e]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))


class SparseMoE(nn.Module):
    # Swapped by the engine for the fused Triton kernel on GPU; same signature as moe_reference.
    experts_fn = staticmethod(moe_reference)
    topk_fn = staticmethod(softmax_topk_reference)  # router softmax + top-k; Triton: kernels/router.py
    linear_fn = staticmethod(F.linear)  # the router's product; GPU: kernels/gemv.linear

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        shared_expert_intermediate_size: int = 0,
        act: str = "silu",
    ):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.act = ACTIVATIONS[act]
        self.gate = Router(num_experts, hidden_size)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size)
        if shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size, act)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(x, self.gate.weight, self.top_k, self.norm_topk_prob, self.topk_fn, self.linear_fn)
        out = self.experts_fn(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids, self.act)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
