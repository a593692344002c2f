"""Configs of the tiny random-weight checkpoints: the real Qwen3-Omni config with small sizes.

Every token id, codec id, speaker id, vocabulary size and processing rule stays as in the real
model, so the real tokenizer, chat template and processor apply unchanged; only widths, depths
and expert counts shrink. Constraints kept: M-RoPE sections sum to head_dim/2, the vision
encoder's deepstack layers exist, the talker's accept_hidden_layer is a thinker layer.
"""

from __future__ import annotations

import copy
from typing import Any

from ..config import ASSETS
import json

VARIANTS = ("instruct", "thinking", "captioner")

_THINKER_TEXT = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
)
_THINKER_ROPE_SECTION = [4, 2, 2]
_AUDIO = dict(
    d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, output_dim=64,
    downsample_hidden_size=16,
)
_VISION = dict(
    hidden_size=32, depth=3, deepstack_visual_indexes=[0, 1, 2], num_heads=4, intermediate_size=64,
    out_hidden_size=64,
)
_TALKER_TEXT = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8,
    num_experts_per_tok=2,
)
_TALKER_ROPE_SECTION = [2, 1, 1]
_CODE_PREDICTOR = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, layer_types=["full_attention"] * 2,
)
_CODE2WAV = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    codebook_dim=16, decoder_dim=32, vector_quantization_hidden_dimension=16,
)


def reference_config_dict() -> dict[str, Any]:
    return json.loads((ASSETS / "config_instruct.json").read_text())


def tiny_config_dict(variant: str = "instruct") -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    cfg = copy.deepcopy(reference_config_dict())
    thinker = cfg["thinker_config"]
    thinker["text_config"].update(_THINKER_TEXT)
    thinker["text_config"]["rope_parameters"]["mrope_section"] = list(_THINKER_ROPE_SECTION)
    thinker["audio_config"].update(_AUDIO)
    thinker["vision_config"].update(_VISION)
    talker = cfg["talker_config"]
    talker["text_config"].update(_TALKER_TEXT)
    talker["text_config"]["rope_parameters"]["mrope_section"] = list(_TALKER_ROPE_SECTION)
    talker["code_predictor_config"].update(_CODE_PREDICTOR)
    talker["thinker_hidden_size"] = _THINKER_TEXT["hidden_size"]
    talker["accept_hidden_layer"] = 2
    cfg["code2wav_config"].update(_CODE2WAV)
    if variant != "instruct":
        # Thinking and Captioner checkpoints hold only the thinker (SOURCES.md: same thinker,
        # enable_audio_output false, no talker or code2wav weights).
        cfg["enable_audio_output"] = False
    cfg["thinktalk_tiny_random"] = {"variant": variant, "note": "random weights: output is meaningless"}
    return cfg
