"""The talker: a small MoE decoder that turns the thinker's answer into multi-codebook speech codes.

Module tree = transformers' `talker.*` with the prefix stripped:

    text_projection, hidden_projection   ResizeMLP (linear_fc1 -> act -> linear_fc2), thinker width -> talker width
    model                                DecoderStack (M-RoPE, every layer MoE with a shared expert) + codec_embedding
    codec_head                           logits over the first codebook (the talker's "vocabulary")
    code_predictor                       models.code_predictor.CodePredictor for codebooks 1 .. G-1

Expert weights are stacked per layer (`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H],
`...down_proj` [E, H, I]) exactly as transformers keeps them in memory; the checkpoint's
per-expert tensors are packed on load by weights/names.py.

`talker_step` is one forward over a batch of requests (packed tokens + KV backend); the speech
loop in thinktalk/speech.py drives it, so a faster engine can batch it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigNode
from ..layers.attention import AttentionBackend
from ..layers.decoder import DecoderStack, num_experts
from ..layers.mlp import ACTIVATIONS
from ..layers.moe import SparseMoE
from .code_predictor import CodePredictor, Pick, greedy_pick, predict_residual_codes


class ResizeMLP(nn.Module):
    """Projects thinker-width vectors (text embeddings or hidden states) to the talker's width."""

    def __init__(self, in_size: int, hidden_size: int, out_size: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_size, hidden_size, bias=True)
        self.linear_fc2 = nn.Linear(hidden_size, out_size, bias=True)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class TalkerTextModel(DecoderStack):
    def __init__(self, cfg: ConfigNode):
        super().__init__(cfg)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # transformers' talker decoder layer installs the shared-expert MoE block on *every* layer,
        # whatever mlp_only_layers / decoder_sparse_step say
        for layer in self.layers:
            if not isinstance(layer.mlp, SparseMoE):
                layer.mlp = SparseMoE(
                    cfg.hidden_size, cfg.moe_intermediate_size, num_experts(cfg), cfg.num_experts_per_tok,
                    cfg.get("norm_topk_prob", True), cfg.shared_expert_intermediate_size, cfg.hidden_act,
                )


class Talker(nn.Module):
    def __init__(self, cfg: ConfigNode):
        """cfg: the checkpoint's talker_config."""
        super().__init__()
        self.cfg = cfg
        text = cfg.text_config
        self.num_code_groups = cfg.num_code_groups
        self.model = TalkerTextModel(text)
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor_config)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv: AttentionBackend) -> torch.Tensor:
        """embeds [N, H] packed talker inputs, positions [3, N] (M-RoPE) or [N] -> final normed hidden [N, H]."""
        hidden, _ = self.model(embeds, positions, kv)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """First-codebook logits [.., vocab_size] (codec ids incl. the special codec tokens)."""
        return self.codec_head(hidden)

    def embed_codes(self, first_code: torch.Tensor) -> torch.Tensor:
        """The talker's codec embedding of first-codebook / special codec ids."""
        return self.model.codec_embedding(first_code)

    def predict_residual_codes(
        self, last_hidden: torch.Tensor, first_code: torch.Tensor, pick: Pick = greedy_pick
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebooks 1 .. G-1 for a batch of frames, and the talker's next input embedding.

        last_hidden [B, H]: final normed hidden at the position that produced `first_code` [B].
        Returns (all codes [B, G] with `first_code` in column 0, summed codec embedding [B, H] —
        the next talker input before the trailing text embedding is added).
        """
        first_embeds = self.embed_codes(first_code)
        residual, residual_embeds = predict_residual_codes(self.code_predictor, last_hidden, first_embeds, pick)
        codes = torch.cat([first_code[:, None], residual], dim=1)
        # summed over the stacked [B, G, H] as the reference does (same reduction order)
        summed = torch.cat([first_embeds[:, None], residual_embeds.to(first_embeds.dtype)], dim=1).sum(1)
        return codes, summed


def talker_step(
    talker: Talker,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    kv: AttentionBackend,
    new_lens: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One talker forward over a batch of requests (prefills and/or single decode tokens, packed).

    Returns (last normed hidden state of each request [B, H], its first-codebook logits [B, V] float32).
    """
    hidden = talker(embeds, positions, kv)
    last = torch.tensor(new_lens, device=hidden.device).cumsum(0) - 1
    hidden = hidden[last]
    return hidden, talker.logits(hidden).float()
