"""Quantized fused MoE (Triton, under the CPU interpreter) against its torch reference."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F

from thinktalk.kernels import quant_moe as qm
from thinktalk.kernels.quant_format import quantize, resolve_format
from thinktalk.layers.moe import SparseMoE, moe_reference, route
from thinktalk.layers.quant_linear import QuantExperts, install_quant_experts, quant_experts_fn

from thinktalk.kernels.common import interpreting  # noqa: E402

pytestmark = [
    pytest.mark.skipif(qm.triton is None, reason="triton is not installed"),
    # the kernels were decorated before this file set TRITON_INTERPRET (another test file imported
    # them first): they would silently fall back to the references, so do not pretend to test them
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]


def _inputs(n, hidden, inter, experts, top_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    router = torch.randn(experts, hidden, generator=g)
    weights, ids = route(x, router, top_k, normalize=True)
    return x, gate_up, down, weights, ids


def _q(w, method, group, sym, block, dtype=torch.float32):
    fmt = resolve_format(method, w.shape[-1], group, sym, block)
    q, s, z = quantize(w, fmt, scale_dtype=dtype if method != "fp8" else None)
    return qm.QuantTensor(q, s, z, fmt, w.shape[-1])


@pytest.mark.parametrize(
    "method,group,sym,block,dtype",
    [
        ("int4", 32, True, None, torch.float32), ("int4", 16, False, None, torch.float32),
        ("int8", None, True, None, torch.float32), ("fp8", None, True, None, torch.float32),
        ("fp8", None, True, 16, torch.float32),
        ("int4", 16, False, None, torch.bfloat16), ("int8", 32, True, None, torch.float16),
        ("fp8", None, True, 16, torch.bfloat16),
    ],
)
def test_quant_fused_moe_matches_reference(method, group, sym, block, dtype):
    x, gate_up, down, weights, ids = _inputs(9, 64, 32, 4, 2)
    a, b = _q(gate_up, method, group, sym, block, dtype), _q(down, method, group, sym, block, dtype)
    exact = qm.quant_moe_reference(x.double(), a, b, weights.double(), ids)
    got = qm.quant_fused_moe(x.to(dtype), a, b, weights.to(dtype), ids)
    ref = qm.quant_moe_reference(x.to(dtype), a, b, weights.to(dtype), ids)
    full = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    q_err = ((exact - full).norm() / full.norm()).item()
    print(f"quant_fused_moe {method} g={group} sym={sym} block={block} {dtype}: max abs err {err:.3g} "
          f"(reference in {dtype}: {ref_err:.3g}); quantization rel err vs unquantized {q_err:.4f}")
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        assert err < 1e-4
    else:
        assert err <= 2 * ref_err + 1e-2


def test_quant_fused_moe_small_tiles_decode():
    # one token (decode), BLOCK_K below the group: the K loop crosses scale groups
    x, gate_up, down, weights, ids = _inputs(1, 64, 48, 6, 3, seed=2)
    a, b = _q(gate_up, "int4", 32, False, None), _q(down, "int4", 16, True, None)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K_GU=16, BLOCK_K_D=16)
    exact = qm.quant_moe_reference(x.double(), a, b, weights.double(), ids)
    got = qm.quant_fused_moe(x, a, b, weights, ids, config=cfg)
    err = (got.double() - exact).abs().max().item()
    print(f"quant_fused_moe int4 decode, small tiles: max abs err {err:.3g}")
    assert err < 1e-4


def test_sparse_moe_with_quant_experts():
    torch.manual_seed(0)
    moe = SparseMoE(hidden_size=32, moe_intermediate_size=16, num_experts=4, top_k=2, shared_expert_intermediate_size=16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(5, 32)
    want = moe(x)
    fmt = resolve_format("int8", 32, 16)
    install_quant_experts(moe, QuantExperts.from_experts(moe.experts, fmt, resolve_format("int8", 16, 16)))
    assert moe.experts_fn is quant_experts_fn
    got = moe(x)  # Triton (interpreter), shared expert still float
    rel = ((got - want).norm() / want.norm()).item()
    print(f"SparseMoE with int8 experts: relative error {rel:.4f}")
    assert rel < 0.02
    assert torch.equal(moe.experts.gate_up_proj[1], moe.experts.gate_up_proj.dequantize()[1])
    # installing the float kernel (per instance or on the class) leaves quantized experts alone
    assert isinstance(moe, SparseMoE)
    moe.experts_fn = lambda *a, **k: (_ for _ in ()).throw(AssertionError("float kernel used"))
    assert moe.experts_fn is quant_experts_fn
    old = SparseMoE.__dict__["experts_fn"]  # the staticmethod object itself, to restore as it was
    try:
        SparseMoE.experts_fn = staticmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("float kernel used")))
        assert torch.equal(moe(x), got)
    finally:
        SparseMoE.experts_fn = old


def test_non_silu_activation_falls_back_to_reference():
    x, gate_up, down, weights, ids = _inputs(4, 32, 16, 4, 2)
    a, b = _q(gate_up, "int8", None, True, None), _q(down, "int8", None, True, None)
    got = qm.quant_fused_moe(x, a, b, weights, ids, act=F.gelu)
    assert torch.allclose(got, qm.quant_moe_reference(x, a, b, weights, ids, F.gelu))
