"""Code2Wav: Qwen3-Omni codec codes -> 24 kHz waveform, one-shot and streaming.

Plain PyTorch re-implementation of transformers' `Qwen3OmniMoeCode2Wav`. Module and parameter names
mirror the reference exactly, so a checkpoint's `code2wav.*` tensors load with the prefix stripped
(`load_state_dict(strict=True)`).

Pipeline (per codec frame; `config` is the checkpoint's `code2wav_config`):

    codes [B, num_quantizers, T]
      -> mean of per-quantizer embeddings                 [B, T, hidden]
      -> `pre_transformer`: causal sliding-window transformer with LayerScale
      -> `upsample`: per ratio, trans-conv (kernel == stride) + causal ConvNeXt block
      -> `decoder`: causal conv, per rate a SnakeBeta + trans-conv (kernel 2r, stride r) + 3 residual
         units, then SnakeBeta + causal conv to one channel, clamp to [-1, 1]
      -> wav [B, 1, T * total_upsample - lookahead_samples]

Note the output length: every decoder trans-conv (kernel 2r, stride r) trims r samples on both sides,
so a block maps L input samples to (L - 1) * r, and the reference returns T * U - 555 samples for T
frames with the real config (U = total_upsample = 1920), not T * U.

Streaming (`Code2WavStream`) and exactness
-----------------------------------------
Every stage is causal except the decoder trans-convs: output sample n of a block reads input samples
floor(n/r) and floor(n/r) + 1 (one input sample of look-ahead), which is why the last input sample
only contributes through its neighbour and the block output is (L - 1) * r long. Worked out in
`receptive_field()` from the config:

* right side: decoding frames [a, b) yields exactly the samples [a*U, b*U - lookahead_samples) of
  the one-shot waveform (lookahead_samples = 555 for the real config, ~23 ms); none of them needs
  a later frame, so nothing has to be held back or corrected afterwards;
* left side: output sample s depends on transformer outputs of frames >= (s - conv_left_samples)/U
  (conv_left_samples = 17454 for the real config, ~9.1 frames) and one transformer output depends
  on the previous sum(window - 1) codec frames (8 layers x 71 = 568 for the real config).

Exact rule: to emit samples from chunk_start*U - lookahead_samples on, the conv stack needs
conv_context_frames = ceil((conv_left_samples + lookahead_samples) / U) frames (10 for the real
config) of transformer output before the chunk, and those need transformer_context_frames (568)
codec frames before them: 578 frames of codec left context in all. `Code2WavStream(exact=True)`
(default) runs the transformer over [568 + chunk] codes and the conv stack over [10 cached
transformer outputs + chunk], and equals `forward(codes)` up to float rounding.

The reference `chunked_decode` (decode [left_ctx + chunk], drop left_ctx * U samples) loses the
last lookahead_samples of every chunk (each chunk yields chunk*U - 555 samples), so its output is
555 samples per extra chunk shorter than the one-shot decode, with a discontinuity at each chunk
boundary, whatever its left context; with left_ctx < 578 the chunk starts also differ slightly.
`Code2WavStream(exact=False)` reproduces that rule (and `Code2Wav.chunked_decode`) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.norm import RMSNorm  # the same Qwen3 RMSNorm as the thinker's

# Architecture constants of the reference implementation. They are fixed in transformers' modeling
# code (not fields of code2wav_config), so they are named here once instead of being read from it.
CONV_KERNEL = 7  # causal convs: decoder in/out conv, residual-unit conv1, ConvNeXt depthwise conv
RESIDUAL_DILATIONS = (1, 3, 9)  # residual units in each decoder block
CONVNEXT_EXPANSION = 4  # ConvNeXt pointwise MLP width multiplier
CONVNEXT_NORM_EPS = 1e-6
CONVNEXT_GAMMA_INIT = 1e-6
SNAKE_EPS = 1e-9  # SnakeBeta: 1 / (exp(beta) + eps)
DECODER_TRANSCONV_KERNEL_FACTOR = 2  # decoder block trans-conv kernel = factor * rate

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------
# Convolutions and activations
# ----------------------------------------------------------------------------------------------


class CausalConvNet(nn.Module):
    """Stride-1 conv padded on the left only: output[n] reads input[n - (k-1)*d .. n]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0)))


