"""Write tiny random-weight Qwen3-Omni checkpoints in exactly the Hugging Face format.

The folder holds config.json, sharded safetensors with an index, the real tokenizer files,
preprocessor config and chat template, so the same code paths (ours and transformers') that read a
real checkpoint read it. The weights are random: whatever the model says is meaningless, and the
config carries a `thinktalk_tiny_random` marker so everything built on it can say so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ASSETS, config_from_dict
from ..multimodal.tokenizer import load_tokenizer
from .names import to_checkpoint
from .tiny_config import tiny_config_dict

TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt")
SHARD_BYTES = 8 * 1024 * 1024


def _random_like(name: str, shape: tuple[int, ...], gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Random values with sensible scales, so activations neither vanish nor explode."""
    noise = torch.randn(shape, generator=gen, device=device)
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    if len(shape) == 1:
        if "norm" in leaf or "ln" in leaf.split("_") or leaf.startswith("ln"):
            return 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
        return 0.1 * noise
    if "embed" in name or "codebook" in name:
        return noise
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    if "experts" in name:  # stacked [E, out, in]: fan-in is the last dim
        fan_in = shape[-1]
    return noise / fan_in**0.5


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and persistent buffer with seeded random values, in place, on its device."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(_random_like(name, tuple(tensor.shape), gen, device))
    return model


def make_tiny(out: str | Path, variant: str = "instruct", seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `variant` to `out` (created; must be empty or absent)."""
    from .loader import build_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder exists and is not empty")
    cfg_dict = tiny_config_dict(variant)
    cfg = config_from_dict(cfg_dict)
    model = randomize_(build_model(cfg, "cpu", torch.float32), seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        for ckpt_name, target in to_checkpoint(name, tuple(value.shape)):
            tensors[ckpt_name] = target.view(value).to(torch.bfloat16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(tensors, out)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES + ("preprocessor_config.json", "generation_config.json"):
        shutil.copyfile(ASSETS / name, out / name)
    # a tokenizer.json too (built from those files, not shipped): loads in a third of the time
    load_tokenizer(ASSETS).save(str(out / "tokenizer.json"))
    template = "chat_template_thinking.jinja" if variant == "thinking" else "chat_template_instruct.jinja"
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": (ASSETS / template).read_text()}, indent=2, sort_keys=True) + "\n"
    )
    return out


def _write_shards(tensors: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    total = len(shards)
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def demo_model_path(variant: str = "instruct") -> Path:
    """The demo checkpoint (tiny, random weights), made on first use in the user's cache folder."""
    from platformdirs import user_cache_dir

    root = Path(os.environ.get("THINKTALK_CACHE") or user_cache_dir("thinktalk"))
    path = root / f"demo-{variant}-tiny-random"
    if (path / "model.safetensors.index.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".making-"))
    try:
        make_tiny(tmp / "ckpt", variant=variant, seed=0)
        try:
            os.replace(tmp / "ckpt", path)
        except OSError:
            if not (path / "model.safetensors.index.json").is_file():  # not made meanwhile by another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_tiny_random(cfg) -> bool:
    return "thinktalk_tiny_random" in cfg
