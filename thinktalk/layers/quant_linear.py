"""Quantized replacements for nn.Linear and the stacked MoE experts.

    QuantWeight   a quantized [.., N, K] weight: buffers qweight / scale / zero + its QFormat
    QuantLinear   drop-in for nn.Linear (weight = QuantWeight, optional bias in the compute dtype)
    QuantEmbedding  drop-in for nn.Embedding: the table is a QuantWeight [V, D] with one scale row
                  per token row (int formats); a lookup gathers the rows' codes and scales and
                  dequantizes only those
    QuantExperts  drop-in for layers.moe.Experts: gate_up_proj / down_proj are QuantWeights;
                  `quant_experts_fn` (installed as the owning SparseMoE's experts_fn) runs them

Where each product runs (thinktalk.kernels.quant_gemm.set_backend can force one):

    decode        up to GEMV_MAX_M rows (quant_gemv) / GEMV_MAX_TOKENS tokens (quant_moe_gemv), any
                  method: the weight-only Triton GEMVs (memory-bound: one program per few output
                  rows, codes dequantized in registers; fp8 included, activations not quantized)
    int4 / int8   more rows: Triton weight-only GEMM / fused MoE (CUDA; CPU under
                  TRITON_INTERPRET=1), else the reference: dequantize on the fly, then the product
    fp8 linear    more rows, CUDA with fp8 tensor cores (sm >= 8.9) and act_quant: W8A8
                  (torch._scaled_mm for per-channel scales, Triton for 128x128 blocks), dynamic
                  per-token activation scales; other CUDA: weight-only Triton; CPU: dequantize
    fp8 experts   weight-only (fp8 tiles dequantized in the grouped-GEMM kernel)

Weights are held as buffers (not parameters), so `model.to(device)` moves them; casting the
model's dtype (`.half()`, `.to(torch.float16)`) re-casts the scales but never the stored codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.quant_format import QFormat, dequantize, quantize, unpack_int4
from ..kernels import quant_gemm as qg
from ..kernels import quant_gemv as gv


class QuantWeight(nn.Module):
    def __init__(
        self, shape: tuple[int, ...], fmt: QFormat, compute_dtype: torch.dtype,
        device: torch.device | str | None = None, act_quant: bool = True,
    ):
        """shape: the logical weight shape [.., N, K]; buffers are allocated empty on `device`."""
        super().__init__()
        *lead, n, k = shape
        self.fmt = fmt
        self.in_features = k
        self.compute_dtype = compute_dtype
        self.act_quant = act_quant  # fp8: W8A8 where the hardware has fp8 tensor cores
        scale_dtype = torch.float32 if fmt.method == "fp8" else compute_dtype
        sn, sk = fmt.scale_shape(n, k)
        self.register_buffer("qweight", torch.empty(*lead, n, fmt.packed_k(k), dtype=fmt.qweight_dtype(), device=device))
        self.register_buffer("scale", torch.empty(*lead, sn, sk, dtype=scale_dtype, device=device))
        if fmt.sym:
            self.zero = None
        else:
            self.register_buffer("zero", torch.empty(*lead, sn, sk, dtype=torch.uint8, device=device))

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: QFormat, compute_dtype: torch.dtype | None = None, act_quant: bool = True):
        """Quantize a float weight [.., N, K] (stacked weights one slice at a time: low peak memory)."""
        compute_dtype = compute_dtype or w.dtype
        qw = cls(tuple(w.shape), fmt, compute_dtype, w.device, act_quant)
        qw.fill_(w)
        return qw

    @torch.no_grad()
    def fill_(self, w: torch.Tensor, index: int | None = None, rows: slice | None = None) -> None:
        """Quantize `w` into this weight (optionally one expert `index` and/or a row range)."""
        fmt = self.fmt
        if w.dim() == 3 and index is None:
            for e in range(w.shape[0]):
                self.fill_(w[e], e, rows)
            return
        q, s, z = quantize(w.to(self.qweight.device), fmt, scale_dtype=self.scale.dtype)
        self.store_(q, s, z, index, rows)

    @torch.no_grad()
    def store_(self, q, s, z, index: int | None = None, rows: slice | None = None) -> None:
        """Copy already quantized parts in (rows: the weight rows they cover; scales by block)."""
        dq, ds, dz = self.qweight, self.scale, self.zero
        if index is not None:
            dq, ds = dq[index], ds[index]
            dz = dz[index] if dz is not None else None
        if rows is not None:
            bn = self.fmt.block_n
            if rows.start % bn or (rows.stop % bn and rows.stop != self.qweight.shape[-2]):
                raise ValueError(f"rows {rows.start}:{rows.stop} do not align with {bn}-row scale blocks")
            srows = slice(rows.start // bn, -(-rows.stop // bn))
            dq, ds = dq[rows], ds[srows]
            dz = dz[srows] if dz is not None else None
        dq.copy_(q)
        ds.copy_(s)
        if dz is not None:
            if z is None:
                raise ValueError("asymmetric weight needs zero points")
            dz.copy_(z)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-1], self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero, self.fmt, self.in_features, dtype or self.compute_dtype)

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert e dequantized (so a QuantWeight reads like a stacked float weight)."""
        zero = None if self.zero is None else self.zero[e]
        return dequantize(self.qweight[e], self.scale[e], zero, self.fmt, self.in_features, self.compute_dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)

    def _apply(self, fn, recurse=True):
        # dtype casts must not touch the codes (fp8 codes are "floating point" to nn.Module.to)
        qdtype = self.qweight.dtype
        sdtype = self.scale.dtype
        out = super()._apply(fn, recurse)
        if self.qweight.dtype != qdtype:
            self.qweight = self.qweight.to(qdtype)
        if self.scale.dtype != sdtype:
            if self.fmt.method == "fp8":
                self.scale = self.scale.to(sdtype)
            else:
                self.compute_dtype = self.scale.dtype
        return out

    def extra_repr(self) -> str:
        f = self.fmt
        zp = "sym" if f.sym else "asym"
        return f"shape={tuple(self.shape)}, {f.method}, block=({f.block_n}, {f.block_k}), {zp}"


