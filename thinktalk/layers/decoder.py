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
    # (x, residual, norm weight, eps, weight) -> (linear(norm(x + residual)), x + residual): the
    # input norm folded into the fused q/k/v product. None: the norm, then the product. The engine
    # installs kernels/norm_gemv.add_norm_linear where EngineConfig.fuse_norm_gemv is on.
    norm_linear_fn = None
    # (x, residual, norm weight, eps, moe) -> (moe(norm(x + residual)), x + residual), or None where
    # it does not apply: the post-attention norm folded into the MoE's router and gate-up GEMVs
    # (kernels/norm_gemv.add_norm_moe, installed with norm_linear_fn)
    norm_moe_fn = None

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

    # The layer in two per-token halves around attention, run by DecoderStack.forward (and by
    # prefill_graphs.py) on the residual stream: a layer's output is (out, residual), added by the
    # next layer's input norm in the same kernel. Everything but attention treats tokens
    # independently, which is what lets prefill_graphs.py replay these halves as CUDA graphs over
    # padded token counts.
    def pre_attention(self, x, residual, cos, sin, store=None):
        """(q, k, v, residual): input norm (adding x to residual first when residual is given) and
        the q/k/v projections, normed and rotated (and written to the KV cache: `Attention.project`)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        elif self.norm_linear_fn is not None and self.self_attn.qkv_weight is not None:
            norm = self.input_layernorm
            qkv, residual = self.norm_linear_fn(x, residual, norm.weight, norm.eps, self.self_attn.qkv_weight)
            return (*self.self_attn.project(None, cos, sin, store, qkv=qkv), residual)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        return (*self.self_attn.project(h, cos, sin, store), residual)

    def post_attention(self, attn, residual):
        """(out, residual): o_proj, the residual add + post-attention norm, the MLP / MoE."""
        out = self.self_attn.output(attn)
        norm = self.post_attention_layernorm
        if self.norm_moe_fn is not None:
            fused = self.norm_moe_fn(out, residual, norm.weight, norm.eps, self.mlp)
            if fused is not None:
                return fused
        h, residual = norm.add_forward(out, residual)
        return self.mlp(h), residual


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
        residual = None  # hidden = (hidden + residual) where residual is not None
        store_target = getattr(kv, "store_target", None)  # the q/k kernel may write the KV cache
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            if store_target is not None:
                q, k, v, residual = layer.pre_attention(hidden, residual, cos, sin, store_target(a.layer))
                attn = kv.attend_stored(a.layer, q, a.scale)
            else:
                q, k, v, residual = layer.pre_attention(hidden, residual, cos, sin)
                attn = kv.attend(a.layer, q, k, v, a.scale)
            hidden, residual = layer.post_attention(attn, residual)
            stack = deepstack is not None and i < len(deepstack[1])
            if i + 1 in capture or stack:  # the layer's output itself is needed
                hidden, residual = self.layer_output(hidden, residual), None
                if i + 1 in capture:
                    captured[i + 1] = hidden
                if stack:
                    mask, feats = deepstack
                    hidden = hidden.clone()
                    hidden[mask] = hidden[mask] + feats[i].to(hidden.dtype)
        hidden = self.final_norm(hidden, residual)
        if len(self.layers) in capture:  # transformers ties the last entry to the normed output
            captured[len(self.layers)] = hidden
        return hidden, captured

    @staticmethod
    def layer_output(out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return out if residual is None else residual + out

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.norm(hidden) if residual is None else self.norm.add_forward(hidden, residual)[0]
