"""The decoder stack shared by the thinker LM, the talker LM and the code predictor.

All three are Qwen3 decoders (RMSNorm, attention with q/k norm, RoPE or M-RoPE); they differ only in
the feed-forward block (MoE with or without a shared expert, or dense), read from their config.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigNode
from .attention import Attention, AttentionBackend
from .mlp import GatedMLP
from .moe import SparseMoE
from .norm import RMSNorm
from .rotary import RotaryEmbedding


def num_experts(cfg: ConfigNode) -> int:
    """The talker's config names it num_local_experts, the thinker's num_experts."""
    return cfg.get("num_experts") or cfg.get("num_local_experts") or 0


def is_moe_layer(cfg: ConfigNode, layer: int) -> bool:
    return (
        num_experts(cfg) > 0
        and layer not in (cfg.get("mlp_only_layers") or [])
        and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0
    )


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ConfigNode, layer: int):
        super().__init__()
        eps = cfg.rms_norm_eps
        head_dim = cfg.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads
        self.self_attn = Attention(
            layer, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, eps,
            bias=cfg.get("attention_bias", False),
        )
        if is_moe_layer(cfg, layer):
            self.mlp = SparseMoE(
                cfg.hidden_size, cfg.moe_intermediate_size, num_experts(cfg), cfg.num_experts_per_tok,
                cfg.get("norm_topk_prob", True), cfg.get("shared_expert_intermediate_size", 0) or 0,
                cfg.hidden_act,
            )
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, kv: AttentionBackend) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, kv)
        h, x = self.post_attention_layernorm.add_forward(attn, x)
        return x + self.mlp(h)


class DecoderStack(nn.Module):
    """Layers + final norm + rotary table. Embedding and head belong to the owning model."""

    def __init__(self, cfg: ConfigNode):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rope = cfg.get("rope_parameters") or {}
        head_dim = cfg.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads
        self.rotary_emb = RotaryEmbedding(
            head_dim, rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope.get("mrope_section")
        )

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv: AttentionBackend,
        deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """hidden [N, H] packed tokens; positions [N] or [3, N].

        deepstack: (bool mask [N] of visual tokens, per-layer features added after layers 0..k-1).
        capture: hidden-state indices to return, numbered as transformers' `hidden_states`
        (0 = the input embeddings, i = the output of layer i-1 before any deepstack addition; the
        last one is the normed output).
        """
        cos, sin = self.rotary_emb(positions)
        captured = {0: hidden} if 0 in capture else {}
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, kv)
            if i + 1 in capture:
                captured[i + 1] = hidden
            if deepstack is not None and i < len(deepstack[1]):
                mask, feats = deepstack
                hidden = hidden.clone()
                hidden[mask] = hidden[mask] + feats[i].to(hidden.dtype)
        hidden = self.norm(hidden)
        if len(self.layers) in capture:  # transformers ties the last entry to the normed output
            captured[len(self.layers)] = hidden
        return hidden, captured
