"""Pre-quantized checkpoint formats published for Qwen3-Omni / Qwen3-MoE models, read and written.

Supported (detected from config.json's `quantization_config`):

* compressed-tensors (llm-compressor; what vLLM and SGLang load), weight-only reading:
    - "pack-quantized": int4 / int8 codes packed into int32 (`weight_packed` [N, ceil(K*b/32)],
      value v stored as v + 2**(b-1), element j of a word at bits b*j), `weight_scale` [N, G],
      `weight_zero_point` (asymmetric; packed the same way along dim 0) and `weight_shape`.
      This is the AWQ / GPTQ W4A16 format of the community Qwen3-Omni 4-bit checkpoints
      (e.g. cyankiwi/Qwen3-Omni-30B-A3B-Instruct-AWQ-4bit, made with llm-compressor).
    - "naive-quantized" / "int-quantized": int8 `weight` + `weight_scale` (W8A8 int8 checkpoints;
      run weight-only here, activations stay in the compute dtype).
    - "float-quantized": fp8 e4m3 `weight` + `weight_scale` per tensor, per channel or per block
      (FP8_DYNAMIC / FP8 block checkpoints).
* "fp8" (Qwen's and DeepSeek's native FP8, e.g. Qwen/Qwen3-30B-A3B-FP8 and the Qwen3-Omni FP8
  repacks such as marksverdhei/Qwen3-Omni-30B-A3B-FP8): fp8 e4m3 `weight` with
  `weight_scale_inv` [ceil(N/128), ceil(K/128)] (despite the name, multiplied in to dequantize).

`thinktalk quantize` writes int4/int8 as compressed-tensors pack-quantized, fp8 per-channel as
compressed-tensors float-quantized and fp8 128x128 blocks in Qwen's "fp8" format, so what it
writes is what the community tools read, and the reading path is the same code.

GPTQ/AutoAWQ-native layouts (`qweight`/`qzeros` with quant_method "gptq" / "awq") and
bitsandbytes are refused with a clear message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..kernels.quant_format import FP8_DTYPE, QFormat, pack_int4, unpack_int4


class QuantFormatError(ValueError):
    """The checkpoint's quantization is of a kind thinktalk cannot load."""


@dataclass(frozen=True)
class Scheme:
    """One checkpoint-wide weight quantization scheme."""

    method: str  # int4 | int8 | fp8
    group_size: int | None = 128  # int: columns per scale; None: per output channel
    sym: bool = True
    block: tuple[int, int] | None = None  # fp8: (rows, cols) per scale; None: per channel
    per_tensor: bool = False  # fp8 with one scale for the whole tensor
    act_quant: bool = True  # fp8: W8A8 where the hardware allows

    def fmt(self, n: int, k: int) -> QFormat:
        if self.method == "fp8":
            if self.per_tensor:
                return QFormat("fp8", n, k)
            if self.block:
                return QFormat("fp8", self.block[0], self.block[1])
            return QFormat("fp8", 1, k)
        if not self.group_size or self.group_size >= k:
            return QFormat(self.method, 1, k, self.sym)
        return QFormat(self.method, 1, self.group_size, self.sym)


