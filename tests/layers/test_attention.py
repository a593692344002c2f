"""`fuse_qkv`: one GEMM for the q/k/v projections, same outputs, no extra memory."""

import torch

from thinktalk.layers.attention import Attention, ContiguousKV, SequenceKV, fuse_qkv
from thinktalk.layers.rotary import RotaryEmbedding


def _attention(seed=0):
    torch.manual_seed(seed)
    attn = Attention(0, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return attn


def _run(attn, x):
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(x.shape[0]))
    return attn(x, cos, sin, ContiguousKV([SequenceKV()], [x.shape[0]]))


def test_fused_equals_separate():
    x = torch.randn(7, 64)
    attn = _attention()
    ref = _run(attn, x)
    assert fuse_qkv(attn) and attn.qkv_weight.shape == (64 + 32 + 32, 64)
    torch.testing.assert_close(_run(attn, x), ref, rtol=1e-5, atol=1e-5)
    # the projections' weights are views of the stacked tensor: no second copy
    base = attn.qkv_weight.untyped_storage().data_ptr()
    assert all(p.weight.untyped_storage().data_ptr() == base for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert fuse_qkv(attn)  # idempotent


def test_loading_weights_after_fusing_updates_the_gemm():
    x = torch.randn(5, 64)
    source, target = _attention(1), _attention(2)
    fuse_qkv(target)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(_run(target, x), _run(source, x), rtol=1e-5, atol=1e-5)


def test_biased_projections_are_left_alone():
    attn = Attention(0, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16, bias=True)
    assert not fuse_qkv(attn) and attn.qkv_weight is None
