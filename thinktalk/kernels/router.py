"""The MoE router's softmax + top-k (+ renormalisation) as one Triton kernel.

`layers.moe.route` is a linear layer followed by softmax, topk, sum, divide and a cast: five small
kernels per MoE layer and step. `softmax_topk` takes the router logits [N, E] and does the rest in
one program per token (E <= a few hundred: the row fits in registers; the top k are found by k
rounds of one max over keys that pack each logit with its index). `softmax_topk_reference` is the
torch code; the chosen experts are the same (ties aside: here the lowest index first) and the
weights equal to float32 rounding.
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
    def _logit_of(key, E_PAD: tl.constexpr):
        """The logit a `routed_experts` key was made of (key: expert bits below the order bits)."""
        order = ((key - (key & (E_PAD - 1))) // E_PAD).to(tl.int32)  # exact: the low bits are gone
        return tl.where(order >= 0, order, order ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def routed_experts(row_ptr, num_experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                       NORMALIZE: tl.constexpr):
        """softmax + top-k of the logits at row_ptr[:num_experts]: (weights [K_PAD] fp32, ids [K_PAD]
        int64), slots past TOP_K zero. Also inlined by the MoE gate-up kernel that reads the router's
        logits itself (norm_gemv._moe_gate_up_norm_kernel), so it is kept to one reduction a round:
        the softmax is monotonic, so the top k are picked on the logits, each packed with its index
        into one int64 key (the float's bits made order-preserving as a signed int, then the
        complement of the index: the lowest index first among equal logits); only the chosen
        logits are exponentiated (and, without NORMALIZE, the whole row once for the softmax's sum)."""
        offs = tl.arange(0, E_PAD)
        x = tl.load(row_ptr + offs, mask=offs < num_experts, other=float("-inf")).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        keys = order.to(tl.int64) * E_PAD + (E_PAD - 1 - offs)
        slots = tl.arange(0, K_PAD)
        chosen = tl.zeros((K_PAD,), dtype=tl.int64)
        top = 0.0
        for i in tl.static_range(TOP_K):
            best = tl.max(keys, axis=0)
            chosen = tl.where(slots == i, best, chosen)
            keys = tl.where(keys == best, -(1 << 62), keys)
            if i == 0:
                top = _logit_of(best, E_PAD)
        ok = slots < TOP_K
        ids = tl.where(ok, E_PAD - 1 - (chosen & (E_PAD - 1)), 0)
        e = tl.where(ok, tl.exp(_logit_of(chosen, E_PAD) - top), 0.0)
        if NORMALIZE:
            weights = e / tl.sum(e, axis=0)
        else:
            weights = e / tl.sum(tl.exp(x - top), axis=0)
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
