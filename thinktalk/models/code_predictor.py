"""The talker's code predictor: a small dense decoder that fills in the residual codebooks.

For every speech frame the talker LM picks the first codebook's code; the code predictor then
predicts codebooks 1 .. num_code_groups-1 autoregressively over a fresh, frame-local sequence:

    position 0: the talker's last (normed) hidden state of that frame
    position 1: the talker's embedding of the first code         -> lm_head[0] gives code 1
    position k: codec_embedding[k-2](code k-1), k = 2 .. G-1       -> lm_head[k-1] gives code k

The decoder is a plain Qwen3 stack with 1-D RoPE (positions 0 .. G-1) and a dense MLP, so it reuses
`DecoderStack`. Attribute names equal transformers' (`model.layers.N...`, `model.codec_embedding.J`,
`lm_head.J`), so the talker's `code_predictor.*` checkpoint tensors load by name.

`residual_step` is one step of a *batch* of frames (packed tokens + a KV backend); the loop
`predict_residual_codes` is the reference driver over it. A faster engine can drive the same step
with its own backend (e.g. a static per-slot cache).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import ConfigNode
from ..layers.attention import AttentionBackend, ContiguousKV, SequenceKV
from ..layers.decoder import DecoderStack

# pick(logits [B, V] float32, group) -> codes [B]; group is the codebook being predicted (1 .. G-1)
Pick = Callable[[torch.Tensor, int], torch.Tensor]


def greedy_pick(logits: torch.Tensor, group: int) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


class CodePredictorModel(DecoderStack):
    def __init__(self, cfg: ConfigNode):
        super().__init__(cfg)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1)
        )


class CodePredictor(nn.Module):
    def __init__(self, cfg: ConfigNode):
        super().__init__()
        self.cfg = cfg
        self.num_code_groups = cfg.num_code_groups
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)
        )

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv: AttentionBackend) -> torch.Tensor:
        """embeds [N, H] packed tokens, positions [N] (0 .. G-1 within each frame) -> normed hidden [N, H]."""
        hidden, _ = self.model(embeds, positions, kv)
        return hidden

    def embed(self, codes: torch.Tensor, group: int) -> torch.Tensor:
        """Input embedding of codebook `group`'s codes (group 1 .. G-1)."""
        return self.model.codec_embedding[group - 1](codes)

    def logits(self, hidden: torch.Tensor, group: int) -> torch.Tensor:
        """Logits over codebook `group` (1 .. G-1) from the hidden state that predicts it."""
        return self.lm_head[group - 1](hidden)


def residual_step(
    predictor: CodePredictor,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    kv: AttentionBackend,
    new_lens: list[int],
    group: int,
) -> torch.Tensor:
    """One code-predictor step over a batch of frames: packed new tokens -> logits [B, V] of `group`.

    Step 1 feeds two tokens per frame (talker hidden, first-code embedding; positions 0, 1); step
    g > 1 feeds one (embedding of code g-1; position g).
    """
    hidden = predictor(embeds, positions, kv)
    last = torch.tensor(new_lens, device=hidden.device).cumsum(0) - 1
    return predictor.logits(hidden[last], group)


def predict_residual_codes(
    predictor: CodePredictor,
    last_hidden: torch.Tensor,
    first_embeds: torch.Tensor,
    pick: Pick = greedy_pick,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of codebooks 1 .. G-1 for a batch of B frames.

    last_hidden [B, H]: the talker's final normed hidden state at the position that produced the
    first code; first_embeds [B, H]: the talker's codec embedding of that first code.
    Returns (codes [B, G-1], their input embeddings [B, G-1, H] as the predictor's codec_embedding
    gives them — what the talker sums into its next input).
    """
    b, device = last_hidden.shape[0], last_hidden.device
    caches = [SequenceKV() for _ in range(b)]
    # step 1: [hidden, first embedding] of every frame, packed
    embeds = torch.stack([last_hidden, first_embeds.to(last_hidden.dtype)], dim=1).reshape(2 * b, -1)
    positions = torch.arange(2, device=device).repeat(b)
    new_lens = [2] * b
    codes, code_embeds = [], []
    for group in range(1, predictor.num_code_groups):
        logits = residual_step(predictor, embeds, positions, ContiguousKV(caches, new_lens), new_lens, group)
        code = pick(logits.float(), group)
        codes.append(code)
        embeds = predictor.embed(code, group)
        code_embeds.append(embeds)
        positions = torch.full((b,), group + 1, dtype=torch.long, device=device)
        new_lens = [1] * b
    return torch.stack(codes, dim=1), torch.stack(code_embeds, dim=1)
