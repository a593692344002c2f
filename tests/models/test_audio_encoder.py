"""Parity of thinktalk's AudioEncoder with transformers' Qwen3OmniMoeAudioEncoder (tiny config)."""

import pytest
import torch

from thinktalk.config import ConfigNode, reference_config
from thinktalk.models.audio_encoder import AudioEncoder, audio_output_lengths

hf = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
hf_cfg = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")

ATOL = 1e-5


def tiny_audio_dict(**overrides) -> dict:
    """The shipped audio_config with tiny sizes; chunking fields (n_window, n_window_infer) as shipped."""
    d = reference_config().thinker_config.audio_config.to_dict()
    d.update(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        output_dim=48,
        downsample_hidden_size=16,
        num_mel_bins=20,  # 20 -> 10 -> 5 -> 3: exercises the odd frequency ceil
        max_source_positions=64,
    )
    d.update(overrides)
    return d


def randomize_(module):
    """Seeded random weights everywhere (LayerNorm scales around 1, everything else around 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = name.endswith("weight") and ("norm" in name or "ln_" in name)
            p.copy_((1.0 if is_norm_scale else 0.0) + 0.2 * torch.randn_like(p))


def build_pair(**overrides):
    d = tiny_audio_dict(**overrides)
    torch.manual_seed(0)
    config = hf_cfg.Qwen3OmniMoeAudioEncoderConfig(**d)
    config._attn_implementation = "sdpa"
    ref = hf.Qwen3OmniMoeAudioEncoder(config).eval()
    # Random (non-default) weights everywhere, LayerNorms and biases included.
    randomize_(ref)
    ours = AudioEncoder(ConfigNode(d)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, d


@pytest.fixture(scope="module")
def pair():
    return build_pair()


def run_both(ref, ours, lens, seed=1):
    torch.manual_seed(seed)
    feats = torch.randn(ref.config.num_mel_bins, sum(lens))
    fl = torch.tensor(lens, dtype=torch.long)
    with torch.no_grad():
        expected = ref(feats, feature_lens=fl).last_hidden_state
        got = ours(feats, fl)
    return expected, got


@pytest.mark.parametrize(
    "lens",
    [
        [1850, 333],  # one clip longer than n_window_infer (3 attention windows), one shorter
        [77],  # a single clip shorter than one chunk
        [800, 100, 1601],  # exact multiples of the chunk / window, and one frame past
        [5, 1000, 37, 2400],  # several clips with ragged tails, several full windows
    ],
)
def test_audio_parity(pair, lens):
    ref, ours, d = pair
    expected, got = run_both(ref, ours, lens)
    n_tokens = int(sum(audio_output_lengths(torch.tensor(lens), d["n_window"])))
    assert got.shape == expected.shape == (n_tokens, d["output_dim"])
    err = (got - expected).abs().max().item()
    print(f"audio lens={lens}: tokens={n_tokens} max abs err={err:.3e}")
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), err


def test_audio_conv_chunksize_split():
    ref, ours, _ = build_pair(conv_chunksize=3)
    expected, got = run_both(ref, ours, [950, 420], seed=2)
    err = (got - expected).abs().max().item()
    print(f"audio conv_chunksize=3: max abs err={err:.3e}")
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), err


def test_audio_output_lengths_match_reference():
    lens = torch.arange(1, 3000)
    for n_window in (50,):
        assert torch.equal(audio_output_lengths(lens, n_window), hf._get_feat_extract_output_lengths(lens, n_window))


def test_audio_windows_use_segment_attention(pair, monkeypatch):
    """Attention is computed per window (never a full-sequence mask), equal windows batched."""
    ref, ours, d = pair
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lens = [1850, 333, 2400]
    feats = torch.randn(d["num_mel_bins"], sum(lens))
    with torch.no_grad():
        ours(feats, torch.tensor(lens))
    window = 13 * (d["n_window_infer"] // (2 * d["n_window"]))  # 13 tokens per full 100-frame chunk
    assert all(mask is None for _, mask in calls)
    assert max(shape[2] for shape, _ in calls) <= window
    # per layer: one batched call for all full windows + one per distinct remainder length
    windows = ours._window_lengths(lens, 13)
    assert len(calls) == d["encoder_layers"] * len(set(windows))
    assert sum(shape[0] * shape[2] for shape, _ in calls) == d["encoder_layers"] * sum(windows)


def test_audio_param_names_full_size():
    """Full-size config: our state_dict keys and shapes equal transformers' (built on meta)."""
    d = reference_config().thinker_config.audio_config.to_dict()
    with torch.device("meta"):
        ref = hf.Qwen3OmniMoeAudioEncoder(hf_cfg.Qwen3OmniMoeAudioEncoderConfig(**d))
        ours = AudioEncoder(ConfigNode(d))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_bad_inputs_rejected(pair):
    _, ours, d = pair
    with pytest.raises(ValueError):
        ours(torch.randn(d["num_mel_bins"], 10), torch.tensor([4, 5]))
    with pytest.raises(ValueError):
        ours(torch.randn(d["num_mel_bins"] + 1, 10), torch.tensor([10]))
