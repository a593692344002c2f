"""A typed-enough view of a Qwen3-Omni Hugging Face config.json.

The checkpoint's config is nested (thinker_config.text_config, talker_config.code_predictor_config,
code2wav_config, ...). `ConfigNode` gives attribute access to it with the same field names as the
HF config, so model code reads `cfg.thinker_config.text_config.hidden_size` exactly as the
reference does, and no value is ever written in code as a literal.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets" / "qwen3_omni"

# Defaults transformers fills in when a key is absent from config.json. Only fields our code reads
# and that a hand-written or older config may leave out are listed.
_TEXT_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "hidden_act": "silu",
    "norm_topk_prob": True,
    "mlp_only_layers": [],
    "decoder_sparse_step": 1,
    "tie_word_embeddings": False,
    "sliding_window": None,
}


class ConfigError(ValueError):
    """The folder or config is not a usable Qwen3-Omni checkpoint."""


class ConfigNode:
    """Attribute access over a (nested) dict; unknown attributes raise AttributeError."""

    def __init__(self, data: dict[str, Any], defaults: dict[str, Any] | None = None):
        merged = dict(defaults or {})
        merged.update(data)
        object.__setattr__(self, "_data", merged)

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            raise AttributeError(f"config has no field {name!r}")
        value = data[name]
        if isinstance(value, dict) and not name.endswith(("speaker_id", "rope_parameters", "id2label", "label2id")):
            defaults = _TEXT_DEFAULTS if name == "text_config" else None
            return ConfigNode(value, defaults)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._data[name] = value

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            return default

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"ConfigNode({list(self._data)})"


class OmniConfig(ConfigNode):
    """The whole checkpoint config: thinker, optional talker and code2wav."""

    @property
    def has_talker(self) -> bool:
        return bool(self._data.get("enable_audio_output", False)) and "talker_config" in self._data

    @property
    def thinker(self) -> ConfigNode:
        return self.thinker_config

    @property
    def text(self) -> ConfigNode:
        return self.thinker_config.text_config


def load_config(path: str | Path) -> OmniConfig:
    """Read `config.json` from a checkpoint folder (or a path to the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json found; not a Hugging Face checkpoint folder")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config.json: {exc}") from exc
    return config_from_dict(data, source=str(file))


def config_from_dict(data: dict[str, Any], source: str = "config") -> OmniConfig:
    model_type = data.get("model_type")
    if model_type != "qwen3_omni_moe" or "thinker_config" not in data:
        raise ConfigError(
            f"{source}: model_type is {model_type!r}, expected 'qwen3_omni_moe' with a thinker_config; "
            "this is not a Qwen3-Omni checkpoint"
        )
    return OmniConfig(data)


def reference_config() -> OmniConfig:
    """The full-size Qwen3-Omni-30B-A3B-Instruct config shipped with the package."""
    return load_config(ASSETS / "config_instruct.json")
