"""Weight-only quantized GEMV for a few rows (decode): y [M, N] = x [M, K] @ dequant(W)^T (+ bias).

For M = 1..8 the product is bound by reading the weight once: int4 is a quarter of bf16's bytes,
so a kernel that streams it at the memory's speed beats cuBLAS's bf16 GEMV. The tile kernel of
quant_gemm.py pads M to 16 and hands each program a 64-column strip of N: at M = 1 that is 32
programs for N = 2048 on a 132-SM GPU (~40 us where the bytes need ~2 us). Here instead:

* one program per BLOCK_N (2..16) output rows (and per K range with split-K when N is small), so
  the N = 2048..8192 projections give hundreds of programs;
* the K loop (`tl.range(num_stages=...)`: Triton keeps the next steps' weight and x loads in
  flight through shared memory) reads a [BLOCK_N, BLOCK_K] weight chunk with 128-bit loads along
  K, dequantizes it in registers and multiplies by x on the CUDA cores in fp32 (tl.sum; no
  tl.dot, whose M = 16 minimum would waste 15/16 of the work);
* the chunk is viewed as [BLOCK_N, G, GK]: G scale groups of GK columns (GK divides the scale
  group, so a group's columns share one scale): products are summed per group, then scaled;
* int4 and int8 codes are read as 32-bit words (8 nibbles / 4 bytes) and turned into floats by
  the exponent trick: a word's byte placed under the exponent bits 0x4B000000 is the float
  2**23 + code, so one byte permute (PRMT; after one AND / shift per word for int4) and one float
  subtract (which also removes the zero point) replace an int-to-float conversion (a quarter of
  the FMA rate on Hopper) per weight. Word value i is column 8w + i (int4: byte i // 2, low
  nibble for even i, as quant_format packs them) or 4w + i (int8), so x is split the same way
  (x_i[w] = x[8w + i]) and no unpacked code is ever moved;
* fp8 e4m3 bytes are converted by Triton (cvt to f16 pairs) and split into even / odd columns;
* every one of the M rows reuses the dequantized chunk (a static loop over rows).

The byte permutes are inline PTX; Triton's CPU interpreter cannot run inline assembly, so there
(TRITON_INTERPRET=1, the CPU tests) the same values come from shifts and masks (`ASM=False`).
The CUDA test (tests/kernels/test_quant_gemv_cuda.py) checks the PTX path.

Nothing depends on data on the host and the only allocations (the output; with split-K an fp32
[splits, M, N] buffer) depend on shapes alone, so the kernels can be captured in CUDA graphs.
The pure-torch reference with the same signature is `quant_matmul_reference` (dequantize, then
F.linear). The jit helpers are shared with quant_moe_gemv.py.
"""

from __future__ import annotations

import torch

from .common import available, interpreting, pdl_args, prefetch_l2, triton, wait_prior
from .quant_format import QFormat
from .quant_gemm import quant_matmul_reference, zero_args

if triton is not None:
    import triton.language as tl

__all__ = [
    "quant_gemv", "quant_gemv_reference", "gemv_supported", "gemv_config", "GEMV_MAX_M",
    "packed_words", "chunk_consts",
]

# Rows up to which the quantized linear layers take the GEMV (layers/quant_linear.py): decode of up
# to 8 sequences. Beyond it the dequantized chunk is reused by enough rows for tensor cores to win.
GEMV_MAX_M = 8

quant_gemv_reference = quant_matmul_reference  # same signature and result


