"""Checkpoint loading: a tiny checkpoint loads, and every kind of broken checkpoint is named."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thinktalk.config import ConfigError
from thinktalk.weights.loader import CheckpointError, load_model
from thinktalk.weights.tiny import make_tiny


@pytest.fixture
def ckpt(tiny_thinking, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_thinking, dst)
    return dst


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _rewrite_shard(folder, key_filter=None, extra=None, replace=None):
    """Rewrite the shard holding the first expert tensor with some tensors dropped/added/replaced."""
    index = _index(folder)
    key = next(k for k in index["weight_map"] if ".experts.0.up_proj" in k)
    shard = folder / index["weight_map"][key]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if key_filter:
        tensors = {k: v for k, v in tensors.items() if key_filter(k, key)}
    if replace:
        tensors[key] = replace(tensors[key])
    tensors.update(extra or {})
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return key


def test_tiny_loads_and_has_no_talker(ckpt):
    model = load_model(ckpt, progress=False)
    assert not model.has_talker and model.talker is None
    assert model.thinker.model.layers[0].mlp.experts.gate_up_proj.abs().sum() > 0


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="not a Qwen3-Omni checkpoint"):
        load_model(tmp_path, progress=False)


def test_missing_tensor_is_named(ckpt):
    key = _rewrite_shard(ckpt, key_filter=lambda k, victim: k != victim)
    with pytest.raises(CheckpointError, match="missing tensors") as err:
        load_model(ckpt, progress=False)
    # the stacked parameter the expert belongs to is named
    assert key.rsplit(".", 3)[0] in str(err.value)


def test_unexpected_tensor_is_named(ckpt):
    _rewrite_shard(ckpt, extra={"thinker.model.layers.0.bogus.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: thinker\.model\.layers\.0\.bogus\.weight"):
        load_model(ckpt, progress=False)


def test_shape_mismatch_is_named(ckpt):
    key = _rewrite_shard(ckpt, replace=lambda t: t[:-1])
    with pytest.raises(CheckpointError, match="shape mismatches") as err:
        load_model(ckpt, progress=False)
    assert key in str(err.value)


def test_truncated_shard(ckpt):
    shard = ckpt / sorted(set(_index(ckpt)["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ckpt, progress=False)


def test_missing_shard_file(ckpt):
    shard = ckpt / sorted(set(_index(ckpt)["weight_map"].values()))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(ckpt, progress=False)


def test_make_tiny_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError):
        make_tiny(tmp_path)


@pytest.mark.parametrize("variant", ["instruct", "thinking", "captioner"])
def test_transformers_loads_tiny_without_missing_or_unexpected_keys(variant, request):
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(f"tiny_{variant}")
    model, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert model.has_talker == (variant == "instruct")
