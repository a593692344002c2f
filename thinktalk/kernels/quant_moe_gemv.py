"""Quantized fused MoE for a few tokens (decode) as GEMVs over the selected experts only.

`quant_moe_gemv` has the signature of `layers.moe.moe_reference` / `quant_moe.quant_fused_moe`
(gate_up [E, 2I, H] and down [E, H, I] quantized: anything with .qweight / .scale / .zero / .fmt /
.in_features). At one decode token each (token, slot) pair multiplies one row by one expert: the
grouped-GEMM tiles of quant_moe.py pad that row to 16 and spread an expert's I = 768 columns over
a dozen programs. Here, with quant_gemv.py's dequantizing chunk loop:

1. gate_up: one program per ((token, slot) pair, BLOCK_N rows of I). It reads the pair's expert
   id straight from topk_ids (no sort by expert, no host sync), the BLOCK_N gate rows and the
   BLOCK_N up rows of that expert, and writes SiLU(gate) * up for the pair ([N*K, I], the input
   dtype): the [N*K, 2I] product never reaches memory.
2. down: one program per (token, BLOCK_N rows of H) loops over the token's K slots and the K
   steps of I as one loop (so loads of the next slot's expert are in flight while this one is
   summed), scales each slot's product by its routing weight and writes the sum over the slots
   (fp32 accumulation, fixed order: deterministic) straight into the [N, H] output: no [N, K, H]
   buffer, no atomics, no reduction kernel after it.

Only the selected experts' rows are read. A token's pairs each read their expert, so two tokens
sharing an expert read it twice: fine for the few tokens of a decode step (GEMV_MAX_TOKENS); past
that the grouped GEMM of quant_moe.py (one read per expert block, tensor cores) wins.

The pure-torch reference with the same signature is `quant_moe.quant_moe_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import available, pdl_args, triton, wait_prior
from .quant_gemv import (
    DEFAULT_STAGES, _load_scales, _step_dot, chunk_consts, gemv_supported, packed_words, rows_per_program,
    step_columns, warps_for,
)
from .quant_moe import expert_weight_args, quant_moe_reference

if triton is not None:
    import triton.language as tl

__all__ = ["quant_moe_gemv", "quant_moe_gemv_reference", "moe_gemv_config", "moe_gemv_supported", "GEMV_MAX_TOKENS"]

# Tokens up to which the quantized MoE layer takes these kernels (layers/quant_linear.py): a decode
# step of up to 8 sequences, i.e. up to 64 (token, slot) pairs at the thinker's top-8.
GEMV_MAX_TOKENS = 8

quant_moe_gemv_reference = quant_moe_reference  # same signature and result


if triton is not None:

    @triton.jit
    def _moe_gate_up_gemv_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr,
        hidden_size, inter_size, hidden_q,
        stride_xm, stride_xk,
        stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
        stride_om, stride_on,
        FMT: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, GK: tl.constexpr,
        SCALES: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        BK: tl.constexpr = G * GK
        pair = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_row = x_ptr + (pair // TOP_K) * stride_xm
        q_e = q_ptr + expert * stride_qe
        s_e = s_ptr + expert * stride_se
        z_e = z_ptr + expert * stride_ze
        offs_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_u = offs_g + inter_size  # the up rows follow the gate rows
        n_ok = offs_g < inter_size
        steps = tl.cdiv(hidden_size, BK)
        if SCALES == "row":
            g_scale, g_zero = _load_scales(s_e, z_e, offs_g, n_ok, 0, hidden_size, stride_sn, stride_sk, stride_zn,
                                           stride_zk, HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
            u_scale, u_zero = _load_scales(s_e, z_e, offs_u, n_ok, 0, hidden_size, stride_sn, stride_sk, stride_zn,
                                           stride_zk, HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
        else:
            g_scale_next, g_zero_next = _load_scales(
                s_e, z_e, offs_g, n_ok, 0, hidden_size, stride_sn, stride_sk, stride_zn, stride_zk,
                HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
            u_scale_next, u_zero_next = _load_scales(
                s_e, z_e, offs_u, n_ok, 0, hidden_size, stride_sn, stride_sk, stride_zn, stride_zk,
                HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
        acc_g = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
        for step in tl.range(0, steps, num_stages=STAGES):
            k0 = step * BK
            if SCALES != "row":  # a step ahead by hand (see quant_gemv._gemv_kernel)
                g_scale, g_zero, u_scale, u_zero = g_scale_next, g_zero_next, u_scale_next, u_zero_next
                ahead = n_ok & (step + 1 < steps)
                g_scale_next, g_zero_next = _load_scales(
                    s_e, z_e, offs_g, ahead, k0 + BK, hidden_size, stride_sn, stride_sk, stride_zn, stride_zk,
                    HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
                u_scale_next, u_zero_next = _load_scales(
                    s_e, z_e, offs_u, ahead, k0 + BK, hidden_size, stride_sn, stride_sk, stride_zn, stride_zk,
                    HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
            acc_g = _step_dot(acc_g, x_row, 0, stride_xk, 1, q_e, stride_qn, stride_qk, offs_g, n_ok, k0, hidden_size,
                              hidden_q, g_scale, g_zero, FMT, HAS_ZERO, ZP, G, GK, EVEN_K, 1, ASM)
            acc_u = _step_dot(acc_u, x_row, 0, stride_xk, 1, q_e, stride_qn, stride_qk, offs_u, n_ok, k0, hidden_size,
                              hidden_q, u_scale, u_zero, FMT, HAS_ZERO, ZP, G, GK, EVEN_K, 1, ASM)
        gate = tl.sum(acc_g, axis=1)
        h = gate * tl.sigmoid(gate) * tl.sum(acc_u, axis=1)  # silu(gate) * up
        tl.store(out_ptr + pair * stride_om + offs_g * stride_on, h.to(out_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _moe_down_gemv_kernel(
        a_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, weights_ptr, out_ptr,
        hidden_size, inter_size, inter_q, k_steps,
        stride_am, stride_ak,
        stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
        stride_om, stride_on,
        FMT: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
        TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, GK: tl.constexpr,
        SCALES: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior(USE_PDL)
        BK: tl.constexpr = G * GK
        token = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden_size
        total = TOP_K * k_steps
        # the token's experts and routing weights, loaded once: in the loop an iteration's expert
        # is picked from registers, so the weight addresses of later iterations follow from the
        # loop index alone and Triton's pipeliner can load them ahead (an expert id loaded in the
        # loop made every iteration wait for its own weights)
        slots = tl.arange(0, SLOTS)
        experts = tl.load(ids_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=0).to(tl.int64)
        routes = tl.load(weights_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=0.0).to(tl.float32)
        # iteration it + 1's scales are loaded during iteration it (by hand, see quant_gemv)
        expert_next = tl.sum(tl.where(slots == 0, experts, 0))
        scale_next, zero_next = _load_scales(
            s_ptr + expert_next * stride_se, z_ptr + expert_next * stride_ze, offs_n, n_ok, 0, inter_size,
            stride_sn, stride_sk, stride_zn, stride_zk, HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
        acc = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
        for it in tl.range(0, total, num_stages=STAGES):  # (slot, K step) as one loop: pipelined across slots
            slot = it // k_steps
            k0 = (it - slot * k_steps) * BK
            pair = token * TOP_K + slot
            expert = tl.sum(tl.where(slots == slot, experts, 0))
            route_w = tl.sum(tl.where(slots == slot, routes, 0.0))
            scale, zero = scale_next, zero_next
            nxt = it + 1
            slot_next = nxt // k_steps
            expert_next = tl.sum(tl.where(slots == slot_next, experts, 0))
            scale_next, zero_next = _load_scales(
                s_ptr + expert_next * stride_se, z_ptr + expert_next * stride_ze, offs_n, n_ok & (nxt < total),
                (nxt - slot_next * k_steps) * BK, inter_size, stride_sn, stride_sk, stride_zn, stride_zk,
                HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
            # the routing weight rides on the scale (both multiply the per-group sums)
            acc = _step_dot(acc, a_ptr + pair * stride_am, 0, stride_ak, 1, q_ptr + expert * stride_qe,
                            stride_qn, stride_qk, offs_n, n_ok, k0, inter_size, inter_q, scale * route_w, zero,
                            FMT, HAS_ZERO, ZP, G, GK, EVEN_K, 1, ASM)
        tl.store(out_ptr + token * stride_om + offs_n * stride_on, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty),
                 mask=n_ok)


def moe_gemv_supported(gate_up, down) -> bool:
    """Both stacked weights in a layout the GEMV kernels read (quant_gemv.gemv_supported)."""
    return gemv_supported(gate_up.fmt, gate_up.in_features) and gemv_supported(down.fmt, down.in_features)


def moe_gemv_config(tokens: int, top_k: int, hidden: int, inter: int, method: str) -> dict:
    """gate_up: programs = pairs x I / BLOCK_N; down: tokens x H / BLOCK_N (see quant_gemv)."""
    bk_gu, bk_d = step_columns(hidden, method), step_columns(inter, method)
    bn_gu = rows_per_program(tokens * top_k, inter)
    bn_d = rows_per_program(tokens, hidden)
    return dict(
        BLOCK_N_GU=bn_gu, BLOCK_K_GU=bk_gu, num_warps_gu=warps_for(2 * bn_gu, bk_gu, method),
        BLOCK_N_D=bn_d, BLOCK_K_D=bk_d, num_warps_d=warps_for(bn_d, bk_d, method), num_stages=DEFAULT_STAGES,
    )


def quant_moe_gemv(
    hidden: torch.Tensor,
    gate_up,
    down,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act=F.silu,
    config: dict | None = None,
) -> torch.Tensor:
    """hidden [N, H] (N small); gate_up [E, 2I, H] and down [E, H, I] quantized; topk_* [N, K] -> [N, H]."""
    n, hidden_size = hidden.shape
    inter = gate_up.qweight.shape[1] // 2
    if act is not F.silu or not available(hidden.device) or not moe_gemv_supported(gate_up, down):
        return quant_moe_reference(hidden, gate_up, down, topk_weights, topk_ids, act)
    top_k = topk_ids.shape[1]
    if n == 0:
        return torch.zeros_like(hidden)
    cfg = config or moe_gemv_config(n, top_k, hidden_size, inter, gate_up.fmt.method)
    return run_moe_gemv(hidden, topk_weights, topk_ids, inter, cfg, _quant_args(gate_up, hidden_size),
                        _quant_args(down, inter))


def _quant_args(w, k: int):
    """run_moe_gemv's view of stacked quantized experts with K = k input columns."""
    def args(block_k: int):
        ptrs, strides, consts = expert_weight_args(w, lambda q: packed_words(q, w.fmt))
        return ptrs, strides, ptrs[0].shape[-1], {**consts, **chunk_consts(w.fmt, k, block_k)}
    return args