if triton is not None:
    # 2**23 as a float: a code c < 2**23 under the exponent bits 0x4B000000 is the float 2**23 + c
    _MAGIC = tl.constexpr(8388608.0)

    @triton.jit
    def _int4_word_values(w, ASM: tl.constexpr):
        """int32 words of 8 nibbles -> 8 float32 tensors 2**23 + nibble i (column 8w + i)."""
        if ASM:
            # lo / hi: the low / high nibble of each byte in that byte; prmt then puts byte j of
            # one of them under 0x4B000000 (selector 0x765j: byte j of a, then bytes 1..3 of b)
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                """{
                .reg .b32 lo, hi;
                and.b32 lo, $8, 0x0F0F0F0F;
                shr.u32 hi, $8, 4;
                and.b32 hi, hi, 0x0F0F0F0F;
                prmt.b32 $0, lo, 0x4B000000, 0x7650;
                prmt.b32 $1, hi, 0x4B000000, 0x7650;
                prmt.b32 $2, lo, 0x4B000000, 0x7651;
                prmt.b32 $3, hi, 0x4B000000, 0x7651;
                prmt.b32 $4, lo, 0x4B000000, 0x7652;
                prmt.b32 $5, hi, 0x4B000000, 0x7652;
                prmt.b32 $6, lo, 0x4B000000, 0x7653;
                prmt.b32 $7, hi, 0x4B000000, 0x7653;
                }""",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.int32,) * 8, is_pure=True, pack=1,
            )
        else:
            c0 = (w & 0xF) | 0x4B000000
            c1 = ((w >> 4) & 0xF) | 0x4B000000
            c2 = ((w >> 8) & 0xF) | 0x4B000000
            c3 = ((w >> 12) & 0xF) | 0x4B000000
            c4 = ((w >> 16) & 0xF) | 0x4B000000
            c5 = ((w >> 20) & 0xF) | 0x4B000000
            c6 = ((w >> 24) & 0xF) | 0x4B000000
            c7 = ((w >> 28) & 0xF) | 0x4B000000
        return (c0.to(tl.float32, bitcast=True), c1.to(tl.float32, bitcast=True),
                c2.to(tl.float32, bitcast=True), c3.to(tl.float32, bitcast=True),
                c4.to(tl.float32, bitcast=True), c5.to(tl.float32, bitcast=True),
                c6.to(tl.float32, bitcast=True), c7.to(tl.float32, bitcast=True))

    @triton.jit
    def _int8_word_values(w, ASM: tl.constexpr):
        """int32 words of 4 bytes -> 4 float32 tensors 2**23 + byte i (column 4w + i)."""
        if ASM:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                """{
                prmt.b32 $0, $4, 0x4B000000, 0x7650;
                prmt.b32 $1, $4, 0x4B000000, 0x7651;
                prmt.b32 $2, $4, 0x4B000000, 0x7652;
                prmt.b32 $3, $4, 0x4B000000, 0x7653;
                }""",
                "=r,=r,=r,=r,r", [w], dtype=(tl.int32,) * 4, is_pure=True, pack=1,
            )
        else:
            c0 = (w & 0xFF) | 0x4B000000
            c1 = ((w >> 8) & 0xFF) | 0x4B000000
            c2 = ((w >> 16) & 0xFF) | 0x4B000000
            c3 = ((w >> 24) & 0xFF) | 0x4B000000
        return (c0.to(tl.float32, bitcast=True), c1.to(tl.float32, bitcast=True),
                c2.to(tl.float32, bitcast=True), c3.to(tl.float32, bitcast=True))

    @triton.jit
    def _load_packed(
        q_ptr, offs_n, n_ok, k0, KQ, stride_qn, stride_qk,
        VALUES: tl.constexpr, G: tl.constexpr, GK: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """The packed weight of rows offs_n, columns k0 .. k0 + G*GK: [BLOCK_N, G, GK // VALUES]
        elements of VALUES columns each (int32 words of 8 nibbles or 4 bytes; fp8: bytes, 1).

        KQ (stored elements per row) is a kernel argument so Triton sees it divisible by 16 and
        keeps the loads 128 bits wide (a bound computed here made byte loads); EVEN_K (K a
        multiple of the step) drops the K mask. 0 past N and K.
        """
        GW: tl.constexpr = GK // VALUES
        idx = (k0 // VALUES + tl.arange(0, G) * GW)[None, :, None] + tl.arange(0, GW)[None, None, :]
        ptrs = q_ptr + offs_n[:, None, None] * stride_qn + idx * stride_qk
        if EVEN_K:
            return tl.load(ptrs, mask=n_ok[:, None, None], other=0)
        return tl.load(ptrs, mask=n_ok[:, None, None] & (idx < KQ), other=0)

    @triton.jit
    def _load_scales(
        s_ptr, z_ptr, offs_n, ok, k0, K, stride_sn, stride_sk, stride_zn, stride_zk,
        HAS_ZERO: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, G: tl.constexpr, GK: tl.constexpr,
        SCALES: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """(scale, zero) of rows offs_n for the chunk at k0, float32; 0 where ok (rows) is false.

        scale [BLOCK_N, G] (SCALES "row": [BLOCK_N, 1]); zero [BLOCK_N, G or 1, 1], only
        meaningful with HAS_ZERO (else the scale again, unused). SCALES says where they are:
            "row"    one scale block covers all of K (per channel): column 0
            "chunk"  a chunk is exactly one scale block (GK == SBK): columns k0 / GK + g
            "any"    column (k0 + g*GK) // SBK (ragged groups such as 48: correct, slower)
            "none"   an unquantized weight (FMT "float"): no loads, a [1, 1] scale of 1 (a
                     caller's factor, such as the MoE's routing weight, still rides on it)
        """
        if SCALES == "none":
            scale = tl.full((1, 1), 1.0, tl.float32)
            zero = scale
        else:
            s_row = (offs_n // SBN)[:, None]
            if SCALES == "row":
                s_col = tl.zeros((1, 1), dtype=tl.int32)
                s_ok = ok[:, None]
            else:
                kc = k0 + tl.arange(0, G) * GK
                if SCALES == "chunk":
                    s_col = (k0 // GK + tl.arange(0, G))[None, :]
                else:
                    s_col = (kc // SBK)[None, :]
                if EVEN_K:
                    s_ok = ok[:, None]
                else:
                    s_ok = ok[:, None] & (kc < K)[None, :]
            scale = tl.load(s_ptr + s_row * stride_sn + s_col * stride_sk, mask=s_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + s_row * stride_zn + s_col * stride_zk, mask=s_ok, other=0).to(tl.float32)
            else:
                zero = scale
        return scale, zero[:, :, None]

    @triton.jit
    def _load_x(x_row_ptr, k0, K, stride_xk, row_ok, G: tl.constexpr, GK: tl.constexpr, EVEN_K: tl.constexpr):
        """Columns k0 .. k0 + G*GK of one activation row, float32 [G, GK] (0 past K / a padding row)."""
        col = k0 + tl.arange(0, G)[:, None] * GK + tl.arange(0, GK)[None, :]
        if EVEN_K:
            x = tl.load(x_row_ptr + col * stride_xk, mask=row_ok, other=0.0)
        else:
            x = tl.load(x_row_ptr + col * stride_xk, mask=(col < K) & row_ok, other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _step_dot(
        acc, x_ptr, stride_xm, stride_xk, M, q_ptr, stride_qn, stride_qk, offs_n, n_ok, k0, K, KQ,
        scale, zero,
        FMT: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr, G: tl.constexpr, GK: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr,
    ):
        """acc [BLOCK_N, BLOCK_M] + the step's products: column m += sum over the chunk's columns
        of dequant(W)[offs_n] * x[m] (rows m >= M of x read as 0). The scale multiplies per-group
        sums (a caller may fold a factor into it: the MoE's routing weight)."""
        rows = tl.arange(0, BLOCK_M)
        if HAS_ZERO:
            offset = zero + _MAGIC
        else:
            offset = _MAGIC + ZP
        if FMT == "int4":
            GW: tl.constexpr = GK // 8
            c0, c1, c2, c3, c4, c5, c6, c7 = _int4_word_values(
                _load_packed(q_ptr, offs_n, n_ok, k0, KQ, stride_qn, stride_qk, 8, G, GK, EVEN_K), ASM)
            w0, w1, w2, w3 = c0 - offset, c1 - offset, c2 - offset, c3 - offset
            w4, w5, w6, w7 = c4 - offset, c5 - offset, c6 - offset, c7 - offset
            for m in tl.static_range(BLOCK_M):
                x = _load_x(x_ptr + m * stride_xm, k0, K, stride_xk, m < M, G, GK, EVEN_K)
                # column 8w + 4a + 2b + c of x: split c, then b, then a
                xc0, xc1 = tl.split(tl.reshape(x, (G, GW, 2, 2, 2)))
                x0b, x2b = tl.split(xc0)
                x1b, x3b = tl.split(xc1)
                x0, x4 = tl.split(x0b)
                x2, x6 = tl.split(x2b)
                x1, x5 = tl.split(x1b)
                x3, x7 = tl.split(x3b)
                prod = (w0 * x0[None] + w1 * x1[None] + w2 * x2[None] + w3 * x3[None]
                        + w4 * x4[None] + w5 * x5[None] + w6 * x6[None] + w7 * x7[None])
                part = tl.sum(tl.sum(prod, axis=2) * scale, axis=1)
                acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
        elif FMT == "int8":
            GW: tl.constexpr = GK // 4
            c0, c1, c2, c3 = _int8_word_values(
                _load_packed(q_ptr, offs_n, n_ok, k0, KQ, stride_qn, stride_qk, 4, G, GK, EVEN_K), ASM)
            w0, w1, w2, w3 = c0 - offset, c1 - offset, c2 - offset, c3 - offset
            for m in tl.static_range(BLOCK_M):
                x = _load_x(x_ptr + m * stride_xm, k0, K, stride_xk, m < M, G, GK, EVEN_K)
                xb0, xb1 = tl.split(tl.reshape(x, (G, GW, 2, 2)))  # column 4w + 2a + b
                x0, x2 = tl.split(xb0)
                x1, x3 = tl.split(xb1)
                prod = w0 * x0[None] + w1 * x1[None] + w2 * x2[None] + w3 * x3[None]
                part = tl.sum(tl.sum(prod, axis=2) * scale, axis=1)
                acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
        elif FMT == "float":  # unquantized bf16 / fp16 / fp32 (kernels/gemv.py): one element a column
            w = _load_packed(q_ptr, offs_n, n_ok, k0, KQ, stride_qn, stride_qk, 1, G, GK, EVEN_K).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                x = _load_x(x_ptr + m * stride_xm, k0, K, stride_xk, m < M, G, GK, EVEN_K)
                part = tl.sum(tl.sum(w * x[None], axis=2) * scale, axis=1)
                acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
        else:  # fp8: bytes (masked lanes 0 = +0.0), Triton's e4m3 conversion, even / odd columns
            GH: tl.constexpr = GK // 2
            raw = _load_packed(q_ptr, offs_n, n_ok, k0, KQ, stride_qn, stride_qk, 1, G, GK, EVEN_K)
            b0, b1 = tl.split(tl.reshape(raw, (offs_n.shape[0], G, GH, 2)))
            w0 = b0.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            w1 = b1.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                x = _load_x(x_ptr + m * stride_xm, k0, K, stride_xk, m < M, G, GK, EVEN_K)
                x0, x1 = tl.split(tl.reshape(x, (G, GH, 2)))
                prod = w0 * x0[None] + w1 * x1[None]
                part = tl.sum(tl.sum(prod, axis=2) * scale, axis=1)
                acc += tl.where(rows[None, :] == m, part[:, None], 0.0)
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, K, KQ, steps_per_split,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
        stride_os, stride_om, stride_on,
        FMT: tl.constexpr, HAS_ZERO: tl.constexpr, ZP: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, GK: tl.constexpr,
        SCALES: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, USE_PDL: tl.constexpr,
        PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 1,
    ):
        """Program (n block, K split): rows offs_n of out (or of split pid_k's fp32 partials).
        PREFETCH > 0 (programmatic launch): the first PREFETCH lines (LINE stored elements each) of
        the program's weight rows are asked of L2 before waiting for the previous kernel."""
        BK: tl.constexpr = G * GK
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if PREFETCH > 0:
            lines = tl.minimum(pid_k * steps_per_split * BK + tl.arange(0, PREFETCH) * LINE, KQ - 1)
            prefetch_l2(q_ptr + tl.minimum(offs_n, N - 1)[:, None] * stride_qn + lines[None, :] * stride_qk, USE_PDL)
        wait_prior(USE_PDL)
        n_ok = offs_n < N
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        first = pid_k * steps_per_split
        last = tl.minimum(tl.cdiv(K, BK), first + steps_per_split)
        if SCALES == "row":  # the same scales every step: loaded once
            scale, zero = _load_scales(s_ptr, z_ptr, offs_n, n_ok, 0, K, stride_sn, stride_sk, stride_zn, stride_zk,
                                       HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
        else:
            scale_next, zero_next = _load_scales(
                s_ptr, z_ptr, offs_n, n_ok & (first < last), first * BK, K, stride_sn, stride_sk, stride_zn, stride_zk,
                HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
        for step in tl.range(first, last, num_stages=STAGES):  # weight and x loads of later steps in flight
            k0 = step * BK  # a multiple of the step the compiler can see: wide loads
            if SCALES != "row":
                # scales a step ahead by hand: a thread's share is under 32 bits, which Triton's
                # pipeliner leaves to a plain load waited for in the same step
                scale, zero = scale_next, zero_next
                scale_next, zero_next = _load_scales(
                    s_ptr, z_ptr, offs_n, n_ok & (step + 1 < last), k0 + BK, K, stride_sn, stride_sk, stride_zn,
                    stride_zk, HAS_ZERO, SBN, SBK, G, GK, SCALES, EVEN_K)
            acc = _step_dot(acc, x_ptr, stride_xm, stride_xk, M, q_ptr, stride_qn, stride_qk, offs_n, n_ok, k0, K, KQ,
                            scale, zero, FMT, HAS_ZERO, ZP, G, GK, EVEN_K, BLOCK_M, ASM)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        o_ptrs = out_ptr + pid_k * stride_os + rows[None, :] * stride_om + offs_n[:, None] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (rows < M)[None, :])

    @triton.jit
    def _split_sum_kernel(
        part_ptr, b_ptr, out_ptr, M, N, splits, stride_ps, stride_pm, stride_om, stride_on,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """out[m, n] = sum over splits of the fp32 partials (+ bias), in out's dtype (a fixed order:
        deterministic, unlike atomics)."""
        wait_prior(USE_PDL)
        m = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, splits):
            acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs * stride_on, acc.to(out_ptr.dtype.element_ty), mask=ok)


# -- launch helpers -----------------------------------------------------------------------------
VALUES_PER_ELEMENT = {"int4": 8, "int8": 4, "fp8": 1}  # columns per element the kernels load


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    d = 1
    while d < cap and n % (2 * d) == 0:
        d *= 2
    return d


def gemv_supported(fmt: QFormat, k: int) -> bool:
    """Whether the GEMV kernels take this weight: int4 / int8 rows of whole 32-bit words (K a
    multiple of 8 / 4) and chunks of whole words (or even byte pairs, fp8) sharing one scale.
    True for every format thinktalk writes (groups of 32..128, per channel, fp8 blocks of 128)."""
    values = VALUES_PER_ELEMENT[fmt.method]
    unit = max(values, 2)
    if k % values:
        return False
    return fmt.block_k >= k or fmt.block_k % unit == 0


def chunk_consts(fmt: QFormat, k: int, block_k: int) -> dict:
    """The constexprs that place a step's chunk: G groups of GK columns sharing a scale (GK a
    power of two dividing the scale block, or the whole step where one scale covers the row)."""
    gk = block_k if fmt.block_k >= k else _pow2_divisor(fmt.block_k, block_k)
    scales = "row" if fmt.block_k >= k else "chunk" if gk == fmt.block_k else "any"
    return dict(G=block_k // gk, GK=gk, SCALES=scales, EVEN_K=k % block_k == 0,
                FMT=fmt.method, ASM=not interpreting() and torch.version.hip is None)  # PTX: NVIDIA only


def packed_words(qweight: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """The stored weight as the kernels read it: int4 / int8 as int32 words (a view), fp8 as bytes."""
    if fmt.method == "fp8":
        return qweight.view(torch.uint8)
    return qweight.view(torch.int32)


def step_columns(k: int, method: str) -> int:
    """BLOCK_K: ~256 bytes of a row per step (16 lanes x 16-byte loads), preferably dividing K
    (no masks along K: K = 768 at int4 takes 256 columns in three full steps); ragged K: the
    whole step size, masked."""
    return columns_per_step(k, 512 if method == "int4" else 256, least=64)


def columns_per_step(k: int, target: int, least: int) -> int:
    """The largest power of two from `target` down to `least` dividing K (no masked step); else
    `target` (at most K's next power of two), the last step masked."""
    bk = target
    while bk >= least:
        if k % bk == 0:
            return bk
        bk //= 2
    return min(target, max(16, triton.next_power_of_2(k)))


# Programs a launch should have at least: about two per SM of a 132-SM H100 / H200, every one
# resident at once, so together they keep enough loads in flight.
MIN_PROGRAMS = 256


def rows_per_program(blocks: int, rows: int, most: int = 16) -> int:
    """BLOCK_N: the most of 16/8/4/2 rows that still gives `blocks` x rows / BLOCK_N programs >=
    MIN_PROGRAMS (N = 2048: 8 rows; 16 rows for N >= 4096 and the lm_head's 151936)."""
    bn = most
    while bn > 2 and blocks * -(-rows // bn) < MIN_PROGRAMS:
        bn //= 2
    return bn


def warps_for(block_n: int, block_k: int, method: str) -> int:
    """~32 bytes of packed weight per thread and step: two 128-bit loads, and a thread holding
    more than one row reuses its x columns (converted from bf16 once for all its rows)."""
    row_bytes = block_k // 2 if method == "int4" else block_k
    return max(1, min(4, block_n * row_bytes // (32 * 32)))


# Steps of the K loop in flight (Triton's pipeliner: stages - 1 loading while one is summed). A
# decode GEMV is latency-bound: K = 2048 at int4 is 4 steps, so 4 stages issue nearly all of a
# program's loads at once; a few KiB of shared memory per stage.
DEFAULT_STAGES = 4


def gemv_config(m: int, n: int, k: int, fmt: QFormat) -> dict:
    """Tiles for the Qwen3-Omni shapes (N = 512..151936, K = 768..4096); split-K where N alone
    cannot fill the GPU and K has steps to spare (at least 4 per split)."""
    block_k = step_columns(k, fmt.method)
    block_n = rows_per_program(1, n)
    programs = -(-n // block_n)
    steps = -(-k // block_k)
    split = 1
    while programs * split < MIN_PROGRAMS and steps // (2 * split) >= 4:
        split *= 2
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps_for(block_n, block_k, fmt.method),
                num_stages=DEFAULT_STAGES)


def quant_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat,
    bias: torch.Tensor | None = None, config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (M small) -> [M, N] in x's dtype; same arguments and result as quant_matmul_reference."""
    m, k = x.shape
    n = qweight.shape[0]
    if not available(x.device) or not gemv_supported(fmt, k):
        return quant_matmul_reference(x, qweight, scale, zero, fmt, bias)
    if m > 16:
        raise ValueError(f"quant_gemv is for a few rows (decode), got {m}: use quant_gemm.quant_matmul")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or gemv_config(m, n, k, fmt)
    block_k = cfg["BLOCK_K"]
    steps = -(-k // block_k)
    split = max(1, min(cfg.get("SPLIT_K", 1), steps))
    steps_per_split = -(-steps // split)
    split = -(-steps // steps_per_split)  # no empty splits
    q = packed_words(qweight, fmt)
    z, (szn, szk) = zero_args(zero, scale)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    pdl = pdl_args(x.device)
    _gemv_kernel[grid](
        x, q, scale, z, bias if bias is not None else scale, target,
        m, n, k, q.shape[1], steps_per_split,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), szn, szk,
        0 if split == 1 else target.stride(0), target.stride(-2), target.stride(-1),
        HAS_ZERO=zero is not None, ZP=fmt.implicit_zero, SBN=fmt.block_n, SBK=fmt.block_k,
        HAS_BIAS=bias is not None and split == 1, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg["BLOCK_N"],
        **chunk_consts(fmt, k, block_k), STAGES=cfg.get("num_stages", DEFAULT_STAGES), num_warps=cfg.get("num_warps", 4),
        **pdl,
    )
    if split > 1:
        block = 1024
        _split_sum_kernel[(m, triton.cdiv(n, block))](
            target, bias if bias is not None else target, out, m, n, split,
            target.stride(0), target.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, BLOCK=block, **pdl,
        )
    return out
