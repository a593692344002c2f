"""Qwen3-Omni audio encoder (the thinker's `audio_tower`) in plain PyTorch.

Parameter names are exactly those of transformers' `Qwen3OmniMoeAudioEncoder`, so the checkpoint's
`thinker.audio_tower.*` tensors load after stripping that prefix.

What the encoder does, mirroring the reference step by step (the reference's outputs depend on
some of these details, so they are reproduced exactly rather than "cleaned up"):

1. Each clip's mel frames are cut into chunks of `2 * n_window` frames (the last one shorter) and
   *all* chunks of the call are right-padded with zeros to the longest chunk of the call.
2. Three stride-2 3x3 convolutions (GELU after each) run over every padded chunk, in batches of
   `conv_chunksize` chunks; `conv_out` projects (channels x frequency) to `d_model`.
3. A sinusoidal position embedding is added per chunk (positions restart at 0 in every chunk).
4. The valid (non-padding) positions of every chunk are gathered into one packed sequence.
5. Transformer layers attend within windows: each clip is cut into windows of
   `max_chunk_tokens * (n_window_infer // (2 * n_window))` tokens (`max_chunk_tokens` = tokens of
   the longest chunk in the call), the last window of a clip holding the remainder.
6. `ln_post`, `proj1`, activation, `proj2`.

Note: because the tail chunk is zero-padded to the longest chunk of the call *before* the
convolutions (whose biases make the padding non-zero after the first GELU), the last token or so
of a clip whose length is not a multiple of `2 * n_window` depends slightly on what else is in the
same call. We reproduce that behaviour as-is.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.config import ConfigNode

# Activation names used by Qwen3-Omni configs ("activation_function" / "hidden_act"), with the
# exact semantics transformers' ACT2FN gives them.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}

# Architectural constants of the reference that are not config fields.
_SINUSOID_MAX_TIMESCALE = 10000.0  # SinusoidsPositionEmbedding(max_timescale=10000)
_NUM_DOWNSAMPLE_CONVS = 3  # conv2d1..conv2d3, each kernel 3, stride 2, padding 1

# Upper bound on batch * heads * L * L for one batched attention call. Memory-efficient SDPA
# kernels never materialise the scores, but the math fallback does; this keeps it bounded.
_MAX_SCORE_ELEMENTS = 1 << 28


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------------------------
# Packed, block-diagonal (segment) attention, shared with the vision encoder.
# ---------------------------------------------------------------------------------------------


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lens: list[int], scale: float | None = None
) -> torch.Tensor:
    """Non-causal attention restricted to consecutive segments of a packed sequence.

    q, k, v: [N, H, D] with N == sum(seg_lens); token i attends only to tokens of its own segment.
    Returns [N, H, D]. Segments of equal length are batched into one SDPA call (no mask is ever
    built), so the cost is O(sum L_i^2), never O(N^2).
    """
    n, h, d = q.shape
    if sum(seg_lens) != n:
        raise ValueError(f"segment lengths sum to {sum(seg_lens)} but the sequence has {n} tokens")

    def sdpa(qb, kb, vb):  # [B, L, H, D] -> [B, L, H, D]
        out = F.scaled_dot_product_attention(
            qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), dropout_p=0.0, is_causal=False, scale=scale
        )
        return out.transpose(1, 2)

    if len(seg_lens) == 1:
        return sdpa(q[None], k[None], v[None])[0]

    starts_by_len: dict[int, list[int]] = defaultdict(list)
    start = 0
    for length in seg_lens:
        if length > 0:
            starts_by_len[length].append(start)
        start += length

    out = torch.empty_like(q)
    for length, starts in starts_by_len.items():
        per_call = max(1, _MAX_SCORE_ELEMENTS // (h * length * length))
        for b in range(0, len(starts), per_call):
            batch = starts[b : b + per_call]
            first, count = batch[0], len(batch)
            if batch[-1] - first == (count - 1) * length:  # contiguous run: plain views, no copy
                sl = slice(first, first + count * length)
                o = sdpa(*(t[sl].view(count, length, h, d) for t in (q, k, v)))
                out[sl] = o.reshape(count * length, h, d)
            else:
                idx = torch.tensor(batch, device=q.device)[:, None] + torch.arange(length, device=q.device)
                idx = idx.reshape(-1)
                o = sdpa(*(t.index_select(0, idx).view(count, length, h, d) for t in (q, k, v)))
                out.index_copy_(0, idx, o.reshape(count * length, h, d))
    return out


# ---------------------------------------------------------------------------------------------
# Length bookkeeping (identical integer arithmetic to the reference).
# ---------------------------------------------------------------------------------------------


def _conv_stack_len(length):
    """Output length of the three stride-2 convs for `length` input frames (0 stays 0)."""
    for _ in range(_NUM_DOWNSAMPLE_CONVS):
        length = (length - 1) // 2 + 1
    return length


def audio_output_lengths(feature_lens, n_window: int):
    """Number of encoder output tokens for clips of `feature_lens` mel frames (int or tensor).

    Same as the reference's `_get_feat_extract_output_lengths`, which writes the tokens of one full
    `2 * n_window` chunk as the literal 13 (correct for the shipped n_window = 50); here it is
    derived from the conv stack, so the two agree whenever the reference is self-consistent.
    """
    chunk = 2 * n_window
    return _conv_stack_len(feature_lens % chunk) + (feature_lens // chunk) * _conv_stack_len(chunk)


def _sinusoids(length: int, channels: int, device) -> torch.Tensor:
    """[length, channels] float32 table, computed exactly as SinusoidsPositionEmbedding does."""
    if channels % 2:
        raise ValueError("sinusoidal position embedding needs an even d_model")
    log_increment = math.log(_SINUSOID_MAX_TIMESCALE) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, device=device).float())
    scaled_time = torch.arange(length, device=device)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class AudioAttention(nn.Module):
    def __init__(self, config: ConfigNode):
        super().__init__()
        self.embed_dim = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"d_model {self.embed_dim} is not divisible by {self.num_heads} heads")
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        o = segment_attention(q, k, v, seg_lens, self.scaling)
        return self.out_proj(o.reshape(n, self.embed_dim))


class AudioEncoderLayer(nn.Module):
    def __init__(self, config: ConfigNode):
        super().__init__()
        dim = config.d_model
        self.self_attn = AudioAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), seg_lens)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            bound = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-bound, bound)
        return x


class AudioEncoder(nn.Module):
    """`forward(input_features [num_mel_bins, total_frames], feature_lens [n_clips])`
    -> [sum(audio_output_lengths(feature_lens)), output_dim].

    `input_features` is the concatenation (along time) of each clip's valid frames, as the
    reference's `get_audio_features` passes them to the audio tower.
    """

    def __init__(self, config: ConfigNode):
        super().__init__()
        self.config = config
        self.num_mel_bins = config.num_mel_bins
        self.d_model = config.d_model
        self.n_window = config.n_window
        self.n_window_infer = config.n_window_infer
        self.conv_chunksize = config.conv_chunksize
        self.max_source_positions = config.max_source_positions
        if self.n_window_infer < 2 * self.n_window:
            raise ValueError(f"n_window_infer ({self.n_window_infer}) must be >= 2 * n_window ({self.n_window})")

        ds = config.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, ds, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(ds, ds, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(ds, ds, 3, 2, padding=1)
        self.conv_out = nn.Linear(ds * _conv_stack_len(config.num_mel_bins), config.d_model, bias=False)
        self.layers = nn.ModuleList([AudioEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.ln_post = nn.LayerNorm(config.d_model)
        self.proj1 = nn.Linear(config.d_model, config.d_model)
        self.act = activation(config.activation_function)
        self.proj2 = nn.Linear(config.d_model, config.output_dim)

    def output_lengths(self, feature_lens):
        return audio_output_lengths(feature_lens, self.n_window)

    def _chunk_lengths(self, lens: list[int]) -> list[int]:
        chunk = 2 * self.n_window
        out: list[int] = []
        for length in lens:
            full, rem = divmod(length, chunk)
            out += [chunk] * full + ([rem] if rem else [])
        return out

    def _window_lengths(self, lens: list[int], max_chunk_tokens: int) -> list[int]:
        window = max_chunk_tokens * (self.n_window_infer // (2 * self.n_window))
        out: list[int] = []
        for length in lens:
            tokens = int(audio_output_lengths(length, self.n_window))
            full, rem = divmod(tokens, window)
            out += [window] * full + ([rem] if rem else [])
        return out

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor, longest_frames: int | None = None) -> torch.Tensor:
        """longest_frames: when these clips are some of a request's, the mel frames of its longest
        clip: chunks are padded (and attention windows sized) as in one call over all of them, so
        each clip encodes as it would among the others (padding is not neutral: the convs see
        gelu(bias) in padded frames)."""
        if input_features.dim() != 2 or input_features.shape[0] != self.num_mel_bins:
            raise ValueError(
                f"input_features must be [num_mel_bins={self.num_mel_bins}, frames], got {tuple(input_features.shape)}"
            )
        lens = [int(x) for x in torch.as_tensor(feature_lens).reshape(-1).tolist()]
        if not lens or min(lens) <= 0:
            raise ValueError(f"every audio clip needs at least one mel frame, got feature_lens={lens}")
        if sum(lens) != input_features.shape[1]:
            raise ValueError(f"feature_lens sum to {sum(lens)} but input_features has {input_features.shape[1]} frames")

        # 1. chunk + pad to the longest chunk of the call.
        chunk_lens = self._chunk_lengths(lens)
        weight = self.conv2d1.weight
        chunks = input_features.to(weight.dtype).T.split(chunk_lens, dim=0)
        padded = nn.utils.rnn.pad_sequence(chunks, batch_first=True).transpose(1, 2).unsqueeze(1)
        if longest_frames is not None:  # the longest chunk of the whole request's call
            extra = min(int(longest_frames), 2 * self.n_window) - padded.shape[-1]
            if extra > 0:
                padded = F.pad(padded, (0, extra))

        # 2. conv stack, in groups of conv_chunksize chunks.
        outs = []
        for group in padded.split(self.conv_chunksize, dim=0):
            y = F.gelu(self.conv2d1(group))
            y = F.gelu(self.conv2d2(y))
            y = F.gelu(self.conv2d3(y))
            outs.append(y)
        y = torch.cat(outs, dim=0)  # [chunks, C, F', T']
        b, c, f, t = y.shape
        y = self.conv_out(y.permute(0, 3, 1, 2).reshape(b, t, c * f))

        # 3. per-chunk positions.
        if t > self.max_source_positions:
            raise ValueError(f"chunk of {t} tokens exceeds max_source_positions {self.max_source_positions}")
        y = y + _sinusoids(t, self.d_model, y.device).to(y.dtype)[None]

        # 4. keep valid positions only.
        tokens_per_chunk = torch.tensor([_conv_stack_len(x) for x in chunk_lens], device=y.device)
        valid = torch.arange(t, device=y.device)[None, :] < tokens_per_chunk[:, None]
        x = y[valid]  # [n_tokens, d_model], chunk-major order

        # 5. windowed transformer.
        seg_lens = self._window_lengths(lens, t)  # t: tokens of the longest (padded) chunk
        for layer in self.layers:
            x = layer(x, seg_lens)

        # 6. head.
        x = self.ln_post(x)
        x = self.proj1(x)
        x = self.act(x)
        return self.proj2(x)
