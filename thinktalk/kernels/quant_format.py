"""Quantized weight formats: how a [.., N, K] weight is stored, and the pure-torch (de)quantizers.

Every quantized weight in thinktalk is (qweight, scale, zero) plus a `QFormat`:

    int8   qweight uint8 [.., N, K]            unsigned codes 0..255
    int4   qweight uint8 [.., N, ceil(K/2)]    two codes per byte: column 2j in the low nibble,
                                               2j+1 in the high nibble (= compressed-tensors'
                                               little-endian int32 packing viewed as bytes)
    fp8    qweight float8_e4m3fn [.., N, K]

    scale  [.., ceil(N/block_n), ceil(K/block_k)]   one scale per block of block_n rows x block_k
                                                    columns; int: group quantization is
                                                    block (1, group_size), per-channel (1, K);
                                                    fp8: per-channel (1, K) or (128, 128) blocks
    zero   uint8, shape of scale, or None           int only: asymmetric zero points; symmetric
                                                    formats use the implicit zero 2**(bits-1)

    w = (code - zero) * scale          (int)
    w = fp8_value * scale              (fp8)

Int scales are kept in the compute dtype (bf16/fp16/fp32), fp8 scales in float32 (what
torch._scaled_mm takes). Quantization here is round-to-nearest (no calibration): symmetric int
maps [-amax, amax] onto [-2**(b-1), 2**(b-1)-1] with scale amax / (2**(b-1) - 0.5); asymmetric
maps [min(w, 0), max(w, 0)] onto [0, 2**b - 1]; fp8 maps amax onto 448.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
METHODS = ("int4", "int8", "fp8")


@dataclass(frozen=True)
class QFormat:
    """How one quantized tensor is laid out (resolved: block_k is a number, never 'per channel')."""

    method: str  # "int4" | "int8" | "fp8"
    block_n: int = 1
    block_k: int = 128
    sym: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "fp8" and not self.sym:
            raise ValueError("fp8 weights are symmetric (no zero points)")
        if self.block_n < 1 or self.block_k < 1:
            raise ValueError(f"bad scale block ({self.block_n}, {self.block_k})")

    @property
    def bits(self) -> int:
        return 4 if self.method == "int4" else 8

    @property
    def is_int(self) -> bool:
        return self.method != "fp8"

    @property
    def implicit_zero(self) -> int:
        """The zero point of symmetric int codes."""
        return 1 << (self.bits - 1) if self.is_int else 0

    def packed_k(self, k: int) -> int:
        return (k + 1) // 2 if self.method == "int4" else k

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        return (-(-n // self.block_n), -(-k // self.block_k))

    def qweight_dtype(self) -> torch.dtype:
        return FP8_DTYPE if self.method == "fp8" else torch.uint8


def resolve_format(method: str, k: int, group_size: int | None = 128, sym: bool = True, fp8_block: int | None = None) -> QFormat:
    """The QFormat for a weight with K input columns.

    int: group_size columns per scale (None or <= 0: one scale per output channel).
    fp8: fp8_block None -> per output channel; b -> (b, b) blocks (128 as Qwen's FP8 checkpoints).
    """
    if method == "fp8":
        if fp8_block:
            return QFormat("fp8", fp8_block, fp8_block, True)
        return QFormat("fp8", 1, k, True)
    if not group_size or group_size <= 0 or group_size >= k:
        return QFormat(method, 1, k, sym)
    return QFormat(method, 1, group_size, sym)


# -- int4 packing ------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [.., K] -> bytes [.., ceil(K/2)], even columns in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: bytes [.., ceil(K/2)] -> uint8 codes [.., K]."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :k]


# -- helpers -------------------------------------------------------------------------------------
def _blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """[.., N, K] -> zero-padded [.., Nb, bn, Kb, bk] float32 view of the blocks."""
    *lead, n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    w = w.float()
    if nb * bn != n or kb * bk != k:
        w = torch.nn.functional.pad(w, (0, kb * bk - k, 0, nb * bn - n))
    return w.reshape(*lead, nb, bn, kb, bk)


def _unblocks(b: torch.Tensor, n: int, k: int) -> torch.Tensor:
    *lead, nb, bn, kb, bk = b.shape
    return b.reshape(*lead, nb * bn, kb * bk)[..., :n, :k]


def expand_scale(scale: torch.Tensor, fmt: QFormat, n: int, k: int) -> torch.Tensor:
    """Per-block [.., Nb, Kb] -> per-element [.., N, K]."""
    s = scale
    if fmt.block_n > 1:
        s = s.repeat_interleave(fmt.block_n, dim=-2)
    if fmt.block_k > 1:
        s = s.repeat_interleave(fmt.block_k, dim=-1)
    return s[..., :n, :k]


# -- quantize / dequantize ---------------------------------------------------------------------
@torch.no_grad()
def quantize(w: torch.Tensor, fmt: QFormat, scale_dtype: torch.dtype | None = None):
    """w [.., N, K] float -> (qweight, scale, zero or None) in `fmt`, on w's device.

    scale_dtype: dtype the int scales are stored in (default w's dtype); the codes are computed
    against the stored (rounded) scale, so dequantization sees exactly the scale used. fp8 scales
    are always float32.
    """
    *lead, n, k = w.shape
    b = _blocks(w, fmt.block_n, fmt.block_k)
    if fmt.method == "fp8":
        amax = b.abs().amax(dim=(-3, -1), keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (b / scale).clamp(-FP8_MAX, FP8_MAX)
        qweight = _unblocks(q, n, k).to(FP8_DTYPE).contiguous()
        return qweight, scale.squeeze(-1).squeeze(-2).contiguous(), None
    scale_dtype = scale_dtype or (w.dtype if w.is_floating_point() else torch.float32)
    levels = (1 << fmt.bits) - 1
    if fmt.sym:
        amax = b.abs().amax(dim=(-3, -1), keepdim=True)
        scale = amax / (levels / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()
        zero = torch.full_like(scale, float(fmt.implicit_zero))
    else:
        lo = b.amin(dim=(-3, -1), keepdim=True).clamp(max=0)
        hi = b.amax(dim=(-3, -1), keepdim=True).clamp(min=0)
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()
        zero = torch.round(-lo / scale).clamp(0, levels)
    codes = torch.round(b / scale + zero).clamp(0, levels)
    codes = _unblocks(codes, n, k).to(torch.uint8)
    qweight = pack_int4(codes) if fmt.method == "int4" else codes
    scale_out = scale.squeeze(-1).squeeze(-2).to(scale_dtype).contiguous()
    zero_out = None if fmt.sym else zero.squeeze(-1).squeeze(-2).to(torch.uint8).contiguous()
    return qweight.contiguous(), scale_out, zero_out


def codes_of(qweight: torch.Tensor, fmt: QFormat, k: int) -> torch.Tensor:
    """Stored codes as a float32 [.., N, K] tensor (fp8: the fp8 values)."""
    if fmt.method == "int4":
        return unpack_int4(qweight, k).float()
    return qweight[..., :k].float()


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat, k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(qweight, scale, zero) -> the weight [.., N, K] in `dtype`, computed in float32."""
    q = codes_of(qweight, fmt, k)
    n = q.shape[-2]
    s = expand_scale(scale.float(), fmt, n, k)
    if fmt.is_int:
        z = expand_scale(zero.float(), fmt, n, k) if zero is not None else float(fmt.implicit_zero)
        w = (q - z) * s
    else:
        w = q * s
    return w.to(dtype)


def quant_act_fp8(x: torch.Tensor, group_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization for W8A8: x [M, K] -> (fp8 [M, K], float32 scales [M, G]).

    One scale per token (group_k None) or per token and group of group_k columns.
    """
    m, k = x.shape
    g = group_k or k
    b = _blocks(x, 1, g)  # [1(M-block of 1 row).. ] -> [M, 1, Kb, g]
    amax = b.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (b / scale).clamp(-FP8_MAX, FP8_MAX)
    return _unblocks(q, m, k).to(FP8_DTYPE).contiguous(), scale.reshape(m, -1).contiguous()
