"""The MoE router's softmax + top-k (+ renormalisation) as one Triton kernel.

`layers.moe.route` is a linear layer followed by softmax, topk, sum, divide and a cast: five small
kernels per MoE layer and step. `softmax_topk` takes the router logits [N, E] and does the rest in
one program per token (E <= a few hundred: the row fits in registers; the top k are found by k
rounds of argmax). `softmax_topk_reference` is the torch code; the chosen experts are the same
(ties aside) and the weights equal to float32 rounding.
"""

from __future__ import annotations

import torch

from .common import available, pdl_args, triton, wait_prior

if triton is not None:
    import triton.language as tl

__all__ = ["softmax_topk", "softmax_topk_reference", "MAX_EXPERTS"]

MAX_EXPERTS = 1024  # the most router logits one program holds in registers


def softmax_topk_reference(logits: torch.Tensor, top_k: int, normalize: bool):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


if triton is not None:

    @triton.jit
    def routed_experts(row_ptr, num_experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                       NORMALIZE: tl.constexpr):
        """softmax + top-k of the logits at row_ptr[:num_experts]: (weights [K_PAD] fp32, ids [K_PAD]
        int64), slots past TOP_K zero. Also inlined by the MoE gate-up kernel that reads the router's
        logits itself (norm_gemv._moe_gate_up_norm_kernel)."""
        offs = tl.arange(0, E_PAD)
        x = tl.load(row_ptr + offs, mask=offs < num_experts, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, axis=0))
        p = p / tl.sum(p, axis=0)
        slots = tl.arange(0, K_PAD)
        weights = tl.zeros((K_PAD,), dtype=tl.float32)
        ids = tl.zeros((K_PAD,), dtype=tl.int64)
        for i in tl.static_range(TOP_K):
            best = tl.max(p, axis=0)
            idx = tl.min(tl.where(p == best, offs, E_PAD), axis=0)  # the lowest index among ties
            weights = tl.where(slots == i, best, weights)
            ids = tl.where(slots == i, idx.to(tl.int64), ids)
            p = tl.where(offs == idx, -1.0, p)
        if NORMALIZE:
            weights = weights / tl.sum(weights, axis=0)
        return weights, ids

    @triton.jit
    def _softmax_topk_kernel(
        logits_ptr, w_ptr, ids_ptr, stride_l, stride_w, stride_i, num_experts,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        weights, ids = routed_experts(logits_ptr + row * stride_l, num_experts, TOP_K, K_PAD, E_PAD, NORMALIZE)
        slots = tl.arange(0, K_PAD)
        ok = slots < TOP_K
        tl.store(w_ptr + row * stride_w + slots, weights.to(w_ptr.dtype.element_ty), mask=ok)
        tl.store(ids_ptr + row * stride_i + slots, ids, mask=ok)


def softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool):
    """Triton version of `softmax_topk_reference`: (weights [N, k] in logits' dtype, ids [N, k] int64)."""
    n, num_experts = logits.shape
    if not available(logits.device) or num_experts > MAX_EXPERTS or logits.stride(-1) != 1:
        return softmax_topk_reference(logits, top_k, normalize)
    weights = torch.empty(n, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    if n:
        _softmax_topk_kernel[(n,)](
            logits, weights, ids, logits.stride(0), weights.stride(0), ids.stride(0), num_experts,
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(num_experts),
            NORMALIZE=normalize, num_warps=1, **pdl_args(logits.device),
        )
    return weights, ids