class CausalTransConvNet(nn.Module):
    """Transposed conv with `kernel - stride` samples trimmed on both sides (length T -> T * stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.trim = kernel_size - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.trim:
            y = y[..., self.trim : y.shape[-1] - self.trim]
        return y.contiguous()


class SnakeBeta(nn.Module):
    """x + 1/exp(beta) * sin^2(exp(alpha) * x), per channel; input [B, C, T]."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.alpha[None, :, None])
        beta = torch.exp(self.beta[None, :, None])
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConvNet(dim, dim, CONV_KERNEL, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=CONVNEXT_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, CONVNEXT_EXPANSION * dim)
        self.pwconv2 = nn.Linear(CONVNEXT_EXPANSION * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), CONVNEXT_GAMMA_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        h = self.dwconv(x).transpose(1, 2)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConvNet(dim, dim, CONV_KERNEL, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConvNet(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class DecoderBlock(nn.Module):
    """SnakeBeta, trans-conv upsampling by `rate` (halving channels), residual units."""

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        layers: list[nn.Module] = [
            SnakeBeta(in_dim),
            CausalTransConvNet(in_dim, out_dim, DECODER_TRANSCONV_KERNEL_FACTOR * rate, rate),
        ]
        layers += [ResidualUnit(out_dim, d) for d in RESIDUAL_DILATIONS]
        self.block = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Sliding-window transformer
# ----------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def _head_dim(config) -> int:
    return config.get("head_dim") or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    params = config.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"code2wav: rope_type {rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ValueError("code2wav config has no rope_theta (rope_parameters.rope_theta)")
    return float(theta)


def _layer_windows(config) -> list[int | None]:
    """Per-layer attention window (keys visible to a query, itself included); None = full causal."""
    n = config.num_hidden_layers
    window = config.get("sliding_window")
    types = config.get("layer_types") or ["sliding_attention"] * n
    return [window if (t == "sliding_attention" and window is not None) else None for t in types[:n]]


class RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = _head_dim(config)
        inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, window: int | None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = _head_dim(config)
        self.scaling = self.head_dim**-0.5
        self.window = window
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        act = config.hidden_act
        if act not in _ACTIVATIONS:
            raise NotImplementedError(f"code2wav: hidden_act {act!r} is not supported")
        self.act_fn = _ACTIVATIONS[act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TransformerLayer(nn.Module):
    def __init__(self, config, window: int | None):
        super().__init__()
        self.self_attn = Attention(config, window)
        self.mlp = Mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(config.hidden_size, config.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(config.hidden_size, config.layer_scale_initial_scale)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class TransformerModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.windows = _layer_windows(config)
        self.layers = nn.ModuleList(TransformerLayer(config, w) for w in self.windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    @staticmethod
    def _mask(t: int, window: int | None, device, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        i = torch.arange(t, device=device)
        rel = i[:, None] - i[None, :]  # query - key
        allowed = rel >= 0
        if window is not None:
            allowed &= rel < window
        if key_mask is not None:
            # Masked keys are invisible; a masked query then sees no key at all. A plain softmax
            # of an all-masked row is NaN (which, even 0-weighted, would poison the real rows'
            # value products in the next layer); torch's CPU SDPA returns zeros there, but not
            # every backend need. So every query also sees itself: no row is all-masked.
            allowed = (allowed & key_mask[None, :]) | (rel == 0)
        return allowed

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_offset: int = 0,
        *,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T, hidden] -> [B, T, hidden]; rotary positions are position_offset + 0..T-1.

        positions ([T] integer tensor) replaces position_offset, and key_mask ([T] bool, shared
        by the rows) hides the frames where it is False as keys, so a fixed-length window can hold
        fewer real frames (code2wav_graphs: a CUDA graph takes both as device tensors). A frame
        whose outputs are wanted must not attend to a hidden one: masking only the keys before
        the real frames (left padding) leaves the real frames' outputs those of the real frames
        alone (the hidden keys get probability exactly 0)."""
        t = inputs_embeds.shape[1]
        if positions is None:
            positions = torch.arange(position_offset, position_offset + t, device=inputs_embeds.device)
        cos, sin = self.rotary_emb(inputs_embeds, positions)
        masks: dict[int | None, torch.Tensor] = {}
        h = inputs_embeds
        for layer, window in zip(self.layers, self.windows):
            if window not in masks:
                masks[window] = self._mask(t, window, h.device, key_mask)
            h = layer(h, cos, sin, masks[window])
        return self.norm(h)


# ----------------------------------------------------------------------------------------------
# Receptive field (the streaming left-context / look-ahead rule)
# ----------------------------------------------------------------------------------------------


def receptive_field(config) -> dict[str, int | None]:
    """Exactness bounds of code2wav, derived from the config's layer structure.

    Returns
      total_upsample: output samples per codec frame (U);
      transformer_context_frames: frames of history one transformer output depends on
        (sum over layers of window - 1; None if a layer attends to the full history);
      conv_left_samples: if transformer outputs are exact from frame e on (and the conv stack's
        input window starts there), output samples are exact from e * U + conv_left_samples;
      lookahead_samples: a window of frames [a, b) yields output samples [a*U, b*U - lookahead_samples)
        (the decoder trans-convs read one input sample ahead and drop the samples that would need
        the next one);
      conv_context_frames: frames of transformer output the conv stack needs before the first
        frame of a chunk so that everything from chunk_start * U - lookahead_samples is exact.
    """
    # Track "first exact sample" as scale * e + left and "end of the output" as scale * b - right.
    scale, left, right = 1, 0, 0
    k_pad = CONV_KERNEL - 1
    for factor in config.upsampling_ratios:  # trans-conv kernel == stride: no trim, no overlap
        scale, left, right = scale * factor, left * factor, right * factor
        left += k_pad  # ConvNeXt depthwise causal conv
    left += k_pad  # decoder input conv
    for rate in config.upsample_rates:
        trim = DECODER_TRANSCONV_KERNEL_FACTOR * rate - rate
        # out[n] = raw[n + trim] reads inputs i with i*rate <= n + trim < i*rate + kernel, i.e.
        # floor(n/rate) and floor(n/rate) + 1; the output is (L - 1) * rate long.
        scale, left, right = scale * rate, left * rate, right * rate + trim
        left += sum(k_pad * d for d in RESIDUAL_DILATIONS)
    left += k_pad  # decoder output conv
    windows = _layer_windows(config)
    tf_ctx = None if any(w is None for w in windows) else sum(w - 1 for w in windows)
    return {
        "total_upsample": scale,
        "transformer_context_frames": tf_ctx,
        "conv_left_samples": left,
        "lookahead_samples": right,
        "conv_context_frames": math.ceil((left + right) / scale),
    }


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class Code2Wav(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_quantizers = config.num_quantizers
        self.code_embedding = nn.Embedding(config.codebook_size * config.num_quantizers, config.hidden_size)
        self.register_buffer(
            "code_offset",
            torch.arange(config.num_quantizers).view(1, -1, 1) * config.codebook_size,
            persistent=False,
        )
        self.pre_transformer = TransformerModel(config)
        hidden = config.hidden_size
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransConvNet(hidden, hidden, f, f), ConvNeXtBlock(hidden)])
            for f in config.upsampling_ratios
        )
        decoder: list[nn.Module] = [CausalConvNet(hidden, config.decoder_dim, CONV_KERNEL)]
        for i, rate in enumerate(config.upsample_rates):
            decoder.append(DecoderBlock(config.decoder_dim // 2**i, config.decoder_dim // 2 ** (i + 1), rate))
        out_dim = config.decoder_dim // 2 ** len(config.upsample_rates)
        decoder += [SnakeBeta(out_dim), CausalConvNet(out_dim, 1, CONV_KERNEL)]
        self.decoder = nn.ModuleList(decoder)
        self._rf = receptive_field(config)

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "code2wav.") -> None:
        """Load a checkpoint's `code2wav.*` tensors (other keys are ignored), strictly."""
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.load_state_dict(own, strict=True)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def total_upsample(self) -> int:
        """Output samples per codec frame (1920 for the real config: 80 ms at 24 kHz)."""
        return self._rf["total_upsample"]

    @property
    def transformer_context_frames(self) -> int | None:
        return self._rf["transformer_context_frames"]

    @property
    def conv_context_frames(self) -> int:
        return self._rf["conv_context_frames"]

    @property
    def lookahead_samples(self) -> int:
        return self._rf["lookahead_samples"]

    @property
    def exact_left_context_frames(self) -> int | None:
        """Codec frames of left context that make a chunk's samples (from chunk_start*U -
        lookahead_samples on) exact: transformer + conv context (578 for the real config)."""
        tf = self.transformer_context_frames
        return None if tf is None else tf + self.conv_context_frames

    # -- decode -----------------------------------------------------------------------------
    def hidden_from_codes(
        self,
        codes: torch.Tensor,
        position_offset: int = 0,
        *,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """codes [B, num_quantizers, T] -> transformer output [B, T, hidden].

        RoPE is relative, so `position_offset` changes the result only by float rounding; the
        exact stream passes the window's absolute frame index to round like the one-shot decode.
        positions / key_mask: see `TransformerModel.forward` (the graphed stream's padded window)."""
        if codes.dim() != 3 or codes.shape[1] != self.num_quantizers or codes.shape[2] == 0:
            raise ValueError(f"code2wav expects codes [B, {self.num_quantizers}, T >= 1], got {tuple(codes.shape)}")
        h = self.code_embedding(codes + self.code_offset).mean(1)
        return self.pre_transformer(h, position_offset, positions=positions, key_mask=key_mask)

    def wav_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """transformer output [B, T, hidden] -> wav [B, 1, T*total_upsample - lookahead_samples] in [-1, 1]."""
        x = hidden.transpose(1, 2)
        for blocks in self.upsample:
            for block in blocks:
                x = block(x)
        for block in self.decoder:
            x = block(x)
        return x.clamp(min=-1, max=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.wav_from_hidden(self.hidden_from_codes(codes))

    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25) -> torch.Tensor:
        """The reference's chunking: decode [ctx + chunk] frames, drop ctx * U samples.

        Drops `lookahead_samples` at every chunk boundary (see module docstring); `Code2WavStream`
        is exact."""
        wavs = []
        u = self.total_upsample
        start, total = 0, codes.shape[-1]
        while start < total:
            end = min(start + chunk_size, total)
            ctx = min(left_context_size, start)
            wavs.append(self(codes[..., start - ctx : end])[..., ctx * u :])
            start = end
        return torch.cat(wavs, dim=-1)

    def stream(self, schedule: Sequence[int] = (4, 25, 50), **kwargs) -> "Code2WavStream":
        return Code2WavStream(self, schedule, **kwargs)


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------


class Code2WavStream:
    """Incremental decode of one (or a batch of lock-stepped) codec frame stream(s).

    `push(codes)` takes [num_quantizers, n] (or [B, num_quantizers, n]) new frames and returns the
    PCM that became available ([samples] float tensor, or [B, samples]), or None. `flush()` decodes
    what is pending, returns the rest of the waveform and resets the stream for a new utterance.

    `schedule` gives the frames per decode: the i-th decode takes schedule[i] frames (the last entry
    repeats), e.g. (4, 25, 50) = a 4-frame first chunk for low latency, then 25, then 50s.

    exact=True (default): the concatenated output equals `model(codes)` up to float rounding. Each
    decode runs the transformer over the chunk plus `transformer_context_frames` codes of history
    (at absolute rotary positions, as in the one-shot decode: mathematically irrelevant, since RoPE
    is relative, but it makes the transformer outputs bit-identical to the one-shot ones), and the
    conv stack over the chunk plus `conv_context_frames` cached transformer outputs. A chunk
    of n frames yields n * U samples, except the first, which yields n * U - lookahead_samples (the
    last lookahead_samples of the waveform so far always wait for the next frame).
    exact=False: the reference rule, as `Code2Wav.chunked_decode`: full forward over
    [left_context_size + chunk] frames, drop left_context_size * U samples, emit everything.

    conv_runner: what runs the conv stack of an exact decode, a callable with the signature of
    `model.wav_from_hidden` (the default); transformer_runner: what runs its transformer,
    (window codes [B, Q, kept + n], kept, position_offset) -> the outputs of the last n frames
    [B, n, hidden] (default: `model.hidden_from_codes(window, position_offset)[:, kept:]`). The GPU
    speech stage passes runners that replay CUDA graphs (thinktalk/code2wav_graphs.py). Streams
    decoded together use the first one's.
    """

    def __init__(
        self,
        model: Code2Wav,
        schedule: Sequence[int] = (4, 25, 50),
        *,
        exact: bool = True,
        left_context_size: int = 25,
        transformer_context_frames: int | None = -1,
        conv_context_frames: int | None = None,
        conv_runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
        transformer_runner: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    ):
        if not schedule or any(int(n) < 1 for n in schedule):
            raise ValueError(f"schedule must be a non-empty list of positive frame counts, got {schedule!r}")
        self.model = model
        self.schedule = [int(n) for n in schedule]
        self.exact = exact
        self.left_context_size = int(left_context_size)
        # Overrides exist to probe the rule (tests); the defaults are the exact values.
        self.tf_ctx = model.transformer_context_frames if transformer_context_frames == -1 else transformer_context_frames
        self.conv_ctx = model.conv_context_frames if conv_context_frames is None else conv_context_frames
        self.holdback = model.lookahead_samples
        self.conv_runner = model.wav_from_hidden if conv_runner is None else conv_runner
        self.transformer_runner = self._transformer if transformer_runner is None else transformer_runner
        self.reset()

    def _transformer(self, window: torch.Tensor, kept: int, position_offset: int) -> torch.Tensor:
        return self.model.hidden_from_codes(window, position_offset=position_offset)[:, kept:]

    def reset(self) -> None:
        self._codes: torch.Tensor | None = None  # [B, Q, n]: kept history + pending frames
        self._kept = 0  # frames of _codes already decoded (history)
        self._hidden: torch.Tensor | None = None  # [B, <=conv_ctx, H]: transformer outputs, history
        self._decoded = 0  # frames decoded so far
        self._chunks = 0
        self._batched: bool | None = None

    @property
    def frames_pending(self) -> int:
        return 0 if self._codes is None else self._codes.shape[-1] - self._kept

    @property
    def frames_decoded(self) -> int:
        return self._decoded

    def _next_target(self) -> int:
        return self.schedule[min(self._chunks, len(self.schedule) - 1)]

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor | None:
        self.append(codes)
        out = []
        while self.frames_pending >= self._next_target():
            out.append(self._decode(self._next_target()))
        return self._format(torch.cat(out, dim=-1), self._batched) if out else None

    def append(self, codes: torch.Tensor) -> None:
        """Take new frames without decoding (`push` = append + decode what is due;
        `decode_due_together` decodes what is due across several streams)."""
        codes = torch.as_tensor(codes)
        batched = codes.dim() == 3
        if not batched:
            codes = codes.unsqueeze(0)
        if self._batched is None:
            self._batched = batched
        elif self._batched != batched:
            raise ValueError("code2wav stream: do not mix batched and unbatched pushes")
        if codes.dim() != 3 or codes.shape[1] != self.model.num_quantizers:
            raise ValueError(
                f"code2wav stream expects codes [{self.model.num_quantizers}, n] or [B, {self.model.num_quantizers}, n]"
                f", got {tuple(codes.shape)}"
            )
        codes = codes.to(self.model.code_offset.device, torch.long)
        self._codes = codes if self._codes is None else torch.cat([self._codes, codes], dim=-1)

    @staticmethod
    @torch.inference_mode()
    def decode_due_together(streams: list["Code2WavStream"]) -> list[torch.Tensor | None]:
        """What `push` would return for each of these single (unbatched, exact) streams after an
        `append`, with streams at the same point (same chunk size, history and position) decoded
        in one batched forward: many speaking requests started together cost one code2wav call
        per step, not one each. Streams differ only in their codes, so each gets its own rows."""
        outs: list[list[torch.Tensor]] = [[] for _ in streams]
        while True:
            groups: dict[tuple, list[int]] = {}
            for i, st in enumerate(streams):
                n = st._next_target()
                if st.frames_pending >= n:
                    hist = 0 if st._hidden is None else st._hidden.shape[1]
                    groups.setdefault((n, st._kept, st._decoded, hist, st.exact, bool(st._batched)), []).append(i)
            if not groups:
                break
            for (n, _, _, _, exact, batched), members in groups.items():
                if len(members) == 1 or not exact or batched:
                    for i in members:
                        outs[i].append(streams[i]._decode(n))
                    continue
                for i, wav in zip(members, Code2WavStream._decode_group([streams[i] for i in members], n)):
                    outs[i].append(wav)
        return [Code2WavStream._format(torch.cat(o, dim=-1), bool(st._batched)) if o else None
                for o, st in zip(outs, streams)]

    @staticmethod
    def _decode_group(streams: list["Code2WavStream"], n: int) -> list[torch.Tensor]:
        """`_decode(n)` of streams in the same state, as one batch (their rows stacked)."""
        first = streams[0]
        codes, hidden = first._codes, first._hidden
        first._codes = torch.cat([st._codes for st in streams])
        first._hidden = None if hidden is None else torch.cat([st._hidden for st in streams])
        try:
            wav = first._decode(n)  # advances `first`'s counters and keeps the stacked history
        except BaseException:
            first._codes, first._hidden = codes, hidden
            raise
        stacked_codes, stacked_hidden = first._codes, first._hidden
        for i, st in enumerate(streams):
            st._codes = stacked_codes[i : i + 1]
            st._hidden = None if stacked_hidden is None else stacked_hidden[i : i + 1]
            if st is not first:
                st._kept, st._decoded, st._chunks = first._kept, first._decoded, first._chunks
        return [wav[i : i + 1] for i in range(len(streams))]

    @torch.inference_mode()
    def flush(self) -> torch.Tensor:
        """Decode the pending frames, return the remaining PCM and reset the stream."""
        wav = self._decode(self.frames_pending) if self.frames_pending else None
        batched = bool(self._batched)
        self.reset()
        if wav is None:
            p = self.model.code_embedding.weight
            wav = torch.zeros(1, 1, 0, dtype=p.dtype, device=p.device)
        return self._format(wav, batched)

    @staticmethod
    def _format(wav: torch.Tensor, batched: bool) -> torch.Tensor:
        return wav[:, 0] if batched else wav[0, 0]

    def _decode(self, n: int) -> torch.Tensor:
        m, u = self.model, self.model.total_upsample
        start = self._decoded
        window = self._codes[..., : self._kept + n]
        if self.exact:
            h = self.transformer_runner(window, self._kept, start - self._kept)
            hist = self._hidden if self._hidden is not None else h[:, :0]
            hc = torch.cat([hist, h], dim=1)
            wav = self.conv_runner(hc)
            # wav[0] is sample (start - hist) * U; samples before start*U - holdback were emitted.
            first = hist.shape[1] * u - (self.holdback if start > 0 else 0)
            if first < 0:
                raise ValueError("code2wav stream: conv context shorter than the look-ahead")
            emitted = wav[..., first:]
            self._hidden = hc[:, max(0, hc.shape[1] - self.conv_ctx) :] if self.conv_ctx else hc[:, :0]
            keep = window.shape[-1] if self.tf_ctx is None else min(self.tf_ctx, window.shape[-1])
        else:
            wav = m(window)
            emitted = wav[..., self._kept * u :]
            keep = min(self.left_context_size, window.shape[-1])
        self._codes = self._codes[..., self._kept + n - keep :]
        self._kept = keep
        self._decoded += n
        self._chunks += 1
        return emitted
