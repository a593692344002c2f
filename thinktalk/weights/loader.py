"""Load a Hugging Face Qwen3-Omni checkpoint folder into our model.

Shards are read one at a time with safetensors, each tensor placed straight on the target device
in the target dtype, so peak memory is the model plus one tensor. Every problem is reported with
the names involved: a folder that is not a Qwen3-Omni checkpoint, a missing or truncated shard,
missing or unexpected tensors, shapes that do not match the config.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import ConfigError, OmniConfig, load_config
from .names import to_ours

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint's tensors do not fit the model its config describes."""


def _names_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE}; no weights to load")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shards listed in the index are missing: {_names_list(missing)}")
    return [folder / f for f in files]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: OmniConfig, device: str | torch.device, dtype: torch.dtype, with_talker: bool | None = None):
    """Our model for `cfg`, created directly on `device` in `dtype` (random init)."""
    from ..models.omni import OmniModel

    with torch.device(device), default_dtype(dtype):
        model = OmniModel(cfg, with_talker=with_talker)
    return model.eval()


def load_model(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_talker: bool | None = None,
    progress: bool = True,
    quantization=None,
):
    """Build the model described by `folder/config.json` and fill it from the folder's shards.

    with_talker=False skips the talker and code2wav (text-only serving); their tensors are then
    ignored, not reported as unexpected.
    quantization: None | "fp8" | "int8" | "int4" | weights.quant.QuantConfig — quantize while
    loading; pre-quantized checkpoints are detected from config.json (see weights/quant.py).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a directory")
    cfg = load_config(folder)
    files = shard_files(folder)
    from .quant import load_hook

    hook = load_hook(folder, cfg, files, quantization, device, dtype)
    model = hook.build_model(with_talker) if hook else build_model(cfg, device, dtype, with_talker)
    load_weights(model, files, progress=progress, hook=hook)
    return model


def load_weights(model, files: list[Path], progress: bool = True, hook=None) -> None:
    params = dict(model.named_parameters())
    persistent = model.state_dict().keys()  # once: per buffer it is quadratic in the model size
    params.update({n: b for n, b in model.named_buffers() if n in persistent})
    if hook is not None:  # packed weights and scales are the hook's to fill and check
        params = {n: p for n, p in params.items() if not hook.owns(n)}
    # elements of each parameter filled so far: stacked experts are filled piece by piece
    filled = {name: 0 for name in params}
    skipped_prefixes = () if model.has_talker else ("talker.", "code2wav.")
    unexpected, mismatched = [], []
    for file in tqdm(files, desc="loading shards", unit="shard", disable=not progress):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read shard ({exc}); is the file truncated or corrupt?") from exc
        with handle:
            for key in handle.keys():
                if key.startswith(skipped_prefixes):
                    continue
                if hook is not None and hook.consume(key, handle):  # quantized modules
                    continue
                target = to_ours(key)
                param = params.get(target.name)
                if param is None:
                    unexpected.append(key)
                    continue
                dest = target.view(param.data)
                try:
                    tensor = handle.get_tensor(key)
                except Exception as exc:
                    raise CheckpointError(f"{file}: tensor {key} cannot be read ({exc}); truncated shard?") from exc
                if tuple(tensor.shape) != tuple(dest.shape):
                    mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(dest.shape)}")
                    continue
                dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))
                filled[target.name] += dest.numel()
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_names_list(mismatched)}")
    missing = [n for n, p in params.items() if filled[n] != p.numel()]
    if missing:
        problems.append(f"missing tensors: {_names_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names_list(unexpected)}")
    if hook is not None:
        problems.extend(hook.problems())
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))
