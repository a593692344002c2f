"""Decode GEMVs for unquantized (bf16 / fp16 / fp32) weights: dense linears and the fused MoE.

A decode step of one to eight sequences multiplies a few rows by every weight once, so it is bound
by reading the weights. cuBLAS handles these shapes with tensor-core tiles padded to 8..64 rows and
split-K plus a reduction kernel for the narrow ones (the thinker's o_proj, 2048 x 4096: two
launches, ~1.6 TB/s on an H100), and the grouped-GEMM fused MoE (fused_moe.py) pads each
(token, slot) pair to a 16-row tile and sums the slots in a third kernel. The weight-only GEMVs of
quant_gemv.py / quant_moe_gemv.py already stream a weight at the memory's speed for a few rows
(one program per few output rows, the K loop pipelined, products summed on the CUDA cores in
fp32); here they run with FMT "float" (the weight's elements read as they are, no scales):

    gemv(x, weight, bias)                     x [M, K] @ weight[N, K]^T (+ bias), M <= 16
    moe_gemv(hidden, gate_up, down, w, ids)   the signature of layers.moe.moe_reference: gate_up
                                              writes SiLU(gate) * up per pair, down sums a token's
                                              slots (routing-weighted, fixed order) in one kernel

`linear` and `experts` are what the engine installs (`Attention.linear_fn`, `GatedMLP.linear_fn`,
`SparseMoE.linear_fn` / `experts_fn`): the GEMVs up to 2 rows (8 for a narrow weight such as the
router's) / GEMV_MAX_TOKENS tokens, F.linear / the grouped fused MoE beyond. Pure-torch
references with the same signatures: `gemv_reference` (F.linear) and `moe_reference`. Shapes alone
decide every allocation and launch, so all of it is captured in the decode CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.moe import moe_reference
from .common import available, pdl_args, triton
from .fused_moe import fused_moe
from .quant_gemv import DEFAULT_STAGES, GEMV_MAX_M, _gemv_kernel, _split_sum_kernel, columns_per_step, rows_per_program
from .quant_moe_gemv import GEMV_MAX_TOKENS, run_moe_gemv

__all__ = ["gemv", "gemv_reference", "moe_gemv", "moe_reference", "linear", "experts", "gemv_config",
           "moe_gemv_config", "GEMV_MAX_M", "GEMV_MAX_TOKENS"]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

gemv_reference = F.linear  # same signature and result (up to the order of fp32 sums)


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A float weight of x's dtype whose rows are contiguous, on a device the kernels run on."""
    return (weight.dtype in FLOAT_DTYPES and x.dtype == weight.dtype and weight.stride(-1) == 1
            and available(x.device))


