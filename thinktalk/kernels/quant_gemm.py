"""Quantized dense GEMMs: y = x @ W^T (+ bias) with W stored as in `quant_format`.

Two kernels, each beside a pure-torch reference with the same signature:

* `quant_matmul` (weight-only, any QFormat: int4 / int8 / fp8): a Triton GEMM that loads the
  packed weight tile, dequantizes it in registers ((code - zero) * scale, or fp8 * scale) and
  multiplies on the tensor cores in the activation dtype with an fp32 accumulator. Decode is
  memory-bound, so reading 4 or 8 bits per weight instead of 16 is where the speed comes from.
  Reference: `quant_matmul_reference` (dequantize, then F.linear in x's dtype).

* `w8a8_fp8_matmul` (fp8 weights, Hopper/Ada): activations are quantized on the fly to fp8 with a
  dynamic scale per token (and per 128-column group for block-scaled weights). Per-channel
  weights go through `torch._scaled_mm` (row-wise scales, fp32 accumulation); 128x128
  block-scaled weights (Qwen's FP8 checkpoints) through a Triton kernel that applies both scales
  per K block. Reference: `w8a8_fp8_reference` (the same activation quantization, then the
  dequantized product in float32).

`_dequant_tile` is shared with the quantized fused MoE (quant_moe.py).

Backend choice: `set_backend("auto" | "triton" | "reference")` or the context manager
`use_backend(...)` (env THINKTALK_QUANT_BACKEND sets the default). "auto" uses Triton where it
can run (CUDA, or CPU under TRITON_INTERPRET=1) and the reference elsewhere.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from .common import available, dot_in_fp32, dot_precision, triton
from .quant_format import FP8_MAX, QFormat, dequantize, quant_act_fp8

if triton is not None:
    import triton.language as tl

__all__ = [
    "quant_matmul", "quant_matmul_reference", "w8a8_fp8_matmul", "w8a8_fp8_reference",
    "set_backend", "use_backend", "use_triton", "fp8_w8a8_supported",
]

_BACKEND = os.environ.get("THINKTALK_QUANT_BACKEND", "auto")


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"unknown quantized-kernel backend {name!r}")
    _BACKEND = name


@contextlib.contextmanager
def use_backend(name: str):
    old = _BACKEND
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def use_triton(device: torch.device) -> bool:
    if _BACKEND == "reference":
        return False
    if _BACKEND == "triton":
        return True
    return available(device)


def fp8_w8a8_supported(device: torch.device) -> bool:
    """fp8 tensor-core matmuls: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# -- kernels ----------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dequant_tile(
        q_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, k_ok, n_ok,
        stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
        IS_FP8: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr,
        SBN: tl.constexpr, SBK: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    ):
        """The weight tile [BLOCK_K, BLOCK_N] (k = offs_k, n = offs_n) dequantized to float32.

        q/s/z pointers already point at this expert's (or the only) weight. k0 is the tile's first
        column; SCALE_PER_TILE: the tile lies in one scale block along K (SBK % BLOCK_K == 0), so
        scales are loaded once per column n.
        """
        mask = k_ok[:, None] & n_ok[None, :]
        if INT4:
            # Load each packed byte once ([BLOCK_K / 2, BLOCK_N], contiguous along K, so the loads
            # vectorise), split it into its two nibbles (low = even k) and interleave them back
            # into [BLOCK_K, BLOCK_N]. Indexing the bytes as k // 2 instead made every lane load
            # its own byte (10-20x slower on an H200, benchmarks/results/quant_h200*.json).
            HALF: tl.constexpr = offs_k.shape[0] // 2
            pair = tl.arange(0, HALF)
            byte_ok = tl.max(tl.reshape(k_ok.to(tl.int32), (HALF, 2)), axis=1) > 0
            byte = tl.load(q_ptr + offs_n[None, :] * stride_qn + (k0 // 2 + pair)[:, None] * stride_qk,
                           mask=byte_ok[:, None] & n_ok[None, :], other=0)
            lo = (byte & 0xF).to(tl.float32)
            hi = ((byte >> 4) & 0xF).to(tl.float32)
            q = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (offs_k.shape[0], offs_n.shape[0]))
        else:  # fp8 weights arrive as raw bytes (uint8 view): masked lanes read 0 = +0.0
            q = tl.load(q_ptr + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk, mask=mask, other=0)
            if IS_FP8:
                q = q.to(tl.float8e4nv, bitcast=True)
            q = q.to(tl.float32)
        if SCALE_PER_TILE:
            s_off = (offs_n // SBN) * stride_sn + (k0 // SBK) * stride_sk
            s = tl.load(s_ptr + s_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + (offs_n // SBN) * stride_zn + (k0 // SBK) * stride_zk, mask=n_ok, other=0)
                z = z.to(tl.float32)[None, :]
        else:
            s_off = (offs_n[None, :] // SBN) * stride_sn + (offs_k[:, None] // SBK) * stride_sk
            s = tl.load(s_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z_off = (offs_n[None, :] // SBN) * stride_zn + (offs_k[:, None] // SBK) * stride_zk
                z = tl.load(z_ptr + z_off, mask=mask, other=0).to(tl.float32)
        if IS_FP8:
            w = q * s
        elif HAS_ZERO:
            w = (q - z) * s
        else:
            w = (q - ZP) * s
        return w

    @triton.jit
    def _wo_gemm_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
        stride_om, stride_on,
        IS_FP8: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr,
        SBN: tl.constexpr, SBK: tl.constexpr, SCALE_PER_TILE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering: consecutive programs share weight column blocks
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = _dequant_tile(
                q_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, k_ok, n_ok,
                stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
                IS_FP8, INT4, HAS_ZERO, ZP, SBN, SBK, SCALE_PER_TILE,
            )
            if UPCAST:
                a = a.to(tl.float32)
            else:
                w = w.to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _w8a8_block_kernel(
        a_ptr, as_ptr, q_ptr, s_ptr, b_ptr, out_ptr,
        M, N, K,
        stride_am, stride_ak, stride_asm, stride_ask, stride_qn, stride_qk, stride_sn, stride_sk,
        stride_om, stride_on,
        SBN: tl.constexpr, SBK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """fp8 x fp8 with per-(token, K-group) activation scales and per-block weight scales.

        BLOCK_K divides SBK, so each K tile has one activation scale per row and one weight scale
        per column; the tile's fp8 product (exact in fp32) is scaled and accumulated.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(q_ptr + offs_n[None, :] * stride_qn + offs_k[:, None] * stride_qk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(as_ptr + offs_m * stride_asm + (k0 // SBK) * stride_ask, mask=m_ok, other=0.0)
            w_s = tl.load(s_ptr + (offs_n // SBN) * stride_sn + (k0 // SBK) * stride_sk, mask=n_ok, other=0.0)
            if UPCAST:
                part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, w)
            acc += part * a_s[:, None] * w_s[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# -- launch helpers -----------------------------------------------------------------------------
def scale_per_tile(fmt: QFormat, block_k: int) -> bool:
    return fmt.block_k % block_k == 0


def pick_block_k(fmt: QFormat, k: int) -> int:
    """Largest of 128/64/32/16 dividing the scale block along K (so scales load once per tile)."""
    for bk in (128, 64, 32, 16):
        if fmt.block_k % bk == 0:
            return bk
    return 32


def _pick_config(m: int, n: int, fmt: QFormat, k: int) -> dict:
    bk = pick_block_k(fmt, k)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)


def as_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """fp8 weights are handed to the kernels as their raw bytes (bit-cast back inside)."""
    return qweight.view(torch.uint8) if qweight.dtype != torch.uint8 else qweight


def zero_args(zero: torch.Tensor | None, scale: torch.Tensor):
    """(tensor to pass, strides) for the optional zero points."""
    if zero is None:
        return scale, (0, 0)
    return zero, (zero.stride(-2), zero.stride(-1))


# -- weight-only -------------------------------------------------------------------------------
def quant_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] -> [M, N]: dequantize W to x's dtype, then F.linear."""
    w = dequantize(qweight, scale, zero, fmt, x.shape[-1], dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def quant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat,
    bias: torch.Tensor | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Triton weight-only GEMM (same arguments and result as quant_matmul_reference)."""
    if not available(x.device):
        return quant_matmul_reference(x, qweight, scale, zero, fmt, bias)
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or _pick_config(m, n, fmt, k)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    upcast = dot_in_fp32(x.dtype)
    z, (szn, szk) = zero_args(zero, scale)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _wo_gemm_kernel[grid](
        x, as_bytes(qweight), scale, z, bias if bias is not None else scale, out,
        m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1), szn, szk,
        out.stride(0), out.stride(1),
        IS_FP8=fmt.method == "fp8", INT4=fmt.method == "int4", HAS_ZERO=zero is not None, ZP=fmt.implicit_zero,
        SBN=fmt.block_n, SBK=fmt.block_k, SCALE_PER_TILE=scale_per_tile(fmt, bk), HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 1),
        PRECISION=dot_precision(torch.float32 if upcast else x.dtype), UPCAST=upcast,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out


# -- W8A8 fp8 ----------------------------------------------------------------------------------
def _act_group(fmt: QFormat, k: int) -> int | None:
    """Activation scale group along K: per token for per-channel weights, else the weight's K block."""
    return None if fmt.block_k >= k else fmt.block_k


def w8a8_fp8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The W8A8 product computed exactly: fp8 activations (dynamic scales) times fp8 weights, fp32."""
    k = x.shape[-1]
    xq, xs = quant_act_fp8(x, _act_group(fmt, k))
    g = _act_group(fmt, k) or k
    xd = xq.float() * xs.repeat_interleave(g, dim=-1)[:, :k]
    w = dequantize(qweight, scale, None, fmt, k, dtype=torch.float32)
    out = xd @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _scaled_mm_ok(x: torch.Tensor, fmt: QFormat, n: int, k: int) -> bool:
    return fmt.block_n == 1 and fmt.block_k >= k and k % 16 == 0 and n % 16 == 0


def w8a8_fp8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp8 x fp8 -> x.dtype: torch._scaled_mm (per-channel) or the Triton block kernel."""
    assert fmt.method == "fp8"
    m, k = x.shape
    n = qweight.shape[0]
    if m == 0:
        return x.new_empty(m, n)
    if x.is_cuda and _scaled_mm_ok(x, fmt, n, k):
        xq, xs = quant_act_fp8(x)
        out = torch._scaled_mm(
            xq, qweight.t(), scale_a=xs, scale_b=scale.reshape(1, n).float(),
            out_dtype=torch.bfloat16, use_fast_accum=False,
        )
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(x.dtype)
    if not available(x.device):
        return w8a8_fp8_reference(x, qweight, scale, zero, fmt, bias)
    group = _act_group(fmt, k)
    xq, xs = quant_act_fp8(x, group)
    sbk = group or k
    bk = next((b for b in (128, 64, 32, 16) if sbk % b == 0), None)
    if bk is None:  # no tile size divides the scale block: fall back to weight-only
        return quant_matmul(x, qweight, scale, None, fmt, bias)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm = 16 if m <= 16 else 32 if m <= 64 else 64
    bn = 64 if m <= 64 else 128
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w8a8_block_kernel[grid](
        xq, xs, qweight, scale, bias if bias is not None else scale, out,
        m, n, k,
        xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1), qweight.stride(0), qweight.stride(1),
        scale.stride(0), scale.stride(1), out.stride(0), out.stride(1),
        SBN=fmt.block_n, SBK=sbk, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=not x.is_cuda,
        num_warps=4, num_stages=3,
    )
    return out


__all__ += ["FP8_MAX"]