def run_moe_gemv(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, inter: int, cfg: dict,
                 gate_up_args, down_args) -> torch.Tensor:
    """The two kernels for hidden [N, H] -> [N, H] (N > 0). gate_up_args / down_args(block_k):
    the stacked weight as the kernels read it in steps of block_k columns: (weight, scale, zero)
    pointers, their nine [E, N, K] strides, stored elements per row, and the format's and the
    chunk's constexprs (quantized here, unquantized in kernels/gemv.py)."""
    n, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    stages = cfg.get("num_stages", DEFAULT_STAGES)
    pdl = pdl_args(hidden.device)
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    nk = ids.numel()

    bk, bn = cfg["BLOCK_K_GU"], cfg["BLOCK_N_GU"]
    inter_act = torch.empty(nk, inter, dtype=hidden.dtype, device=hidden.device)
    ptrs, strides, stored_k, consts = gate_up_args(bk)
    _moe_gate_up_gemv_kernel[(nk, triton.cdiv(inter, bn))](
        hidden, *ptrs, ids, inter_act,
        hidden_size, inter, stored_k,
        hidden.stride(0), hidden.stride(1), *strides, inter_act.stride(0), inter_act.stride(1),
        **consts, TOP_K=top_k, BLOCK_N=bn, STAGES=stages, num_warps=cfg.get("num_warps_gu", 4),
        **pdl,
    )

    return run_moe_down(inter_act, weights, ids, n, top_k, hidden_size, inter, cfg, down_args, pdl)


def run_moe_down(inter_act: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, n: int, top_k: int,
                 hidden_size: int, inter: int, cfg: dict, down_args, pdl: dict) -> torch.Tensor:
    """The down kernel alone: inter_act [n * top_k, I] (SiLU(gate) * up per pair), the flat
    routing weights and expert ids [n * top_k] -> [n, H] in inter_act's dtype."""
    bk, bn = cfg["BLOCK_K_D"], cfg["BLOCK_N_D"]
    out = torch.empty(n, hidden_size, dtype=inter_act.dtype, device=inter_act.device)
    ptrs, strides, stored_k, consts = down_args(bk)
    _moe_down_gemv_kernel[(n, triton.cdiv(hidden_size, bn))](
        inter_act, *ptrs, ids, weights, out,
        hidden_size, inter, stored_k, triton.cdiv(inter, bk),
        inter_act.stride(0), inter_act.stride(1), *strides, out.stride(0), out.stride(1),
        **consts, TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k), BLOCK_N=bn,
        STAGES=cfg.get("num_stages", DEFAULT_STAGES), num_warps=cfg.get("num_warps_d", 4), **pdl,
    )
    return out
