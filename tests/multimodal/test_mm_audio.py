"""Audio: decoding (PyAV) + resampling (soxr) of synthesised files, and log-mel parity with the
WhisperFeatureExtractor exactly as Qwen3OmniMoeProcessor calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mm_synth import AUDIO_FORMATS, report, tone

from thinktalk.multimodal.audio import audio_token_count, load_audio, log_mel_features


def _aligned_error(got: np.ndarray, ref: np.ndarray, max_shift: int = 3000) -> tuple[int, float]:
    """(best shift of `got` against `ref`, max abs error over the middle after alignment)."""
    best = (0, np.inf)
    for shift in range(0, max_shift + 1, 1):
        n = min(len(got) - shift, len(ref))
        if n < len(ref) // 2:
            break
        seg = got[shift : shift + n]
        err = float(np.abs(seg[2000 : n - 2000] - ref[2000 : n - 2000]).max())
        if err < best[1]:
            best = (shift, err)
        if err < 0.05:
            break
    return best


@pytest.mark.parametrize("suffix", list(AUDIO_FORMATS))
def test_load_audio_formats(mm_files, suffix):
    got = load_audio(mm_files[f"audio_{suffix}"])
    ref = tone(2.0, 16000)
    assert got.dtype == np.float32 and got.ndim == 1
    if suffix in ("wav", "flac"):  # lossless: exactly the int16-quantised signal
        assert len(got) == len(ref)
        quantised = np.round(np.clip(ref, -1, 1) * 32767) / 32768
        err = float(np.abs(got - quantised).max())
        report(f"load_audio {suffix} vs int16 source", err)
        assert err < 1e-6
    else:  # lossy: the right length (up to codec padding) and the same waveform
        assert abs(len(got) - len(ref)) <= 2048, (len(got), len(ref))
        shift, err = _aligned_error(got, ref)
        report(f"load_audio {suffix} (lossy, shift {shift}) vs source", err)
        assert err < 0.05


def test_load_audio_resamples_and_downmixes(mm_files):
    got = load_audio(mm_files["audio_stereo_44k"])  # 44.1 kHz stereo, 1.5 s
    ref = tone(1.5, 16000, channels=2).mean(axis=0)  # the same signal synthesised at 16 kHz
    assert len(got) == len(ref) == 24000
    err = float(np.abs(got[200:-200] - ref[200:-200]).max())
    report("load_audio 44.1k stereo -> 16k mono vs analytic", err)
    assert err < 1e-3


def test_load_audio_arrays_and_bytes(mm_files):
    wave = tone(1.0, 16000)
    np.testing.assert_array_equal(load_audio(wave), wave)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(wave)), wave)
    at_8k = load_audio((tone(1.0, 8000), 8000))
    assert at_8k.shape == (16000,)
    from_bytes = load_audio(mm_files["audio_flac"].read_bytes())
    np.testing.assert_array_equal(from_bytes, load_audio(mm_files["audio_flac"]))
    cut = load_audio(mm_files["audio_wav"], start=0.5, end=1.25)
    np.testing.assert_array_equal(cut, load_audio(mm_files["audio_wav"])[8000:20000])


def _hf_features(hf_processor, clips):
    fe = hf_processor.feature_extractor
    # the processor's audio_kwargs: sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True
    return fe(clips, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True, return_tensors="pt")


@pytest.mark.parametrize(
    "lengths",
    [[16000 * 5], [16013], [48057, 16013], [16013, 48057, 800], [401]],
    ids=["5s", "1s+13", "batch2", "batch3", "tiny"],
)
def test_log_mel_matches_whisper_feature_extractor(hf_processor, lengths):
    rng = np.random.default_rng(len(lengths))
    clips = [(tone(n / 16000, 16000, freq=200 + 100 * i) + 0.01 * rng.standard_normal(n)).astype(np.float32)
             for i, n in enumerate(lengths)]
    ref = _hf_features(hf_processor, clips)
    feats, mask = log_mel_features(clips)
    assert feats.dtype == torch.float32 and mask.dtype == torch.int32
    assert feats.shape == ref["input_features"].shape
    assert torch.equal(mask, ref["attention_mask"])
    err = (feats - ref["input_features"]).abs().max().item()
    report(f"log_mel {lengths}", err)
    assert err <= 1e-4


def test_five_seconds_give_65_audio_tokens(mm_files):
    feats, mask = log_mel_features([load_audio(mm_files["audio_5s"])])
    assert feats.shape == (1, 128, 500) and int(mask.sum()) == 500
    assert int(audio_token_count(mask.sum(-1))[0]) == 65


def test_audio_token_count_matches_reference():
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    lengths = torch.arange(1, 3001)
    assert torch.equal(audio_token_count(lengths), _get_feat_extract_output_lengths(lengths))
    assert audio_token_count(100) == 13 and audio_token_count(500) == 65
