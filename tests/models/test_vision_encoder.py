"""Parity of thinktalk's VisionEncoder with transformers' Qwen3OmniMoeVisionEncoder (tiny config)."""

import pytest
import torch

from thinktalk.config import ConfigNode, reference_config
from thinktalk.models.vision_encoder import VisionEncoder, frame_groups

hf = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
hf_cfg = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")

ATOL = 1e-5


def tiny_vision_dict(**overrides) -> dict:
    d = reference_config().thinker_config.vision_config.to_dict()
    d.update(
        hidden_size=32,
        depth=4,
        deepstack_visual_indexes=[1, 2],
        num_heads=4,
        intermediate_size=64,
        out_hidden_size=48,
        num_position_embeddings=64,  # 8 x 8 learned grid
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
    )
    d.update(overrides)
    return d


def randomize_(module):
    """Seeded random weights everywhere, at a realistic scale (matrices ~ 1/sqrt(fan_in), so
    activations stay O(1); LayerNorm scales around 1, biases small but non-zero).

    The scale matters for an absolute tolerance: our patch embedding is a matmul where the
    reference runs a Conv3d over one kernel-sized patch, which sums the same products in another
    order (relative difference ~1e-7 per output), so O(10) activations would sit near atol.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # LayerNorm scale
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def pair():
    d = tiny_vision_dict()
    torch.manual_seed(0)
    config = hf_cfg.Qwen3OmniMoeVisionEncoderConfig(**d)
    config._attn_implementation = "sdpa"
    ref = hf.Qwen3OmniMoeVisionEncoder(config).eval()
    randomize_(ref)
    ours = VisionEncoder(ConfigNode(d)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, d


GRIDS = {
    "one image": [[1, 4, 6]],
    "two images, different grids": [[1, 4, 4], [1, 12, 10]],  # 12 > 8: position table upsampled
    "video t=3 + image": [[3, 6, 4], [1, 2, 2]],
    "video t=8": [[8, 6, 6]],
    "image, video, image": [[1, 2, 8], [4, 4, 4], [1, 4, 4]],  # equal-length frames not contiguous
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_vision_parity(pair, name):
    ref, ours, d = pair
    grid = torch.tensor(GRIDS[name])
    n = int(grid.prod(-1).sum())
    torch.manual_seed(1)
    pixels = torch.randn(n, d["in_channels"] * d["temporal_patch_size"] * d["patch_size"] ** 2)
    with torch.no_grad():
        out = ref(pixels, grid_thw=grid)
        merged, deepstack = ours(pixels, grid)
    merge2 = d["spatial_merge_size"] ** 2
    assert merged.shape == out.pooler_output.shape == (n // merge2, d["out_hidden_size"])
    assert len(deepstack) == len(out.deepstack_features) == len(d["deepstack_visual_indexes"])
    errs = [(merged - out.pooler_output).abs().max().item()]
    errs += [(a - b).abs().max().item() for a, b in zip(deepstack, out.deepstack_features)]
    print(f"vision {name} {GRIDS[name]}: max abs err merged={errs[0]:.3e} deepstack={[f'{e:.3e}' for e in errs[1:]]}")
    assert torch.allclose(merged, out.pooler_output, atol=ATOL, rtol=0), errs
    for a, b in zip(deepstack, out.deepstack_features):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=ATOL, rtol=0), errs


@pytest.mark.parametrize("max_patches", [36, 50, 100, 16])
@pytest.mark.parametrize("name", ["video t=8", "image, video, image", "two images, different grids"])
def test_vision_in_frame_groups(pair, name, max_patches, monkeypatch):
    """Frames in groups of at most max_patches patches (one pass of the blocks each): the result
    is transformers' for the whole input, and no block sees more than a group's patches."""
    ref, ours, d = pair
    grid = torch.tensor(GRIDS[name])
    n = int(grid.prod(-1).sum())
    torch.manual_seed(2)
    pixels = torch.randn(n, d["in_channels"] * d["temporal_patch_size"] * d["patch_size"] ** 2)
    largest_frame = int((grid[:, 1] * grid[:, 2]).max())
    seen = []
    real = type(ours.blocks[0]).forward
    monkeypatch.setattr(type(ours.blocks[0]), "forward", lambda self, x, *a: (seen.append(x.shape[0]), real(self, x, *a))[1])
    monkeypatch.setattr(ours, "max_patches_per_pass", max_patches)
    with torch.no_grad():
        out = ref(pixels, grid_thw=grid)
        merged, deepstack = ours(pixels, grid)
    assert max(seen) <= max(max_patches, largest_frame)
    assert sum(seen) == n * d["depth"]
    assert torch.allclose(merged, out.pooler_output, atol=ATOL, rtol=0)
    for a, b in zip(deepstack, out.deepstack_features, strict=True):
        assert torch.allclose(a, b, atol=ATOL, rtol=0)


def test_frame_groups():
    frames = [(4, 4)] * 3 + [(6, 6)] + [(2, 2)] * 2
    assert frame_groups(frames, None) == [frames]
    assert frame_groups(frames, 32) == [[(4, 4)] * 2, [(4, 4)], [(6, 6)], [(2, 2)] * 2]  # 36 > 32: alone
    assert frame_groups(frames, 1000) == [frames]
    assert frame_groups([], 10) == []
    assert sum(frame_groups(frames, 20), []) == frames


def test_vision_attention_is_per_frame(pair, monkeypatch):
    """No full-sequence mask: every SDPA call sees one frame's patches, equal frames batched."""
    ref, ours, d = pair
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    grid = torch.tensor([[8, 6, 6], [1, 4, 4], [2, 4, 4]])
    n = int(grid.prod(-1).sum())
    with torch.no_grad():
        ours(torch.randn(n, d["in_channels"] * d["temporal_patch_size"] * d["patch_size"] ** 2), grid)
    assert all(mask is None for _, mask in calls)
    # per block: one call for the eight 36-patch frames, one for the three 16-patch frames
    assert sorted((s[0], s[2]) for s, _ in calls) == sorted([(8, 36), (3, 16)] * d["depth"])


def test_vision_param_names_full_size():
    """Full-size config: our state_dict keys and shapes equal transformers' (built on meta)."""
    d = reference_config().thinker_config.vision_config.to_dict()
    with torch.device("meta"):
        ref = hf.Qwen3OmniMoeVisionEncoder(hf_cfg.Qwen3OmniMoeVisionEncoderConfig(**d))
        ours = VisionEncoder(ConfigNode(d))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_vision_bad_inputs_rejected(pair):
    _, ours, d = pair
    dim = d["in_channels"] * d["temporal_patch_size"] * d["patch_size"] ** 2
    with pytest.raises(ValueError):
        ours(torch.randn(15, dim), torch.tensor([[1, 3, 5]]))  # not divisible by merge size
    with pytest.raises(ValueError):
        ours(torch.randn(15, dim), torch.tensor([[1, 4, 4]]))  # wrong patch count
