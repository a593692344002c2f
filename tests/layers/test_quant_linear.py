"""Which kernel the quantized layers pick: the decode GEMVs up to GEMV_MAX_M rows / GEMV_MAX_TOKENS
tokens, the tile kernels beyond (Triton under the CPU interpreter), equal to the reference path."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
from torch import nn

from thinktalk.kernels import quant_gemm, quant_gemv, quant_moe, quant_moe_gemv
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.quant_format import resolve_format
from thinktalk.kernels.quant_gemm import use_backend
from thinktalk.layers.moe import SparseMoE
from thinktalk.layers.quant_linear import QuantExperts, QuantLinear, install_quant_experts

# the kernel-choice tests need the Triton kernels to run here (the CPU interpreter); the stacking
# tests check the reference path always and the Triton path where it runs
needs_triton = pytest.mark.skipif(
    quant_gemv.triton is None or not interpreting(),
    reason="TRITON_INTERPRET=1 was not set before the kernels were imported (or no triton)",
)
BACKENDS = ["reference"] + (["triton"] if quant_gemv.triton is not None and interpreting() else [])


def _spy(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(a[0].shape[0])
        return fn(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@needs_triton
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_linear_picks_gemv_for_decode_rows(monkeypatch, method):
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=gen) * 0.1)
    q = QuantLinear.from_linear(lin, resolve_format(method, 96, 32))
    gemv = _spy(monkeypatch, quant_gemv, "quant_gemv")
    tiles = _spy(monkeypatch, quant_gemm, "quant_matmul")
    for m in (1, quant_gemv.GEMV_MAX_M, quant_gemv.GEMV_MAX_M + 1):
        x = torch.randn(m, 96, generator=gen)
        with use_backend("reference"):
            ref = q(x)
        with use_backend("triton"):
            got = q(x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert gemv == [1, quant_gemv.GEMV_MAX_M]
    assert tiles == [quant_gemv.GEMV_MAX_M + 1]


@needs_triton
def test_moe_picks_gemv_for_decode_tokens(monkeypatch):
    torch.manual_seed(0)
    moe = SparseMoE(hidden_size=32, moe_intermediate_size=16, num_experts=4, top_k=2)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    fmt = resolve_format("int4", 32, 16, sym=False)
    install_quant_experts(moe, QuantExperts.from_experts(moe.experts, fmt, resolve_format("int4", 16, 16, sym=False)))
    gemv = _spy(monkeypatch, quant_moe_gemv, "quant_moe_gemv")
    tiles = _spy(monkeypatch, quant_moe, "quant_fused_moe")
    for n in (1, quant_moe_gemv.GEMV_MAX_TOKENS, quant_moe_gemv.GEMV_MAX_TOKENS + 1):
        x = torch.randn(n, 32)
        with use_backend("reference"):
            ref = moe(x)
        with use_backend("triton"):
            got = moe(x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert gemv == [1, quant_moe_gemv.GEMV_MAX_TOKENS]
    assert tiles == [quant_moe_gemv.GEMV_MAX_TOKENS + 1]


def _quantize_projections(module, names, fmt_for):
    for name in names:
        lin = getattr(module, name)
        setattr(module, name, QuantLinear.from_linear(lin, fmt_for(lin.in_features)))


@pytest.mark.parametrize("method,group,block", [("int4", 32, None), ("int8", None, None), ("fp8", None, 16)])
def test_quantized_qkv_fuse_into_one_gemv(method, group, block):
    from thinktalk.layers.attention import Attention, ContiguousKV, SequenceKV, fuse_qkv
    from thinktalk.layers.rotary import RotaryEmbedding

    torch.manual_seed(1)
    attn = Attention(0, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    _quantize_projections(attn, ("q_proj", "k_proj", "v_proj", "o_proj"),
                          lambda k: resolve_format(method, k, group, sym=method != "int4", fp8_block=block))
    keys = set(attn.state_dict())
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(1))
    x = torch.randn(1, 64)  # a decode row: the GEMV

    def run():
        return attn(x, cos, sin, ContiguousKV([SequenceKV()], [1]))

    with use_backend("reference"):
        want = run()
    assert fuse_qkv(attn) and attn.qkv_proj.weight.shape == (64 + 32 + 32, 64)
    assert set(attn.state_dict()) == keys  # the stack is not a submodule
    stack = attn.qkv_proj.weight.qweight
    assert all(p.weight.qweight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # views: no second copy
    for backend in BACKENDS:
        with use_backend(backend):
            torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-4)
    # loading weights into the parts after fusing reaches the stack
    with torch.no_grad():
        attn.v_proj.weight.scale.mul_(2)  # (one key: k cannot change the output)
    with use_backend("reference"):
        changed = run()
    assert not torch.allclose(changed, want)


def test_quantized_projections_that_cannot_stack_stay_apart():
    from thinktalk.layers.attention import Attention, fuse_qkv
    from thinktalk.layers.mlp import GatedMLP, fuse_gate_up

    attn = Attention(0, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    # fp8 blocks of 48 rows: k_proj's 32 rows end inside a scale block
    _quantize_projections(attn, ("q_proj", "k_proj", "v_proj"), lambda k: resolve_format("fp8", k, fp8_block=48))
    assert not fuse_qkv(attn) and attn.qkv_proj is None
    mlp = GatedMLP(32, 24)
    mlp.gate_proj = QuantLinear.from_linear(mlp.gate_proj, resolve_format("int4", 32, 16))
    mlp.up_proj = QuantLinear.from_linear(mlp.up_proj, resolve_format("int8", 32, 16))  # another format
    assert not fuse_gate_up(mlp) and mlp.gate_up_proj is None


def test_quantized_gate_up_fuse():
    from thinktalk.kernels import activation
    from thinktalk.layers.mlp import GatedMLP, fuse_gate_up

    torch.manual_seed(2)
    mlp = GatedMLP(64, 48)
    _quantize_projections(mlp, ("gate_proj", "up_proj", "down_proj"), lambda k: resolve_format("int4", k, 16, sym=False))
    x = torch.randn(2, 64)
    with use_backend("reference"):
        want = mlp(x)
    assert fuse_gate_up(mlp) and mlp.gate_up_proj.weight.shape == (96, 64)
    mlp.act_mul_kernel = activation.silu_mul
    for backend in BACKENDS:
        with use_backend(backend):
            torch.testing.assert_close(mlp(x), want, rtol=1e-4, atol=1e-4)


def test_quantizing_after_fusing_drops_the_float_stack():
    """quantize_model_ on a model whose q/k/v an engine already stacked (fuse_qkv): the stale
    float stack must not keep computing the projections."""
    from thinktalk.layers.attention import Attention, ContiguousKV, SequenceKV, fuse_qkv
    from thinktalk.layers.rotary import RotaryEmbedding
    from thinktalk.weights.quant import quantize_model_

    torch.manual_seed(3)
    layer = nn.Module()
    layer.self_attn = Attention(0, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert fuse_qkv(layer.self_attn) and layer.self_attn.qkv_weight is not None
    quantize_model_(layer, "int4", group_size=32, include=[], prefix="thinker.model.layers.0.")
    attn = layer.self_attn
    assert isinstance(attn.q_proj, QuantLinear) and attn.qkv_weight is None
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(3))
    x = torch.randn(3, 64)
    with use_backend("reference"):
        got = attn(x, cos, sin, ContiguousKV([SequenceKV()], [3]))
        q = attn.q_proj(x)
    assert fuse_qkv(attn) and attn.qkv_proj is not None  # fused again, now quantized
    with use_backend("reference"):
        torch.testing.assert_close(attn(x, cos, sin, ContiguousKV([SequenceKV()], [3])), got, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn.qkv_proj(x)[:, :64], q, rtol=1e-5, atol=1e-5)