@dataclass
class CheckpointFormat:
    """How a pre-quantized checkpoint names and lays out its tensors."""

    name: str  # e.g. "compressed-tensors/pack-quantized"
    scheme: Scheme
    marker: str  # key suffix that only quantized modules have
    parts: dict[str, str] = field(default_factory=dict)  # key suffix -> qweight | scale | zero | check | ignore

    def quantized_modules(self, keys: Iterable[str]) -> set[str]:
        """Checkpoint module names (key minus suffix) that are stored quantized."""
        return {k[: -len(self.marker)] for k in keys if k.endswith(self.marker)}

    def split(self, key: str) -> tuple[str, str] | None:
        """key -> (module, part) for this format's suffixes (longest suffix first)."""
        for suffix in sorted(self.parts, key=len, reverse=True):
            if key.endswith(suffix):
                return key[: -len(suffix)], self.parts[suffix]
        return None

    # -- tensor layouts --------------------------------------------------------------------
    def convert(self, part: str, t: torch.Tensor, fmt: QFormat, n: int, k: int) -> torch.Tensor | None:
        """A checkpoint tensor -> our layout for `part` (None: nothing to store)."""
        if part == "qweight":
            return self._qweight(t, fmt, n, k)
        if part == "scale":
            if fmt.method == "fp8" and t.numel() == 1:
                return t.reshape(1, 1).float()
            return t.reshape(fmt.scale_shape(n, k))
        if part == "zero":
            return self._zero(t, fmt, n, k)
        if part == "shape":
            if [int(v) for v in t.flatten().tolist()] != [n, k]:
                raise QuantFormatError(f"weight_shape {t.tolist()} does not match the model's [{n}, {k}]")
            return None
        if part == "g_idx":
            g = fmt.block_k
            if not torch.equal(t.long().cpu(), torch.arange(k) // g):
                raise QuantFormatError("activation-ordered groups (g_idx, GPTQ actorder) are not supported")
            return None
        return None

    def _qweight(self, t: torch.Tensor, fmt: QFormat, n: int, k: int) -> torch.Tensor:
        if fmt.method == "fp8":
            if t.dtype != FP8_DTYPE:
                raise QuantFormatError(f"expected float8_e4m3fn weights, got {t.dtype}")
            return t
        if t.dtype == torch.int32:  # packed little-endian int32 words; bytes = our layout
            return t.contiguous().view(torch.uint8)[:, : fmt.packed_k(k)]
        if t.dtype == torch.int8 and fmt.method == "int8":  # naive: signed values
            return (t.to(torch.int16) + fmt.implicit_zero).to(torch.uint8)
        raise QuantFormatError(f"unexpected {t.dtype} quantized weight for {fmt.method}")

    def _zero(self, t: torch.Tensor, fmt: QFormat, n: int, k: int) -> torch.Tensor | None:
        if fmt.sym:  # symmetric checkpoints may still carry all-zero zero points
            if t.dtype == torch.int32 and torch.any(t != 0):
                # packed zeros of a symmetric scheme hold the offset 2**(b-1): only that is allowed
                z = _unpack_dim0(t, fmt, n)
                if torch.any(z != fmt.implicit_zero):
                    raise QuantFormatError("symmetric scheme with non-zero zero points")
            elif t.dtype != torch.int32 and torch.any(t != 0):
                raise QuantFormatError("symmetric scheme with non-zero zero points")
            return None
        sn, sk = fmt.scale_shape(n, k)
        per_word = 32 // fmt.bits
        if t.dtype == torch.int32 and t.shape[0] == -(-sn // per_word):
            return _unpack_dim0(t, fmt, sn).reshape(sn, sk)
        return (t.to(torch.int16).reshape(sn, sk) + fmt.implicit_zero).to(torch.uint8)


def _unpack_dim0(t: torch.Tensor, fmt: QFormat, rows: int) -> torch.Tensor:
    """int32 words packed along dim 0 ([ceil(rows*b/32), G]) -> unsigned codes [rows, G]."""
    b = t.t().contiguous().view(torch.uint8)  # [G, words*4] bytes, little-endian
    codes = unpack_int4(b, rows) if fmt.bits == 4 else b[:, :rows]
    return codes.t().contiguous()


def pack_words(codes_bytes: torch.Tensor) -> torch.Tensor:
    """Our bytes [.., B] (int4 nibble pairs or int8 codes) -> little-endian int32 words [.., ceil(B/4)]."""
    pad = (-codes_bytes.shape[-1]) % 4
    if pad:
        codes_bytes = torch.nn.functional.pad(codes_bytes, (0, pad))
    shape = codes_bytes.shape
    return codes_bytes.contiguous().reshape(-1).view(torch.int32).reshape(*shape[:-1], shape[-1] // 4)


def pack_zero_dim0(zero: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Unsigned zero points [rows, G] -> compressed-tensors' int32 packing along dim 0."""
    zt = zero.t().contiguous()
    b = pack_int4(zt) if fmt.bits == 4 else zt
    return pack_words(b).t().contiguous()


# -- detection ---------------------------------------------------------------------------------
def _ct_scheme(qc: dict) -> tuple[str, Scheme]:
    fmt_name = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise QuantFormatError("compressed-tensors config without config_groups")
    schemes = []
    for name, group in groups.items():
        w = group.get("weights") or {}
        if not w:
            continue
        bits, typ = w.get("num_bits"), w.get("type", "int")
        strategy = w.get("strategy")
        sym = w.get("symmetric", True)
        gformat = group.get("format") or fmt_name
        if typ == "float":
            if bits != 8:
                raise QuantFormatError(f"compressed-tensors group {name}: {bits}-bit floats are not supported")
            block = tuple(w["block_structure"]) if strategy == "block" and w.get("block_structure") else None
            act = group.get("input_activations") or {}
            schemes.append((gformat, Scheme("fp8", None, True, block, strategy == "tensor", bool(act.get("dynamic", True)) if act else False)))
        elif typ == "int":
            if bits not in (4, 8):
                raise QuantFormatError(f"compressed-tensors group {name}: int{bits} weights are not supported")
            if w.get("actorder") not in (None, "static", False):
                raise QuantFormatError("activation-ordered (actorder) groups are not supported")
            gs = w.get("group_size") if strategy == "group" else None
            if strategy not in ("group", "channel"):
                raise QuantFormatError(f"compressed-tensors int strategy {strategy!r} is not supported")
            schemes.append((gformat, Scheme(f"int{bits}", gs, bool(sym))))
        else:
            raise QuantFormatError(f"compressed-tensors weight type {typ!r} is not supported")
    if not schemes:
        raise QuantFormatError("compressed-tensors config quantizes no weights")
    if len(set(schemes)) > 1:
        raise QuantFormatError(f"mixed compressed-tensors schemes are not supported: {sorted(set(map(str, schemes)))}")
    return schemes[0]


def detect(config: dict) -> CheckpointFormat | None:
    """The checkpoint format named by config.json's quantization_config (None: not quantized)."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        fmt_name, scheme = _ct_scheme(qc)
        if fmt_name == "pack-quantized":
            parts = {".weight_packed": "qweight", ".weight_scale": "scale", ".weight_zero_point": "zero",
                     ".weight_shape": "shape", ".weight_g_idx": "g_idx"}
            return CheckpointFormat("compressed-tensors/pack-quantized", scheme, ".weight_packed", parts)
        if fmt_name in ("naive-quantized", "int-quantized", "float-quantized"):
            if fmt_name != "float-quantized" and scheme.method != "int8":
                raise QuantFormatError(f"{fmt_name} with {scheme.method} weights is not supported")
            parts = {".weight": "qweight", ".weight_scale": "scale", ".weight_zero_point": "zero",
                     ".input_scale": "ignore", ".input_zero_point": "ignore", ".weight_g_idx": "g_idx"}
            return CheckpointFormat(f"compressed-tensors/{fmt_name}", scheme, ".weight_scale", parts)
        raise QuantFormatError(f"compressed-tensors format {fmt_name!r} is not supported "
                               "(supported: pack-quantized, naive-quantized, int-quantized, float-quantized)")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise QuantFormatError(f"fp8 checkpoints in {qc.get('fmt')!r} are not supported (e4m3 only)")
        block = qc.get("weight_block_size")
        scheme = Scheme("fp8", None, True, tuple(block) if block else None, False, qc.get("activation_scheme", "dynamic") == "dynamic")
        parts = {".weight": "qweight", ".weight_scale_inv": "scale", ".weight_scale": "scale", ".input_scale": "ignore"}
        marker = ".weight_scale_inv" if block else ".weight_scale"
        return CheckpointFormat("fp8" + ("-block" if block else ""), scheme, marker, parts)
    raise QuantFormatError(
        f"checkpoint quantized with {method!r}; thinktalk loads compressed-tensors (AWQ/GPTQ W4A16, W8A16, "
        "FP8) and Qwen's fp8 format; convert it, or start from the bf16 checkpoint with --quantization"
    )


# -- writing ------------------------------------------------------------------------------------
def quantization_config(method: str, group_size: int | None, sym: bool, fp8_block: int | None, ignore: list[str]) -> dict:
    """config.json quantization_config for what `thinktalk quantize` writes."""
    if method == "fp8" and fp8_block:
        return {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [fp8_block, fp8_block], "modules_to_not_convert": ignore,
        }
    if method == "fp8":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
                   "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                "group_size": None, "block_structure": None, "actorder": None, "observer": None}
        fmt = "float-quantized"
    else:
        bits = 4 if method == "int4" else 8
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group_size else "channel",
                   "group_size": group_size or None, "dynamic": False, "block_structure": None, "actorder": None,
                   "observer": "minmax"}
        acts = None
        fmt = "pack-quantized"
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore, "kv_cache_scheme": None,
    }


def write_tensors(module: str, qweight: torch.Tensor, scale: torch.Tensor, zero, fmt: QFormat, k: int,
                  fp8_block: int | None, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors for one quantized 2-D weight, in the format quantization_config names."""
    n = qweight.shape[0]
    if fmt.method == "fp8":
        key = ".weight_scale_inv" if fp8_block else ".weight_scale"
        return {f"{module}.weight": qweight.contiguous(), f"{module}{key}": scale.float().contiguous()}
    out = {
        f"{module}.weight_packed": pack_words(qweight),
        f"{module}.weight_scale": scale.to(scale_dtype).contiguous(),
        f"{module}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if zero is not None:
        out[f"{module}.weight_zero_point"] = pack_zero_dim0(zero, fmt)
    return out


MODULE_RE = re.compile(r"^(?P<module>.+)\.weight$")
