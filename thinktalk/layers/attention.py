"""Causal self-attention shared by the thinker, the talker and the code predictor.

Tokens of a batch are packed along one axis ([N, hidden], no padding). Where the keys and values
live is the business of an `AttentionBackend` passed in by the caller: the reference
`ContiguousKV` below keeps one growing tensor per sequence and layer; the engine's paged KV cache
implements the same `attend` method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.rope import qk_norm_rope_reference
from .quant_linear import apply_linear, stack_linears
from .norm import RMSNorm


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] for the new tokens of every sequence -> [N, Hq, D]."""


class Attention(nn.Module):
    # q/k RMSNorm + rotary; the engine swaps in the fused Triton kernel (kernels/rope.py) on GPU
    qk_kernel = staticmethod(qk_norm_rope_reference)
    # q, k and v projections in one GEMM: set by `fuse_qkv` (their weights become views of it);
    # quantized projections: one QuantLinear over their stacked rows instead
    qkv_weight: torch.Tensor | None = None
    qkv_proj: nn.Module | None = None
    # the product of the fused q/k/v weight and of a plain o_proj; the engine swaps in
    # kernels/gemv.linear (GEMVs for the few rows of a decode step) on GPU
    linear_fn = staticmethod(F.linear)

    def __init__(
        self,
        layer: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_norm_eps: float = 1e-6,
        bias: bool = False,
    ):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: AttentionBackend) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.output(kv.attend(self.layer, q, k, v, self.scale))

    def project(self, x: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, store=None,
                qkv: torch.Tensor | None = None):
        """The per-token part before attention: q [N, Hq, D], k/v [N, Hkv, D], normed and rotated.
        store: (k_cache, v_cache, slots) of a backend that lets the q/k kernel write the new keys
        and values into its cache (`store_target`), then attends with `attend_stored`.
        qkv: the fused q/k/v product already computed (x is then unused: the decoder layer's
        norm_linear_fn made it from the un-normed input)."""
        if qkv is not None or self.qkv_weight is not None or self.qkv_proj is not None:
            if qkv is None:
                qkv = self.linear_fn(x, self.qkv_weight) if self.qkv_weight is not None else self.qkv_proj(x)
            n = qkv.shape[0]
            q, k, v = qkv.split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        else:
            n = x.shape[0]
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if store is not None:
            q, k = self.qk_kernel(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps, v, store)
        else:
            q, k = self.qk_kernel(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps)
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """The per-token part after attention: attn [N, Hq, D] -> o_proj [N, hidden]."""
        return apply_linear(self.o_proj, attn.reshape(attn.shape[0], self.num_heads * self.head_dim), self.linear_fn)


def fuse_qkv(attn: Attention) -> bool:
    """Stack q/k/v_proj's weights into one tensor, theirs becoming views of it (no extra memory),
    so the three projections are one GEMM. Plain bias-free Linears of one dtype, or QuantLinears
    of one format (`stack_quant_linears`: one quantized GEMV at decode instead of three launches).
    Returns whether it fused."""
    if attn.qkv_weight is not None or attn.qkv_proj is not None:
        return True
    stack = stack_linears((attn.q_proj, attn.k_proj, attn.v_proj))
    if isinstance(stack, torch.Tensor):
        attn.qkv_weight = stack
    elif stack is not None:
        object.__setattr__(attn, "qkv_proj", stack)  # not a submodule: state dicts keep q/k/v_proj
    return stack is not None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [Lq, Hq, D] are the last Lq positions of k/v [Lk, Hkv, D]. Returns [Lq, Hq, D]."""
    lq, lk = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)[None]
    kh = k.transpose(0, 1).repeat_interleave(groups, dim=0)[None]
    vh = v.transpose(0, 1).repeat_interleave(groups, dim=0)[None]
    if lq == 1:
        mask = None
    else:
        # query i sits at absolute position lk - lq + i and sees keys up to there
        rows = torch.arange(lk - lq, lk, device=q.device)[:, None]
        mask = torch.arange(lk, device=q.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


@dataclass
class SequenceKV:
    """Keys and values of one sequence, one [L, Hkv, D] tensor per layer (reference path)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[0] if self.keys else 0

    def truncate(self, length: int) -> None:
        for store in (self.keys, self.values):
            for layer in store:
                store[layer] = store[layer][:length]


class ContiguousKV:
    """Reference attention backend: a batch of sequences, each with its own growing SequenceKV."""

    def __init__(self, caches: list[SequenceKV], new_lens: list[int]):
        self.caches, self.new_lens = caches, new_lens

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        outs, start = [], 0
        for cache, n in zip(self.caches, self.new_lens):
            end = start + n
            if layer in cache.keys:
                cache.keys[layer] = torch.cat([cache.keys[layer], k[start:end]])
                cache.values[layer] = torch.cat([cache.values[layer], v[start:end]])
            else:
                cache.keys[layer], cache.values[layer] = k[start:end], v[start:end]
            outs.append(causal_attention(q[start:end], cache.keys[layer], cache.values[layer], scale))
            start = end
        return torch.cat(outs)