def step_columns(k: int, elem_bytes: int, row_bytes: int = 512) -> int:
    """BLOCK_K: `row_bytes` of a row per step, preferably dividing K so no step is masked; ragged
    K: the whole step, masked."""
    return columns_per_step(k, row_bytes // elem_bytes, least=16)


def stages_for(programs: int) -> int:
    """Steps in flight: deeper where few programs share the GPU (the router's 64, o_proj's 512)."""
    return 6 if programs <= 512 else DEFAULT_STAGES


# Tiles from `bench_quant_gemv.py --methods --sweep-bf16` on an H100 (gemv_sweep_h100.json), one
# decode row, µs against cuBLAS / the fused MoE: q/k/v 5120 x 2048 (4 rows, 256 columns, 2 warps)
# 8.96 vs 9.41; o_proj 2048 x 4096 (4, 256, 6 stages) 8.04 vs 10.65; router 128 x 2048 (2 rows, no
# split-K: the split's reduction kernel cost more than it saved) 3.07 vs 5.2; MoE (gate_up 8 rows
# of 128 columns, down 4 rows of 256) 29.9 vs 34.0. Narrow programs (4 rows, 512 bytes of each a
# step) beat the quantized GEMVs' 16-row ones: more programs, each with fewer bytes in flight.
def gemv_config(m: int, n: int, k: int, elem_bytes: int = 2) -> dict:
    """Tiles for the Qwen3-Omni shapes (N = 128..151936, K = 768..4096): 4 rows per program (2
    where 4 leave under quant_gemv.MIN_PROGRAMS programs), 512 bytes of each row a step, no split-K
    (`gemv` still takes a SPLIT_K config)."""
    block_n = rows_per_program(1, n, most=4)
    return dict(BLOCK_N=block_n, BLOCK_K=step_columns(k, elem_bytes), SPLIT_K=1, num_warps=2,
                num_stages=stages_for(-(-n // block_n)))


# Weights up to this size have their first lines asked of L2 before a GEMV waits for the kernel
# before it (programmatic launch only): the attention's and router's, not lm_head's 622 MB.
PREFETCH_MAX_BYTES = 32 << 20
PREFETCH_MAX_LINES = 64  # 128-byte lines per row: 8 KiB, o_proj's whole row


def prefetch_consts(weight: torch.Tensor, columns: int, pdl: dict) -> dict:
    """PREFETCH / LINE of `_gemv_kernel` for a program reading `columns` of each of its rows."""
    line = 128 // weight.element_size()
    if not pdl.get("USE_PDL") or weight.numel() * weight.element_size() > PREFETCH_MAX_BYTES:
        return dict(PREFETCH=0, LINE=line)
    lines = min(PREFETCH_MAX_LINES, max(1, columns // line))
    return dict(PREFETCH=1 << (lines.bit_length() - 1), LINE=line)  # a power of two (tl.arange)


def _float_consts(k: int, block_k: int) -> dict:
    """quant_gemv's chunk constexprs for an unquantized weight: one group of the whole step."""
    return dict(FMT="float", HAS_ZERO=False, ZP=0, SBN=1, SBK=k, G=1, GK=block_k, SCALES="none",
                EVEN_K=k % block_k == 0, ASM=False)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M small) -> [M, N] in x's dtype; same arguments and result as F.linear."""
    m, k = x.shape
    n = weight.shape[0]
    if not gemv_supported(x, weight):
        return F.linear(x, weight, bias)
    if m > 16:
        raise ValueError(f"gemv is for a few rows (decode), got {m}: use F.linear")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or gemv_config(m, n, k, weight.element_size())
    block_k = cfg["BLOCK_K"]
    steps = -(-k // block_k)
    split = max(1, min(cfg.get("SPLIT_K", 1), steps))
    steps_per_split = -(-steps // split)
    split = -(-steps // steps_per_split)  # no empty splits
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    pdl = pdl_args(x.device)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x, weight, weight, weight, bias if bias is not None else weight, target,
        m, n, k, k, steps_per_split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0, 0, 0, 0,
        0 if split == 1 else target.stride(0), target.stride(-2), target.stride(-1),
        HAS_BIAS=bias is not None and split == 1, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg["BLOCK_N"],
        **_float_consts(k, block_k), STAGES=cfg.get("num_stages", DEFAULT_STAGES), num_warps=cfg.get("num_warps", 4),
        **pdl, **prefetch_consts(weight, min(k, steps_per_split * block_k), pdl),
    )
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _split_sum_kernel[(m, triton.cdiv(n, block))](
            target, bias if bias is not None else target, out, m, n, split,
            target.stride(0), target.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, BLOCK=block, **pdl,
        )
    return out


def moe_gemv_config(tokens: int, top_k: int, hidden: int, inter: int, elem_bytes: int = 2) -> dict:
    """gate_up: programs = pairs x I / BLOCK_N, each reading BLOCK_N gate and BLOCK_N up rows of
    256 bytes a step; down: tokens x H / BLOCK_N, 512 bytes a step (see gemv_config)."""
    return dict(
        BLOCK_N_GU=rows_per_program(tokens * top_k, inter, most=8), BLOCK_K_GU=step_columns(hidden, elem_bytes, 256),
        num_warps_gu=2, BLOCK_N_D=rows_per_program(tokens, hidden, most=4), BLOCK_K_D=step_columns(inter, elem_bytes),
        num_warps_d=2, num_stages=DEFAULT_STAGES,
    )


def moe_gemv(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act=F.silu,
    config: dict | None = None,
) -> torch.Tensor:
    """hidden [N, H] (N small); gate_up_proj [E, 2I, H]; down_proj [E, H, I]; topk_* [N, K] -> [N, H]."""
    n, hidden_size = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    if (act is not F.silu or not gemv_supported(hidden, gate_up_proj) or not gemv_supported(hidden, down_proj)):
        return moe_reference(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)
    top_k = topk_ids.shape[1]
    if n == 0:
        return torch.zeros_like(hidden)
    cfg = config or moe_gemv_config(n, top_k, hidden_size, inter, hidden.element_size())
    return run_moe_gemv(hidden, topk_weights, topk_ids, inter, cfg, float_expert_args(gate_up_proj), float_expert_args(down_proj))


def float_expert_args(w: torch.Tensor):
    """run_moe_gemv's view of stacked float experts [E, N, K]: the weight, no scales."""
    k = w.shape[-1]
    return lambda block_k: ((w, w, w), (*w.stride(), 0, 0, 0, 0, 0, 0), k, _float_consts(k, block_k))


# Rows up to which `linear` takes the GEMV (bench_quant_gemv --rows, gemv_rows_h100.json, µs
# GEMV / cuBLAS): a wide weight (q/k/v 5120 x 2048, o_proj 2048 x 4096) wins at 1-2 rows (q/k/v
# 9.1 / 9.6, 9.6 / 9.6; o_proj 8.1 / 10.8, 8.4 / 10.8), ties or loses from 4 (q/k/v 11.8 / 10.3,
# at 8 18.3 / 10.4: every row multiplies on the CUDA cores); a narrow one (N <= NARROW_N: the
# router, k/v) wins up to 8 (router 4.6 / 5.2 at 8 rows).
GEMV_MAX_ROWS_WIDE = 2
NARROW_N = 1024


def gemv_max_rows(weight: torch.Tensor) -> int:
    """Rows up to which a product with `weight` takes a GEMV (above): more for a narrow weight."""
    return GEMV_MAX_M if weight.shape[0] <= NARROW_N else GEMV_MAX_ROWS_WIDE


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [.., K], through `gemv` for the few rows where it beats cuBLAS (above)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 0 < rows <= gemv_max_rows(weight) and gemv_supported(x, weight):
        x2 = x.reshape(rows, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return gemv(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def experts(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act=F.silu) -> torch.Tensor:
    """SparseMoE.experts_fn: `moe_gemv` for up to GEMV_MAX_TOKENS tokens, else fused_moe's grouped GEMM."""
    if hidden.shape[0] <= GEMV_MAX_TOKENS:
        return moe_gemv(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)
    return fused_moe(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)