def quant_linear_apply(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., K] @ W^T (+ bias) for a 2-D QuantWeight, choosing the kernel for the device."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    fmt = w.fmt
    triton_ok = qg.use_triton(x.device)
    if triton_ok and x2.shape[0] <= gv.GEMV_MAX_M and gv.gemv_supported(fmt, x2.shape[1]):
        # decode: the weight-only GEMV (fp8 too: at a few rows fp8 tensor cores would idle on a
        # 16-row tile, and dequantizing in registers keeps the activations exact)
        out = gv.quant_gemv(x2, w.qweight, w.scale, w.zero, fmt, bias)
    elif fmt.method == "fp8" and w.act_quant and triton_ok and qg.fp8_w8a8_supported(x.device):
        out = qg.w8a8_fp8_matmul(x2, w.qweight, w.scale, None, fmt, bias)
    elif triton_ok:
        out = qg.quant_matmul(x2, w.qweight, w.scale, w.zero, fmt, bias)
    else:
        out = qg.quant_matmul_reference(x2, w.qweight, w.scale, w.zero, fmt, bias)
    return out.reshape(*lead, out.shape[-1])


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, fmt: QFormat, compute_dtype: torch.dtype,
        device=None, act_quant: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantWeight((out_features, in_features), fmt, compute_dtype, device, act_quant)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fmt: QFormat, act_quant: bool = True) -> "QuantLinear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, w.dtype, w.device, act_quant)
        q.weight.fill_(w.data)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear_apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def stack_quant_linears(linears) -> "QuantLinear | None":
    """One QuantLinear computing several bias-free QuantLinears of the same input as one product
    (their outputs side by side), their weights becoming row views of its buffers: no second copy
    once their old buffers are dropped, and loading weights into the parts updates the stack.

    None where they cannot share one: a bias, different formats / dtypes / devices, or a part
    whose rows do not end on a scale block (fp8 128 x 128 blocks need multiples of 128).
    The stack is what fuse_qkv / fuse_gate_up keep beside the parts (not a registered submodule,
    so state dicts keep the parts' names, as with their float stacks).
    """
    if not linears or any(type(lin) is not QuantLinear or lin.bias is not None for lin in linears):
        return None
    parts = [lin.weight for lin in linears]
    first = parts[0]
    key = (first.fmt, first.in_features, first.compute_dtype, first.scale.dtype, first.device, first.act_quant)
    if any((w.fmt, w.in_features, w.compute_dtype, w.scale.dtype, w.device, w.act_quant) != key for w in parts):
        return None
    bn = first.fmt.block_n
    if any(w.qweight.shape[-2] % bn for w in parts[:-1]):
        return None
    total = sum(w.qweight.shape[-2] for w in parts)
    stack = QuantLinear(first.in_features, total, False, first.fmt, first.compute_dtype, first.device, first.act_quant)
    start = 0
    for w in parts:
        rows = slice(start, start + w.qweight.shape[-2])
        stack.weight.store_(w.qweight, w.scale, w.zero, rows=rows)
        srows = slice(rows.start // bn, -(-rows.stop // bn))
        w.qweight = stack.weight.qweight[rows]
        w.scale = stack.weight.scale[srows]
        if w.zero is not None:
            w.zero = stack.weight.zero[srows]
        start = rows.stop
    return stack


def apply_linear(module: nn.Module, x: torch.Tensor, linear_fn) -> torch.Tensor:
    """module(x), a plain nn.Linear's product through `linear_fn` (F.linear's signature: the
    engine's decode GEMVs, kernels/gemv.py); any other module (a QuantLinear) is called."""
    if type(module) is nn.Linear:
        return linear_fn(x, module.weight, module.bias)
    return module(x)


@torch.no_grad()
def stack_linears(linears) -> "torch.Tensor | QuantLinear | None":
    """Several bias-free projections of the same input as one product, their outputs side by side
    (`fuse_qkv`, `fuse_gate_up`): plain Linears of one dtype and device give their weights stacked
    into one tensor, theirs becoming row views of it (no extra memory); QuantLinears give
    `stack_quant_linears`' QuantLinear. None where they cannot be stacked."""
    if all(isinstance(lin, QuantLinear) for lin in linears):
        return stack_quant_linears(linears)
    if any(type(lin) is not nn.Linear or lin.bias is not None for lin in linears):
        return None
    if len({(lin.weight.dtype, lin.weight.device) for lin in linears}) != 1:
        return None
    stacked = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(stacked[start : start + rows], requires_grad=False)
        start += rows
    return stacked


def dequantize_rows(w: "QuantWeight", ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` ([..] int) of a 2-D QuantWeight with one scale row per weight row, in its compute
    dtype: equal to w.dequantize()[ids] bit for bit, without dequantizing the table.

    Int codes are computed in the compute dtype with the scales broadcast per group (no float32
    [T, K] copies, which a long prompt would feel): code - zero is an integer below 256, exact in
    bf16/fp16/fp32, so its product with the stored scale is rounded once, as in float32.
    """
    fmt, k = w.fmt, w.in_features
    if fmt.block_n != 1:
        raise ValueError(f"row lookups need one scale row per table row, not blocks of {fmt.block_n}")
    flat = ids.reshape(-1)
    q = w.qweight.index_select(0, flat)
    s = w.scale.index_select(0, flat)
    z = None if w.zero is None else w.zero.index_select(0, flat)
    if not fmt.is_int or k % fmt.block_k or s.dtype != w.compute_dtype:
        return dequantize(q, s, z, fmt, k, w.compute_dtype).reshape(*ids.shape, k)
    dt = w.compute_dtype
    codes = unpack_int4(q, k) if fmt.method == "int4" else q
    groups = codes.view(flat.shape[0], k // fmt.block_k, fmt.block_k).to(dt)
    zero = z.to(dt)[..., None] if z is not None else float(fmt.implicit_zero)
    return ((groups - zero) * s[..., None]).reshape(*ids.shape, k)


class QuantEmbedding(nn.Module):
    """nn.Embedding with a quantized table (lookups only: no padding_idx, no max_norm)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QFormat, compute_dtype: torch.dtype, device=None):
        super().__init__()
        if fmt.block_n != 1:
            raise ValueError("a quantized embedding table needs per-row scales (int formats or per-channel fp8)")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = QuantWeight((num_embeddings, embedding_dim), fmt, compute_dtype, device, act_quant=False)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding, fmt: QFormat) -> "QuantEmbedding":
        if emb.padding_idx is not None or emb.max_norm is not None:
            raise ValueError("embeddings with padding_idx or max_norm are not quantized")
        w = emb.weight
        q = cls(emb.num_embeddings, emb.embedding_dim, fmt, w.dtype, w.device)
        q.weight.fill_(w.data)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def quant_experts_fn(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act=F.silu) -> torch.Tensor:
    """SparseMoE.experts_fn for QuantExperts (signature of layers.moe.moe_reference)."""
    from ..kernels.quant_moe import quant_fused_moe, quant_moe_reference
    from ..kernels.quant_moe_gemv import GEMV_MAX_TOKENS, moe_gemv_supported, quant_moe_gemv

    if act is F.silu and qg.use_triton(hidden.device):
        if hidden.shape[0] <= GEMV_MAX_TOKENS and moe_gemv_supported(gate_up_proj, down_proj):
            return quant_moe_gemv(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)
        return quant_fused_moe(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)
    return quant_moe_reference(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, act)


class QuantExperts(nn.Module):
    """layers.moe.Experts with quantized stacked weights (gate_up [E, 2I, H], down [E, H, I])."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, fmt_gate_up: QFormat, fmt_down: QFormat,
        compute_dtype: torch.dtype, device=None,
    ):
        super().__init__()
        self.gate_up_proj = QuantWeight((num_experts, 2 * intermediate_size, hidden_size), fmt_gate_up, compute_dtype, device)
        self.down_proj = QuantWeight((num_experts, hidden_size, intermediate_size), fmt_down, compute_dtype, device)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module, fmt_gate_up: QFormat, fmt_down: QFormat) -> "QuantExperts":
        gu, dn = experts.gate_up_proj, experts.down_proj
        num_experts, two_i, hidden = gu.shape
        q = cls(num_experts, hidden, two_i // 2, fmt_gate_up, fmt_down, gu.dtype, gu.device)
        q.gate_up_proj.fill_(gu.data)
        q.down_proj.fill_(dn.data)
        return q


class _QuantExpertsFn:
    """SparseMoE.experts_fn of a module whose experts are quantized: always quant_experts_fn.

    The engine may install the float fused-MoE kernel on every SparseMoE (class-level or per
    instance); that kernel cannot read packed weights, so assignments are ignored here.
    """

    @property
    def experts_fn(self):
        return quant_experts_fn

    @experts_fn.setter
    def experts_fn(self, fn):
        pass


_QUANT_CLASSES: dict[type, type] = {}


def install_quant_experts(moe: nn.Module, experts: QuantExperts) -> None:
    """Put quantized experts into a SparseMoE (its class becomes a subclass whose experts_fn is
    pinned to quant_experts_fn; isinstance(moe, SparseMoE) still holds)."""
    moe.experts = experts
    cls = type(moe)
    if not issubclass(cls, _QuantExpertsFn):
        if cls not in _QUANT_CLASSES:
            _QUANT_CLASSES[cls] = type(f"Quant{cls.__name__}", (_QuantExpertsFn, cls), {})
        moe.__class__ = _QUANT_CLASSES[cls]
    moe.__dict__.pop("experts_fn", None)
