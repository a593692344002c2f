"""Qwen3-Omni vision encoder (the thinker's `visual`) in plain PyTorch.

Parameter names are exactly those of transformers' `Qwen3OmniMoeVisionEncoder`, so the
checkpoint's `thinker.visual.*` tensors load after stripping that prefix.

Inputs are what the image/video processor produces: `pixel_values` [N_patches, C*T*P*P] with the
patches of every image / video frame laid out in spatial-merge-block order
(block_row, block_col, row_in_block, col_in_block), and `grid_thw` [n, 3] giving each item's
(temporal, height, width) size in patches. Per patch the encoder adds a learned absolute position
embedding (bilinearly resampled, align_corners=True, from a square table to the item's h x w grid),
runs ViT blocks with 2D axial rotary embeddings (attention restricted to one frame at a time),
and finally merges each spatial_merge_size^2 block of patches into one token. Some intermediate
blocks (`deepstack_visual_indexes`) also feed their own patch mergers; those outputs are the
"deepstack" features injected into early LLM layers.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.config import ConfigNode
from thinktalk.models.audio_encoder import activation, segment_attention

# Constants of the reference architecture that are not config fields.
_LAYER_NORM_EPS = 1e-6  # every vision LayerNorm (blocks and patch mergers)
_DEFAULT_ROPE_THETA = 10000.0  # transformers' default when vision_config has no rope_parameters


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] (any dtype), cos/sin [N, D] float32; rotation computed in float32 like the reference."""
    xf = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def _merge_block_coords(h: int, w: int, merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch of an h x w frame, in spatial-merge-block order."""
    rows = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    # (block_row, in_row, block_col, in_col) -> (block_row, block_col, in_row, in_col)
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis taps [n, 2] into a `side`-long table and weights [n, 2] (float32) for target positions
    `index` on an axis of `size`, align_corners=True; same float32 arithmetic as the reference."""
    src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class VisionPatchEmbed(nn.Module):
    def __init__(self, config: ConfigNode):
        super().__init__()
        self.in_channels = config.in_channels
        self.temporal_patch_size = config.temporal_patch_size
        self.patch_size = config.patch_size
        self.embed_dim = config.hidden_size
        kernel = (self.temporal_patch_size, self.patch_size, self.patch_size)
        self.proj = nn.Conv3d(self.in_channels, self.embed_dim, kernel_size=kernel, stride=kernel, bias=True)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose stride equals its kernel, applied to exactly one kernel-sized patch, is a
        # matmul with the flattened kernel (same C, T, P, P flattening order as the input rows).
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(self.embed_dim, -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, config: ConfigNode):
        super().__init__()
        self.dim = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = self.dim // self.num_heads
        if self.head_dim * self.num_heads != self.dim:
            raise ValueError(f"hidden_size {self.dim} is not divisible by {self.num_heads} heads")
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(self.dim, self.dim * 3, bias=True)
        self.proj = nn.Linear(self.dim, self.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = _apply_rotary(q, cos, sin)
        k = _apply_rotary(k, cos, sin)
        o = segment_attention(q, k, v, seg_lens, self.scaling)
        return self.proj(o.reshape(n, self.dim))


class VisionMLP(nn.Module):
    def __init__(self, config: ConfigNode):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: ConfigNode):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=_LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=_LAYER_NORM_EPS)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seg_lens)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """LayerNorm + 2-layer GELU MLP over each spatial_merge_size^2 block of patches.

    The final merger normalises each patch (hidden_size) before concatenating the block; the
    deepstack mergers (`use_postshuffle_norm`) normalise the concatenated block instead.
    """

    def __init__(self, config: ConfigNode, use_postshuffle_norm: bool = False):
        super().__init__()
        self.hidden_size = config.hidden_size * config.spatial_merge_size**2
        self.use_postshuffle_norm = use_postshuffle_norm
        self.ln_q = nn.LayerNorm(self.hidden_size if use_postshuffle_norm else config.hidden_size, eps=_LAYER_NORM_EPS)
        # ModuleList (not Sequential attributes) so the parameter names are mlp.0.* and mlp.2.*.
        # nn.GELU() is exact GELU here whatever config.hidden_act says, as in the reference.
        self.mlp = nn.ModuleList(
            [nn.Linear(self.hidden_size, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, config.out_hidden_size)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_postshuffle_norm:
            x = self.ln_q(x.reshape(-1, self.hidden_size))
        else:
            x = self.ln_q(x).reshape(-1, self.hidden_size)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionEncoder(nn.Module):
    """`forward(pixel_values [N, C*T*P*P], grid_thw [n, 3])`
    -> (embeddings [N / spatial_merge_size^2, out_hidden_size], [deepstack features, same shape]).
    """

    # Patches one pass of the blocks takes at most (whole frames; a larger frame goes alone). Set
    # by the engine (EngineConfig.vision_max_patches); None: every frame in one pass.
    max_patches_per_pass: int | None = None

    def __init__(self, config: ConfigNode):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.deepstack_visual_indexes = list(config.deepstack_visual_indexes)
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        if self.num_grid_per_side**2 != config.num_position_embeddings:
            raise ValueError(f"num_position_embeddings ({config.num_position_embeddings}) must be a square")
        rope = config.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA)))

        self.merger_list = nn.ModuleList(
            [VisionPatchMerger(config, use_postshuffle_norm=True) for _ in self.deepstack_visual_indexes]
        )
        self.patch_embed = VisionPatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])
        self.merger = VisionPatchMerger(config, use_postshuffle_norm=False)

    @property
    def deepstack_merger_list(self) -> nn.ModuleList:
        return self.merger_list

    # -- per-grid position tables --------------------------------------------------------------

    def _inv_freq(self, device) -> torch.Tensor:
        spatial_dim = self.head_dim // 2
        exponent = torch.arange(0, spatial_dim, 2, dtype=torch.float, device=device) / spatial_dim
        return 1.0 / (self.rope_theta**exponent)

    def _frame_tables(self, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For one h x w frame (merge-block order): absolute position embedding [h*w, hidden]
        (float32) and rotary cos, sin [h*w, head_dim] (float32)."""
        rows, cols = _merge_block_coords(h, w, self.spatial_merge_size, device)

        side = self.num_grid_per_side
        h_taps, h_w = _bilinear_taps(rows, h, side)
        w_taps, w_w = _bilinear_taps(cols, w, side)
        idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        pos = (self.pos_embed.weight[idx].float() * wts[:, :, None]).sum(1)

        freqs = torch.stack([rows, cols], dim=-1)[..., None].float() * self._inv_freq(device)  # [hw, 2, D/4]
        freqs = freqs.flatten(1)  # [h freqs | w freqs]
        freqs = torch.cat([freqs, freqs], dim=-1)  # rotate the whole head_dim
        return pos, freqs.cos(), freqs.sin()

    # -- forward ------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grids = [tuple(int(v) for v in g) for g in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
        merge = self.spatial_merge_size
        for t, h, w in grids:
            if t <= 0 or h <= 0 or w <= 0 or h % merge or w % merge:
                raise ValueError(f"grid (t={t}, h={h}, w={w}) must be positive with h, w divisible by {merge}")
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (n, self.patch_embed.patch_dim):
            raise ValueError(
                f"pixel_values must be [{n}, {self.patch_embed.patch_dim}] for grid_thw {grids}, "
                f"got {tuple(pixel_values.shape)}"
            )
        # attention never crosses a frame and every other layer works per patch, so the frames can
        # go through in groups: the activations then take memory for one group, not for a whole
        # video (a 120 s video is ~100k patches; its MLP activations alone were GiBs)
        frames = [(h, w) for t, h, w in grids for _ in range(t)]
        tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        outs: list[torch.Tensor] = []
        deeps: list[list[torch.Tensor]] = []
        row = 0
        for group in frame_groups(frames, self.max_patches_per_pass):
            size = sum(h * w for h, w in group)
            out, deep = self._encode_frames(pixel_values[row : row + size], group, tables)
            outs.append(out)
            deeps.append(deep)
            row += size
        if len(outs) == 1:
            return outs[0], deeps[0]
        return torch.cat(outs), [torch.cat(parts) for parts in zip(*deeps)]

    def _encode_frames(self, pixel_values: torch.Tensor, frames: list[tuple[int, int]], tables: dict):
        """The blocks and mergers over consecutive frames (h, w) whose patches are `pixel_values`."""
        x = self.patch_embed(pixel_values)
        device = x.device
        pos_parts, cos_parts, sin_parts, seg_lens = [], [], [], []
        for (h, w), t in _runs(frames):
            if (h, w) not in tables:
                tables[(h, w)] = self._frame_tables(h, w, device)
            pos, cos, sin = tables[(h, w)]
            pos_parts.append(pos.to(x.dtype).expand(t, -1, -1).reshape(t * h * w, -1) if t > 1 else pos.to(x.dtype))
            cos_parts.append(cos.repeat(t, 1))
            sin_parts.append(sin.repeat(t, 1))
            seg_lens += [h * w] * t  # attention never crosses a frame
        x = x + torch.cat(pos_parts)
        cos, sin = torch.cat(cos_parts), torch.cat(sin_parts)
        del pos_parts, cos_parts, sin_parts

        deepstack: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, seg_lens)
            if i in self.deepstack_visual_indexes:
                deepstack.append(self.merger_list[self.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


def _runs(frames: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """(size, count) of each run of equal consecutive frame sizes."""
    return [(size, len(list(run))) for size, run in itertools.groupby(frames)]


def frame_groups(frames: list[tuple[int, int]], max_patches: int | None) -> list[list[tuple[int, int]]]:
    """Consecutive frames (h, w) in groups of at most max_patches patches each (a larger frame
    alone); all in one group when max_patches is None."""
    if not max_patches:
        return [frames] if frames else []
    groups: list[list[tuple[int, int]]] = []
    size = 0
    for h, w in frames:
        if groups and size + h * w <= max_patches:
            groups[-1].append((h, w))
            size += h * w
        else:
            groups.append([(h, w)])
            size = h * w
    return groups
