"""The thinker: audio encoder + vision encoder + MoE language model with M-RoPE and deepstack.

Attribute names equal the checkpoint's (`thinker.model.layers.N...`, `thinker.audio_tower...`,
`thinker.visual...`, `thinker.lm_head`), so weight loading is a name table, not code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigNode
from ..layers.attention import AttentionBackend
from ..layers.decoder import DecoderStack
from .audio_encoder import AudioEncoder
from .vision_encoder import VisionEncoder


class ThinkerTextModel(DecoderStack):
    def __init__(self, cfg: ConfigNode):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


@dataclass
class MultimodalInputs:
    """Processor outputs for one or more prompts (the keys transformers' processor returns)."""

    input_features: torch.Tensor | None = None  # [n_audio, mel, frames]
    feature_attention_mask: torch.Tensor | None = None  # [n_audio, frames]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    # set when these are some of a request's items (multimodal.items.select_items): the mel frames
    # of the request's longest clip, so each clip encodes as it would beside all the others
    audio_longest_frames: int | None = None


class Thinker(nn.Module):
    def __init__(self, cfg: ConfigNode):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio_config)
        self.visual = VisionEncoder(cfg.vision_config)
        self.model = ThinkerTextModel(cfg.text_config)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)

    # -- embeddings ---------------------------------------------------------------------------
    def embed(
        self, input_ids: torch.Tensor, mm: MultimodalInputs | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]] | None]:
        """Token embeddings with audio/image/video features scattered into their placeholders.

        input_ids: [N] packed ids. Returns (embeddings [N, H], deepstack (visual mask, features) or None).
        """
        embeds = self.model.embed_tokens(input_ids)
        if mm is None:
            return embeds, None
        cfg = self.cfg
        if mm.input_features is not None:
            mask = mm.feature_attention_mask.bool()
            lens = mask.sum(1)
            feats = mm.input_features.permute(0, 2, 1)[mask].permute(1, 0)
            audio = self.audio_tower(feats.to(embeds.dtype), lens, mm.audio_longest_frames)
            embeds = _scatter(embeds, input_ids == cfg.audio_token_id, audio, "audio")
        visual_mask, stacks = None, []
        for pixels, grid, token in (
            (mm.pixel_values, mm.image_grid_thw, cfg.image_token_id),
            (mm.pixel_values_videos, mm.video_grid_thw, cfg.video_token_id),
        ):
            if pixels is None:
                continue
            feats, deep = self.visual(pixels.to(embeds.dtype), grid)
            mask = input_ids == token
            embeds = _scatter(embeds, mask, feats, "image" if token == cfg.image_token_id else "video")
            stacks.append((mask, deep))
        if not stacks:
            return embeds, None
        if len(stacks) == 1:  # images or videos alone: their features are already in token order
            mask, deep = stacks[0]
            return embeds, (mask, [d.to(embeds.dtype) for d in deep])
        # deepstack features of images and videos merged in token order
        visual_mask = stacks[0][0] | stacks[1][0]
        merged = []
        for layer in range(len(stacks[0][1])):
            joint = embeds.new_zeros(int(visual_mask.sum()), embeds.shape[-1])
            for mask, deep in stacks:
                joint[mask[visual_mask]] = deep[layer].to(embeds.dtype)
            merged.append(joint)
        return embeds, (visual_mask, merged)

    # -- language model -----------------------------------------------------------------------
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        kv: AttentionBackend,
        deepstack=None,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Returns final (normed) hidden states [N, H] and the captured layer outputs."""
        return self.model(embeds, positions, kv, deepstack, capture)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor, kind: str) -> torch.Tensor:
    n = int(mask.sum())
    if n != feats.shape[0]:
        raise ValueError(f"{kind}: {n} placeholder tokens but {feats.shape[0]} feature vectors")
    embeds = embeds.clone()
    embeds[mask] = feats.to(embeds.dtype)
    return embeds
