"""Weight quantization: which modules, in-place quantization, the loader hook, pre-quantized files.

    quantize_model_(model, "int4", group_size=128, sym=True)   quantize a loaded model in place
    load_model(folder, ..., quantization="int4")                quantize while loading (loader.py
                                                                calls `load_hook` below)
    quantize_checkpoint(src, dst, "int4")                       write a pre-quantized checkpoint
                                                                (`thinktalk quantize`)

What is quantized. Always: the linear layers of the three decoder stacks (QUANTIZED_MODULES) —
thinker LM, talker LM and code predictor: q/k/v/o projections, routed experts, the talker's
shared expert and the code predictor's dense MLP, 97% of the weights (the thinker's experts alone
are 29 of 35 B), with the chosen method. By default also the cheap parts (PART_GROUPS), each with
a method whose error stays small:

    encoders     audio and vision encoder linears: int8 under int4/int8, fp8 (W8A8) under fp8
                 (the spec suffix -encint4 / -encint8 / -encfp8 picks another)
    heads        thinker lm_head, talker codec_head, the code predictor's 15 heads: int8
    embeddings   thinker embed_tokens, talker and code-predictor codec embeddings: int8, one
                 scale per 128 columns of a row (layers.quant_linear.QuantEmbedding dequantizes
                 only the rows a lookup gathers)

Together 3.5 GiB of bf16 -> 1.8 GiB on the full model. The spec suffix -decoders keeps them all in
the compute dtype (decoders only), -noencoders / -noheads / -noembeddings one group. Always kept
in the compute dtype: MoE routers and the shared-expert gate, norms, the talker's text/hidden
projections, the encoders' convolutions (patch embedding, audio conv stack) and position tables,
and code2wav (0.4 GiB, mostly convolutions).

Loading quantized (bf16 checkpoint + quantization, or a pre-quantized checkpoint): the model is
built with its parameters on the meta device (buffers such as RoPE tables are real), the modules
to quantize are replaced by QuantLinear / QuantExperts with empty packed buffers on the target
device, the rest is allocated, then every checkpoint tensor is quantized the moment it is read
(one tensor, or one expert's projection, at a time). Peak device memory is the quantized model
plus one bf16 tensor; the full bf16 model never exists.

A pre-quantized checkpoint's modules keep the checkpoint's format; with `quantization` given as
well, the modules it left in bf16 that the policy covers (e.g. the talker of a thinker-only AWQ
checkpoint) are quantized on load with that method.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..kernels.quant_format import METHODS, QFormat, quantize, resolve_format
from ..layers.quant_linear import QuantEmbedding, QuantExperts, QuantLinear, QuantWeight, install_quant_experts
from .community_formats import (
    CheckpointFormat, QuantFormatError, Scheme, detect, quantization_config, write_tensors,
)
from .names import to_ours

log = logging.getLogger(__name__)

__all__ = [
    "QuantConfig", "quantize_model_", "load_hook", "quantize_checkpoint", "quantized_module_names",
    "QuantFormatError", "weight_bytes",
]

_DECODERS = r"^(thinker\.model|talker\.model|talker\.code_predictor\.model)\.layers\.\d+\."
LINEAR_RE = re.compile(
    _DECODERS + r"(self_attn\.[qkvo]_proj|mlp\.(gate_proj|up_proj|down_proj)|mlp\.shared_expert\.(gate_proj|up_proj|down_proj))$"
)
EXPERTS_RE = re.compile(_DECODERS + r"mlp\.experts$")
ENCODERS_RE = re.compile(r"^thinker\.(audio_tower|visual)\.")
HEADS_RE = re.compile(r"^(thinker\.lm_head|talker\.codec_head|talker\.code_predictor\.lm_head\.\d+)$")
EMBEDDINGS_RE = re.compile(
    r"^(thinker\.model\.embed_tokens|talker\.model\.codec_embedding|talker\.code_predictor\.model\.codec_embedding\.\d+)$"
)
QUANTIZED_MODULES = (
    "thinker/talker/code-predictor decoder layers: self_attn.{q,k,v,o}_proj, mlp.experts (routed), "
    "mlp.shared_expert.*, dense mlp.{gate,up,down}_proj"
)
PART_GROUPS = ("encoders", "heads", "embeddings")  # quantized by default besides the decoders
SMALL_PART_METHOD = "int8"  # heads and embeddings, whatever the decoders get


def default_encoder_method(method: str) -> str:
    """int8 weight-only under int4/int8 (int4 encoders: see the README's error table), fp8 under fp8."""
    return "fp8" if method == "fp8" else "int8"


@dataclass(frozen=True)
class QuantConfig:
    method: str  # int4 | int8 | fp8
    group_size: int | None = 128  # int: columns per scale (None: per output channel)
    sym: bool = True
    fp8_block: int | None = None  # fp8: None per output channel, 128 for 128x128 blocks
    act_quant: bool = True  # fp8: dynamic per-token activation quantization (W8A8) where supported
    include: tuple[str, ...] = PART_GROUPS  # groups quantized besides the decoder stacks
    encoder_method: str | None = None  # None: default_encoder_method(method)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "fp8" and not self.sym:
            raise ValueError("fp8 is symmetric; --asym applies to int4/int8")
        object.__setattr__(self, "include", tuple(self.include))
        bad = set(self.include) - set(PART_GROUPS)
        if bad:
            raise ValueError(f"unknown module group(s) {sorted(bad)}; known: {', '.join(PART_GROUPS)}")
        if self.encoder_method is not None and self.encoder_method not in METHODS:
            raise ValueError(f"unknown encoder quantization {self.encoder_method!r}")

    @classmethod
    def parse(cls, spec: "str | QuantConfig | None") -> "QuantConfig | None":
        """None | QuantConfig | 'int4' | 'int8' | 'fp8', with suffixes: '-asym', '-g64', '-channel',
        '-block128' (fp8), '-encint8' / '-encfp8' / '-encint4' (encoder method), '-decoders' (only
        the decoder stacks), '-noencoders' / '-noheads' / '-noembeddings' (keep one group)."""
        if spec is None or isinstance(spec, QuantConfig):
            return spec
        parts = str(spec).lower().split("-")
        kw: dict = {}
        include = list(PART_GROUPS)
        for p in parts[1:]:
            if p == "asym":
                kw["sym"] = False
            elif p.startswith("g") and p[1:].isdigit():
                kw["group_size"] = int(p[1:])
            elif p == "channel":
                kw["group_size"] = None
            elif p.startswith("block"):
                kw["fp8_block"] = int(p[5:] or 128)
            elif p == "decoders":
                include = []
            elif p.startswith("no") and p[2:] in PART_GROUPS:
                include = [g for g in include if g != p[2:]]
            elif p.startswith("enc"):  # enc (the decoders' method) or encint8 / encfp8 / encint4
                kw["encoder_method"] = p[3:] or parts[0]
                if "encoders" not in include:
                    include.append("encoders")
            else:
                raise ValueError(f"unknown quantization option {p!r} in {spec!r}")
        return cls(parts[0], include=tuple(g for g in PART_GROUPS if g in include), **kw)

    def group_of(self, name: str) -> str | None:
        """The part group a module name belongs to (None: decoder stacks or nothing)."""
        if ENCODERS_RE.match(name):
            return "encoders"
        if HEADS_RE.match(name):
            return "heads"
        if EMBEDDINGS_RE.match(name):
            return "embeddings"
        return None

    def method_for(self, name: str = "") -> str:
        group = self.group_of(name)
        if group == "encoders":
            return self.encoder_method or default_encoder_method(self.method)
        if group in ("heads", "embeddings"):
            return SMALL_PART_METHOD
        return self.method

    def fmt(self, k: int, name: str = "") -> QFormat:
        method = self.method_for(name)
        return resolve_format(method, k, self.group_size, self.sym or method == "fp8", self.fp8_block)

    def scheme(self, name: str = "") -> Scheme:
        method = self.method_for(name)
        block = (self.fp8_block, self.fp8_block) if method == "fp8" and self.fp8_block else None
        return Scheme(method, self.group_size, self.sym or method == "fp8", block, False, self.act_quant)

    def covers_linear(self, name: str) -> bool:
        if LINEAR_RE.match(name):
            return True
        group = self.group_of(name)
        return group in ("encoders", "heads") and group in self.include

    def covers_experts(self, name: str) -> bool:
        return bool(EXPERTS_RE.match(name))

    def covers_embedding(self, name: str) -> bool:
        return "embeddings" in self.include and bool(EMBEDDINGS_RE.match(name))


# -- in-place quantization of a built model ----------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, module)
    # a q/k/v or gate/up stack (engine's fuse_qkv / fuse_gate_up) still holds the replaced
    # projection's weights: drop it, the projections run on their own (until fused again)
    for stack in ("qkv_weight", "qkv_proj", "gate_up_weight", "gate_up_proj"):
        owner.__dict__.pop(stack, None)


def quantized_module_names(model: nn.Module, qcfg: QuantConfig, prefix: str = "") -> tuple[list[str], list[str]]:
    """(linear and embedding module names, SparseMoE module names) the policy quantizes in `model`.

    prefix: `model`'s own name in the whole model (e.g. "thinker.model.layers.3." for one layer).
    """
    from ..layers.moe import Experts

    dense, moes = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and qcfg.covers_linear(prefix + name):
            dense.append(name)
        elif isinstance(mod, nn.Embedding) and qcfg.covers_embedding(prefix + name):
            dense.append(name)
        elif isinstance(mod, Experts) and qcfg.covers_experts(prefix + name):
            moes.append(name.rpartition(".")[0])
    return dense, moes


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    method: "str | QuantConfig",
    group_size: int | None = 128,
    sym: bool = True,
    *,
    fp8_block: int | None = None,
    act_quant: bool = True,
    include: Iterable[str] | None = None,
    progress: bool = False,
    prefix: str = "",
    names: Iterable[str] | None = None,
) -> nn.Module:
    """Quantize `model` in place (module by module, so the extra memory is one module's worth).

    method: "int4" | "int8" | "fp8" or a QuantConfig (then the other arguments are ignored).
    include: the part groups quantized besides the decoders (None: all of PART_GROUPS).
    prefix: the name of `model` inside the whole OmniModel when quantizing a part of it (e.g.
    "thinker.model.layers.3."), so the policy sees full names.
    names: only these of the modules the policy covers (names relative to `model`; e.g. the parts
    already materialized while the rest is still on the meta device).
    """
    qcfg = method if isinstance(method, QuantConfig) else QuantConfig(
        method, group_size, sym, fp8_block, act_quant, PART_GROUPS if include is None else tuple(include)
    )
    dense, moes = quantized_module_names(model, qcfg, prefix)
    if names is not None:
        wanted = set(names)
        dense, moes = [n for n in dense if n in wanted], [n for n in moes if n in wanted]
    from tqdm import tqdm

    for name in tqdm(dense + moes, desc=f"quantizing ({qcfg.method})", disable=not progress):
        mod = model.get_submodule(name) if name else model
        if isinstance(mod, nn.Linear):
            q = QuantLinear.from_linear(mod, qcfg.fmt(mod.in_features, prefix + name), act_quant=qcfg.act_quant)
            _set_module(model, name, q)
        elif isinstance(mod, nn.Embedding):
            _set_module(model, name, QuantEmbedding.from_embedding(mod, qcfg.fmt(mod.embedding_dim, prefix + name)))
        else:
            ex = mod.experts
            _, two_i, hidden = ex.gate_up_proj.shape
            q = QuantExperts.from_experts(ex, qcfg.fmt(hidden), qcfg.fmt(two_i // 2))
            install_quant_experts(mod, q)
            del ex
        del mod
    if not prefix:
        model.quant_config = qcfg
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters + buffers per top-level component (thinker.model, talker, ...)."""
    out: dict[str, int] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "thinker" else parts[0]
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


# -- building with parameters on meta ----------------------------------------------------------
@contextlib.contextmanager
def _params_on_meta():
    """Parameters registered inside go to the meta device (buffers, e.g. RoPE tables, stay real).

    Each parameter is first created where the model is being built and moved to meta when it is
    registered (before its initializer runs), so the transient cost is one empty tensor.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _materialize_(model: nn.Module, device, dtype) -> None:
    """Allocate (uninitialized) every parameter still on meta; the loader fills them."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                mod._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)


# -- the loader hook ----------------------------------------------------------------------------
@dataclass
class _Slot:
    """One quantized module being filled: a QuantLinear weight or the two stacked expert weights."""

    name: str
    weights: dict[str, QuantWeight]  # "" for a linear; "gate_up_proj" / "down_proj" for experts
    source: CheckpointFormat | None  # None: float tensors quantized on load
    filled: dict[str, int] = field(default_factory=dict)

    def count(self, part: str, numel: int) -> None:
        self.filled[part] = self.filled.get(part, 0) + numel


class QuantLoadHook:
    """Built by `load_hook`; loader.load_weights hands it every checkpoint key first (`consume`)."""

    def __init__(self, cfg, qcfg: QuantConfig | None, ckpt: CheckpointFormat | None, ckpt_modules: set[str], device, dtype):
        self.cfg, self.qcfg, self.ckpt = cfg, qcfg, ckpt
        self.ckpt_modules = ckpt_modules  # checkpoint module names stored quantized
        self.device, self.dtype = torch.device(device), dtype
        self.slots: dict[str, _Slot] = {}
        self.mismatched: list[str] = []

    # -- building ------------------------------------------------------------------------------
    def _ckpt_owner(self, ckpt_module: str) -> str:
        t = to_ours(ckpt_module + ".weight")
        return t.name.rpartition(".")[0] if t.expert is not None else ckpt_module

    def build_model(self, with_talker: bool | None):
        from ..layers.moe import Experts
        from .loader import build_model

        with _params_on_meta():
            model = build_model(self.cfg, self.device, self.dtype, with_talker)
        from_ckpt = {self._ckpt_owner(m) for m in self.ckpt_modules}
        if not model.has_talker:  # text-only: the loader skips the talker's tensors
            from_ckpt = {m for m in from_ckpt if not m.startswith(("talker.", "code2wav."))}
        act_ckpt = self.ckpt.scheme.act_quant if self.ckpt else True
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear):
                scheme, source = self._scheme_for(name, from_ckpt, linear=True)
                if scheme is None:
                    continue
                fmt = scheme.fmt(mod.out_features, mod.in_features)
                act = act_ckpt if source is not None else self.qcfg.act_quant
                q = QuantLinear(mod.in_features, mod.out_features, mod.bias is not None, fmt, self.dtype, self.device, act)
                _set_module(model, name, q)
                self.slots[name] = _Slot(name, {"": q.weight}, source)
            elif isinstance(mod, nn.Embedding):
                if self.qcfg is None or not self.qcfg.covers_embedding(name):
                    continue
                q = QuantEmbedding(mod.num_embeddings, mod.embedding_dim, self.qcfg.fmt(mod.embedding_dim, name),
                                   self.dtype, self.device)
                _set_module(model, name, q)
                self.slots[name] = _Slot(name, {"": q.weight}, None)
            elif isinstance(mod, Experts):
                scheme, source = self._scheme_for(name, from_ckpt, linear=False)
                if scheme is None:
                    continue
                e, two_i, hidden = mod.gate_up_proj.shape
                q = QuantExperts(e, hidden, two_i // 2, scheme.fmt(two_i, hidden), scheme.fmt(hidden, two_i // 2),
                                 self.dtype, self.device)
                install_quant_experts(model.get_submodule(name.rpartition(".")[0]), q)
                self.slots[name] = _Slot(name, {"gate_up_proj": q.gate_up_proj, "down_proj": q.down_proj}, source)
        leftover = from_ckpt - set(self.slots)
        if leftover:
            raise QuantFormatError(f"quantized checkpoint tensors for modules thinktalk cannot quantize: {sorted(leftover)[:8]}")
        _materialize_(model, self.device, self.dtype)
        model.quant_config = self.qcfg
        model.checkpoint_quantization = self.ckpt.name if self.ckpt else None
        return model

    def _scheme_for(self, name: str, from_ckpt: set[str], linear: bool):
        if name in from_ckpt:
            return self.ckpt.scheme, self.ckpt
        q = self.qcfg
        if q is not None and (q.covers_linear(name) if linear else q.covers_experts(name)):
            return q.scheme(name), None
        return None, None

    # -- loading ----------------------------------------------------------------------------------
    def consume(self, key: str, handle) -> bool:
        """Take `key` if it belongs to a quantized module (True), else leave it to the loader."""
        route = self._route(key)
        if route is None:
            return False
        slot, wname, expert, rows, part = route
        if part == "ignore":
            return True
        try:
            tensor = handle.get_tensor(key)
        except Exception as exc:
            from .loader import CheckpointError

            raise CheckpointError(f"tensor {key} cannot be read ({exc}); truncated shard?") from exc
        w = slot.weights[wname]
        n_total = w.qweight.shape[-2]
        n = (rows.stop - rows.start) if rows is not None else n_total
        k = w.in_features
        try:
            if slot.source is None:  # float weight: quantize now
                if tuple(tensor.shape) != (n, k):
                    self.mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {(n, k)}")
                    return True
                q, s, z = quantize(tensor.to(self.device), w.fmt, scale_dtype=w.scale.dtype)
                w.store_(q, s, z, expert, rows)
                for p, t in (("qweight", q), ("scale", s), ("zero", z)):
                    if t is not None:
                        slot.count(f"{wname}.{p}", t.numel())
                return True
            fmt = w.fmt
            value = slot.source.convert(part, tensor, fmt, n, k)
            if value is None:
                return True
            self._store_part(slot, wname, w, part, value.to(self.device), expert, rows)
        except (ValueError, RuntimeError) as exc:
            self.mismatched.append(f"{key}: {exc}")
        return True

    def _store_part(self, slot: _Slot, wname: str, w: QuantWeight, part: str, value, expert, rows) -> None:
        dest = getattr(w, part)
        if dest is None:
            return
        if expert is not None:
            dest = dest[expert]
        if rows is not None:
            if part == "qweight":
                dest = dest[rows]
            else:
                bn = w.fmt.block_n
                if rows.start % bn:
                    raise ValueError(f"rows {rows.start}:{rows.stop} do not align with {bn}-row scale blocks")
                dest = dest[rows.start // bn : -(-rows.stop // bn)]
        if tuple(value.shape) != tuple(dest.shape):
            raise ValueError(f"{part} of shape {tuple(value.shape)} where the model expects {tuple(dest.shape)}")
        dest.copy_(value)
        slot.count(f"{wname}.{part}", value.numel())

    def _route(self, key: str):
        """key -> (slot, weight name, expert, rows, part) or None."""
        if self.ckpt is not None:
            split = self.ckpt.split(key)
            if split is not None and split[0] in self.ckpt_modules:
                module, part = split
                return self._locate(module, part)
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            r = self._locate(module, "weight")
            if r is not None and r[0].source is None:
                return r
        return None

    def _locate(self, ckpt_module: str, part: str):
        t = to_ours(ckpt_module + ".weight")
        if t.expert is None:
            slot = self.slots.get(ckpt_module)
            return None if slot is None else (slot, "", None, None, part)
        owner, _, wname = t.name.rpartition(".")
        slot = self.slots.get(owner)
        if slot is None:
            return None
        rows = None
        if t.half is not None:
            half = slot.weights[wname].qweight.shape[-2] // 2
            rows = slice(t.half * half, (t.half + 1) * half)
        return slot, wname, t.expert, rows, part

    def owns(self, name: str) -> bool:
        """Whether a model tensor (by state-dict name) is a quantized buffer this hook fills."""
        owner, _, part = name.rpartition(".")
        if part not in ("qweight", "scale", "zero"):
            return False
        owner = owner.rpartition(".")[0]  # drop ".weight" / ".gate_up_proj" / ".down_proj"
        return owner in self.slots

    def problems(self) -> list[str]:
        out = []
        if self.mismatched:
            out.append("quantized tensors that do not fit: " + ", ".join(sorted(self.mismatched)[:12]))
        missing = []
        for slot in self.slots.values():
            for wname, w in slot.weights.items():
                for part in ("qweight", "scale", "zero"):
                    t = getattr(w, part)
                    key = f"{wname}.{part}"
                    if t is not None and slot.filled.get(key, 0) != t.numel():
                        missing.append(f"{slot.name}{'.' + wname if wname else ''}.{part}")
        if missing:
            shown = ", ".join(sorted(missing)[:12])
            more = f", ... ({len(missing) - 12} more)" if len(missing) > 12 else ""
            out.append(f"missing quantized tensors: {shown}{more}")
        return out


def _checkpoint_keys(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            keys.extend(h.keys())
    return keys


def load_hook(folder, cfg, files: list[Path], quantization, device, dtype) -> QuantLoadHook | None:
    """The loader's quantization hook, or None for a plain checkpoint loaded unquantized."""
    qcfg = QuantConfig.parse(quantization)
    ckpt = detect(cfg.to_dict()) if "quantization_config" in cfg else None
    if qcfg is None and ckpt is None:
        return None
    ckpt_modules: set[str] = set()
    if ckpt is not None:
        ckpt_modules = ckpt.quantized_modules(_checkpoint_keys(files))
        if not ckpt_modules:
            raise QuantFormatError(f"{folder}: config says {ckpt.name} but no tensor ends in {ckpt.marker}")
        log.info("%s: pre-quantized checkpoint (%s, %s), %d quantized modules", folder, ckpt.name, ckpt.scheme, len(ckpt_modules))
    if qcfg is not None and ckpt is not None and qcfg.method != ckpt.scheme.method:
        log.warning("checkpoint is %s; modules it left unquantized get %s", ckpt.scheme.method, qcfg.method)
    return QuantLoadHook(cfg, qcfg, ckpt, ckpt_modules, device, dtype)


# -- writing pre-quantized checkpoints -----------------------------------------------------------
def _covered(key: str, qcfg: QuantConfig) -> bool:
    """Whether a checkpoint tensor is written quantized: decoder linears and experts, and the
    linears of included groups whose method is the checkpoint's one (a community checkpoint has a
    single scheme; embeddings have no community format). The rest is quantized on load when
    --quantization is given with the checkpoint."""
    m = re.match(r"^(?P<module>.+)\.weight$", key)
    if m is None:
        return False
    t = to_ours(key)
    if t.expert is not None:
        return qcfg.covers_experts(t.name.rpartition(".")[0])
    return qcfg.covers_linear(m["module"]) and qcfg.method_for(m["module"]) == qcfg.method


@torch.no_grad()
def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: "str | QuantConfig",
    group_size: int | None = 128,
    sym: bool = True,
    *,
    fp8_block: int | None = None,
    include: Iterable[str] = (),
    device: str | torch.device | None = None,
    shard_bytes: int = 4 * 2**30,
    progress: bool = True,
) -> Path:
    """Write a pre-quantized copy of the bf16 checkpoint `src` to `dst`, one shard at a time.

    Quantized modules are written in the community format (see community_formats); everything
    else, and the non-weight files (tokenizer, processor, templates), is copied. With method given
    by name, the decoder stacks are quantized, plus the encoders with the same method when
    include has "encoders"; with a QuantConfig, its linears whose method is its own (see
    _covered). Loading the result with --quantization as well quantizes the parts left in bf16.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..config import load_config
    from .loader import shard_files

    if isinstance(method, QuantConfig):
        qcfg = method
    else:
        include = tuple(include)
        qcfg = QuantConfig(method, group_size, sym, fp8_block, True, include,
                           encoder_method=method if "encoders" in include else None)
    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    if "quantization_config" in cfg:
        raise QuantFormatError(f"{src} is already quantized ({cfg.quantization_config.get('quant_method')}); start from bf16")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: folder exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = shard_files(src)

    ignore: set[str] = set()
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    written: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        name = f"model-{len(written) + 1:05d}.safetensors"
        save_file(pending, str(dst / name), metadata={"format": "pt"})
        written.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    for file in tqdm(files, desc=f"quantizing shards ({qcfg.method})", unit="shard", disable=not progress):
        with safe_open(str(file), framework="pt", device="cpu") as h:
            for key in h.keys():
                t = h.get_tensor(key)
                if t.dim() == 2 and t.is_floating_point() and _covered(key, qcfg):
                    module = key[: -len(".weight")]
                    fmt = qcfg.fmt(t.shape[1], module)
                    q, s, z = quantize(t.to(device), fmt, scale_dtype=t.dtype)
                    out = write_tensors(module, q.cpu(), s.cpu(), None if z is None else z.cpu(), fmt, t.shape[1], qcfg.fp8_block, t.dtype)
                else:
                    if key.endswith(".weight") and t.dim() == 2:
                        ignore.add(key[: -len(".weight")])
                    out = {key: t}
                for k, v in out.items():
                    pending[k] = v.contiguous()
                    pending_bytes += v.numel() * v.element_size()
                if pending_bytes >= shard_bytes:
                    flush()
    flush()

    total = len(written)
    weight_map = {}
    for i, (name, keys) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (dst / name).rename(dst / final)
        weight_map.update({k: final for k in keys})
    total_size = sum((dst / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(
        qcfg.method, qcfg.group_size if qcfg.method != "fp8" else None, qcfg.sym, qcfg.fp8_block, sorted(ignore)
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, dst / f.name)
    return dst


def describe(model: nn.Module) -> str:
    """One line: how the model is quantized (for logs and the CLI)."""
    q = getattr(model, "quant_config", None)
    c = getattr(model, "checkpoint_quantization", None)
    if q is None and c is None:
        return "not quantized"
    bits = []
    if c:
        bits.append(f"checkpoint: {c}")
    if q:
        line = (f"on load: {q.method}" + (f" g{q.group_size}" if q.method != "fp8" and q.group_size else "")
                + ("" if q.sym else " asym"))
        if "encoders" in q.include:
            line += f", encoders {q.encoder_method or default_encoder_method(q.method)}"
        small = [g for g in ("heads", "embeddings") if g in q.include]
        if small:
            line += f", {' + '.join(small)} {SMALL_PART_METHOD}"
        kept = [g for g in PART_GROUPS if g not in q.include]
        if kept:
            line += f"; {', '.join(kept)} not quantized"
        bits.append(line)
    return ", ".join(bits)
