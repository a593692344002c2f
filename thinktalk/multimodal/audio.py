"""Audio input: decode (PyAV) -> mono float32 -> resample (soxr) -> Whisper-style log-mel features.

`log_mel_features` reproduces what `Qwen3OmniMoeProcessor` gets from its `WhisperFeatureExtractor`
(called with ``padding=True, truncation=False, return_attention_mask=True``): the clips of a batch
are right-padded with zeros to the longest one, a centred, reflect-padded STFT (Hann window) is
taken, its last frame dropped, mapped to a Slaney mel bank, ``log10`` clamped at 1e-10, floored at
``max - 8`` per clip and scaled to ``(x + 4) / 4``. The feature mask is the per-sample mask
subsampled every hop, minus its last column when the padded length is not a multiple of the hop,
exactly as transformers computes it (so a clip's mask length can depend on the batch it is in).

`load_audio` follows what ``librosa.load(path, sr=16000)`` does in the reference recipe
(qwen-omni-utils): decode to float32, average the channels, then resample with soxr "HQ" and fix the
length to ``ceil(n * target / source)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ASSETS
from ..errors import InputError, MediaError, MediaTooLargeError
from .media import MediaBlob, av_error_types, describe, open_av, resolve_source

# The reference processor's `audio_kwargs` default (`n_window`); the thinker config's
# `audio_config.n_window` holds the same value and is preferred where a config is at hand.
DEFAULT_N_WINDOW = 50


@dataclass(frozen=True)
class MelConfig:
    """The WhisperFeatureExtractor fields of preprocessor_config.json that shape the features."""

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    padding_value: float = 0.0
    dither: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MelConfig":
        names = cls.__dataclass_fields__
        return cls(**{k: data[k] for k in names if k in data and data[k] is not None})


@lru_cache(maxsize=1)
def default_mel_config() -> MelConfig:
    """The config of the shipped Qwen3-Omni preprocessor_config.json."""
    return MelConfig.from_dict(json.loads((ASSETS / "preprocessor_config.json").read_text()))


# --------------------------------------------------------------------------------------------
# decoding


_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_to_float(frame: Any) -> np.ndarray:
    """One decoded PyAV audio frame as float32 [channels, samples] in [-1, 1]."""
    fmt = frame.format
    name = fmt.name.rstrip("p") if fmt.is_planar else fmt.name
    channels = frame.layout.nb_channels if hasattr(frame.layout, "nb_channels") else len(frame.layout.channels)
    arr = frame.to_ndarray()
    if not fmt.is_planar:
        arr = arr.reshape(-1, channels).T
    if name in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    if name == "u8":
        return ((arr.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if name in _SCALE:
        return (arr.astype(np.float64 if name in ("s32", "s64") else np.float32) / _SCALE[name]).astype(np.float32)
    raise MediaError(f"unsupported PyAV sample format {fmt.name!r}")


def decode_audio_stream(blob: MediaBlob, kind: str = "audio", max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a file/bytes to mono float32 at its native rate.

    `max_seconds`: refuse audio longer than this, counted while decoding (a small file of
    low-bitrate audio can decode to gigabytes of samples, whatever its header says)."""
    errors = av_error_types()
    decoded = 0
    with open_av(blob, kind) as container:
        if not container.streams.audio:
            what = "video without an audio track" if container.streams.video else "no audio stream"
            raise MediaError(f"{blob.label}: {what}; cannot extract audio")
        stream = container.streams.audio[0]
        chunks: list[np.ndarray] = []
        rate: int | None = None
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if rate is None:
                    rate = int(frame.sample_rate)
                elif int(frame.sample_rate) != rate:
                    raise MediaError(f"{blob.label}: the sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
                decoded += frame.samples
                if max_seconds is not None and decoded > max_seconds * rate:
                    raise MediaTooLargeError(f"{blob.label}: audio is longer than the limit of {max_seconds:g} s")
                data = _frame_to_float(frame)
                # librosa.to_mono: the mean over channels
                chunks.append(data[0] if data.shape[0] == 1 else np.mean(data, axis=0, dtype=np.float32))
        except MediaError:
            raise
        except errors as exc:
            raise MediaError(f"{blob.label}: corrupt or undecodable audio data ({exc})") from exc
    if not chunks or rate is None:
        raise MediaError(f"{blob.label}: audio is empty (no samples decoded)")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate


def _array_to_mono(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64) / float(-np.iinfo(arr.dtype).min)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{label}: audio samples must be numbers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        if arr.shape[0] <= 8 < arr.shape[1]:
            arr = arr.mean(axis=0)
        elif arr.shape[1] <= 8 < arr.shape[0]:
            arr = arr.mean(axis=1)
        elif 1 in arr.shape:
            arr = arr.reshape(-1)
        else:
            raise InputError(f"{label}: cannot tell channels from samples in a 2-D audio array; pass mono 1-D audio")
    elif arr.ndim != 1:
        raise InputError(f"{label}: audio must be a 1-D (mono) array, got {arr.ndim} dimensions")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise InputError(f"{label}: audio contains NaN or infinite samples")
    return arr


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr "HQ" resampling with librosa's length fix (``ceil(n * target / orig)``)."""
    if orig_sr == target_sr:
        return wave
    import soxr

    out = soxr.resample(wave, orig_sr, target_sr, quality="HQ")
    n = int(math.ceil(wave.shape[-1] * float(target_sr) / orig_sr))
    if out.shape[-1] > n:
        out = out[:n]
    elif out.shape[-1] < n:
        out = np.pad(out, (0, n - out.shape[-1]))
    return np.asarray(out, dtype=np.float32)


def load_audio(
    source: Any,
    sampling_rate: int = 16000,
    *,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """Load audio as mono float32 at `sampling_rate`.

    `source`: a path, ``file://`` or ``data:`` URL, bytes (wav, mp3, flac, ogg/opus, m4a/aac, or the
    audio track of any container FFmpeg reads), a numpy array / torch tensor (taken to be at
    `sampling_rate`) or an ``(array, sample_rate)`` tuple. `start` / `end` cut the clip (seconds).
    """
    label = describe(source[0] if isinstance(source, tuple) else source, "audio")
    if isinstance(source, tuple):
        if len(source) != 2 or not np.isscalar(source[1]):
            raise InputError(f"{label}: an audio tuple must be (array, sample_rate)")
        arr, rate = source
        wave = _array_to_mono(np.asarray(_to_numpy(arr)), label)
        rate = int(rate)
        if rate <= 0:
            raise InputError(f"{label}: sample rate must be positive, got {rate}")
    elif isinstance(source, np.ndarray) or isinstance(source, torch.Tensor):
        wave = _array_to_mono(np.asarray(_to_numpy(source)), label)
        rate = sampling_rate
    else:
        blob = resolve_source(source, "audio")
        label = blob.label
        wave, rate = decode_audio_stream(blob)
    wave = _cut(wave, rate, start, end, label)
    if wave.size == 0:
        raise MediaError(f"{label}: audio is empty (0 samples)")
    return resample(wave, rate, sampling_rate)


def _to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return x


def _cut(wave: np.ndarray, rate: int, start: float | None, end: float | None, label: str) -> np.ndarray:
    if start is None and end is None:
        return wave
    start = float(start or 0.0)
    if start < 0 or (end is not None and end < start):
        raise InputError(f"{label}: invalid time range start={start} end={end}")
    first = int(round(rate * start))
    if end is None:
        return wave[first:]
    return wave[first : first + int(round(rate * (float(end) - start)))]


# --------------------------------------------------------------------------------------------
# features


def _hertz_to_mel_slaney(freq: np.ndarray | float) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    min_log_hertz, min_log_mel = 1000.0, 15.0
    logstep = 27.0 / np.log(6.4)
    mels = 3.0 * freq / 200.0
    log_region = freq >= min_log_hertz
    return np.where(log_region, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hertz) * logstep, mels)


def _mel_to_hertz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    min_log_hertz, min_log_mel = 1000.0, 15.0
    logstep = np.log(6.4) / 27.0
    freq = 200.0 * mels / 3.0
    return np.where(mels >= min_log_mel, min_log_hertz * np.exp(logstep * (mels - min_log_mel)), freq)


@lru_cache(maxsize=8)
def mel_filter_bank(n_fft: int, n_mels: int, sampling_rate: int, f_min: float = 0.0,
                    f_max: float | None = None) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters, float64 [n_fft // 2 + 1, n_mels]."""
    f_max = sampling_rate / 2 if f_max is None else f_max
    n_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)
    mel_points = np.linspace(_hertz_to_mel_slaney(f_min), _hertz_to_mel_slaney(f_max), n_mels + 2)
    hz_points = _mel_to_hertz_slaney(mel_points)
    widths = np.diff(hz_points)
    offsets = hz_points[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= (2.0 / (hz_points[2:] - hz_points[:-2]))[None, :]
    return bank


def log_mel_features(
    waveforms: Sequence[np.ndarray] | np.ndarray,
    config: MelConfig | None = None,
    per_clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_features float32 [B, n_mels, T], feature_attention_mask int32 [B, T]) for 16 kHz clips.

    per_clip: each clip's features as if it came alone, right-padded with zeros (masked out) to
    the longest, instead of the reference's batch (which pads the waveforms first, so the last
    frame of a shorter clip and its frame count depend on the other clips). A re-sent conversation
    then keeps its earlier clips' features, and with them their cached KV, when a longer clip joins.
    """
    cfg = config or default_mel_config()
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        waveforms = [waveforms]
    clips = [np.asarray(_to_numpy(w), dtype=np.float32).reshape(-1) for w in waveforms]
    if not clips:
        raise InputError("audio: no clips given")
    for i, clip in enumerate(clips):
        if clip.size == 0:
            raise MediaError(f"audio #{i}: audio is empty (0 samples)")
    if per_clip and len(clips) > 1:
        return stack_clip_features([log_mel_features([c], cfg) for c in clips])
    lengths = [c.size for c in clips]
    longest = max(lengths)
    if longest <= cfg.n_fft // 2:
        raise MediaError(
            f"audio: clip too short ({longest} samples = {1000 * longest / cfg.sampling_rate:.1f} ms); "
            f"need more than {cfg.n_fft // 2} samples"
        )
    batch = np.full((len(clips), longest), cfg.padding_value, dtype=np.float32)
    for i, clip in enumerate(clips):
        batch[i, : clip.size] = clip

    wave = torch.from_numpy(batch)
    if cfg.dither != 0.0:
        wave = wave + cfg.dither * torch.randn(wave.shape, dtype=wave.dtype)
    window = torch.hann_window(cfg.n_fft)
    spec = torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, return_complex=True)
    power = (spec[..., :-1].abs() ** 2).contiguous()
    filters = torch.from_numpy(mel_filter_bank(cfg.n_fft, cfg.feature_size, cfg.sampling_rate)).to(torch.float32)
    mel = filters.T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    features = (log_spec + 4.0) / 4.0

    # The sample mask subsampled every hop; its last column dropped when the hop does not divide
    # the padded length (so frames == longest // hop).
    columns = -(-longest // cfg.hop_length)
    starts = torch.arange(columns) * cfg.hop_length
    mask = (starts[None, :] < torch.tensor(lengths)[:, None]).to(torch.int32)
    if longest % cfg.hop_length:
        mask = mask[:, :-1]
    return features, mask


def stack_clip_features(alone: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips' features computed alone (each `log_mel_features([clip])`: [1, n_mels, T_i], [1, T_i])
    as one batch: right-padded with zeros (masked out) to the longest."""
    if len(alone) == 1:
        return alone[0]
    frames = max(f.shape[-1] for f, _ in alone)
    features = torch.zeros(len(alone), alone[0][0].shape[1], frames, dtype=torch.float32)
    mask = torch.zeros(len(alone), frames, dtype=torch.int32)
    for i, (f, m) in enumerate(alone):
        features[i, :, : f.shape[-1]] = f[0]
        mask[i, : m.shape[-1]] = m[0]
    return features, mask


def audio_token_count(feature_len: Any, n_window: int = DEFAULT_N_WINDOW) -> Any:
    """Audio-encoder output length for `feature_len` mel frames (ints, numpy or torch, elementwise).

    Full chunks of ``2 * n_window`` frames give 13 tokens each; the remainder goes through three
    stride-2 convolutions.
    """
    chunk = n_window * 2
    rest = feature_len % chunk
    after_conv1 = (rest - 1) // 2 + 1
    return ((after_conv1 - 1) // 2 + 1 - 1) // 2 + 1 + (feature_len // chunk) * 13
