"""Rotary position embeddings: plain 1-D RoPE and Qwen3-Omni's interleaved multimodal RoPE.

M-RoPE gives every token three positions (time, height, width). The frequency bands of the head
dimension are shared out between the three axes *interleaved*: band j takes its position from
axis (j mod 3) while j < 3 * mrope_section[axis], else from time. Text tokens carry the same
position on all three axes, so for them this is ordinary RoPE.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, mrope_section: list[int] | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = list(mrope_section) if mrope_section else None
        if self.mrope_section is not None:
            axis = torch.zeros(head_dim // 2, dtype=torch.long)
            for dim, offset in ((1, 1), (2, 2)):
                axis[offset : self.mrope_section[dim] * 3 : 3] = dim
            self.register_buffer("band_axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [N] (1-D) or [3, N] (M-RoPE). Returns float32 cos, sin of shape [N, head_dim]."""
        inv_freq = self.inv_freq.float()
        if self.mrope_section is None:
            freqs = positions.float()[:, None] * inv_freq[None, :]
        else:
            if positions.dim() == 1:
                positions = positions[None].expand(3, -1)
            all_axes = positions.float()[:, :, None] * inv_freq[None, None, :]  # [3, N, D/2]
            index = self.band_axis[None, None, :].expand(1, all_axes.shape[1], -1)
            freqs = all_axes.gather(0, index)[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; cos/sin: [N, head_dim] (cast to x's dtype as the reference does)."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin
