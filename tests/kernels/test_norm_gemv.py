"""The residual add + RMSNorm folded into the decode GEMV (Triton, under the CPU interpreter)
against the unfused reference (add_rms_norm_reference, then F.linear); and add_norm_linear's
routing of every other case to the unfused kernels.

Shapes are small and off the tiles on purpose: N off the rows per program, K off the step.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from thinktalk.kernels import norm_gemv as ng
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.rms_norm import rms_norm_reference

pytestmark = [
    pytest.mark.skipif(ng.triton is None, reason="triton is not installed"),
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]

EPS = 1e-6


def _inputs(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    residual = (torch.randn(m, k, generator=g) * 5).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(k, generator=g)).to(dtype)
    weight = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    return x, residual, norm_weight, weight


def _exact(x, residual, norm_weight, weight):
    """The fused math in float64 with h = x + residual rounded to x's dtype."""
    return _exact_from((residual.float() + x.float()).to(x.dtype).double(), norm_weight, weight)


def _exact_from(h, norm_weight, weight):
    """W (g * h) * rsqrt(mean(h^2) + eps) in float64."""
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (h * norm_weight.double() * scale) @ weight.double().T


@pytest.mark.parametrize("n,k", [(40, 64), (24, 96), (20, 40)])  # K = 40: one masked step; N = 20 off the rows
@pytest.mark.parametrize("m", [1, 2])
def test_fused_matches_the_unfused_reference_fp32(n, k, m):
    x, residual, norm_weight, weight = _inputs(m, n, k, torch.float32, n * k + m)
    for cfg in (None, dict(BLOCK_N=8, BLOCK_K=32, num_warps=1, num_stages=2)):
        y, total = ng.add_norm_gemv(x, residual, norm_weight, EPS, weight, config=cfg)
        ref_y, ref_total = ng.add_norm_gemv_reference(x, residual, norm_weight, EPS, weight)
        assert torch.equal(total, ref_total)  # the residual stream is exact
        assert (y.double() - _exact(x, residual, norm_weight, weight)).abs().max() < 1e-4
        assert torch.allclose(y, ref_y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 2])
def test_fused_bf16_is_the_exact_math_up_to_the_output_rounding(m):
    """bf16: h is rounded as the unfused kernel rounds it; given h, the outputs are the exact math
    rounded once (the unfused path rounds the normed row twice before its product)."""
    n, k = 48, 256
    x, residual, norm_weight, weight = _inputs(m, n, k, torch.bfloat16, 7 + m)
    y, total = ng.add_norm_gemv(x, residual, norm_weight, EPS, weight, config=dict(BLOCK_N=4, BLOCK_K=64, num_stages=2))
    ref_y, ref_total = ng.add_norm_gemv_reference(x, residual, norm_weight, EPS, weight)
    # one rounded add; the interpreter's float -> bf16 cast truncates (the GPU's rounds to nearest,
    # as torch), so here h may be one unit in the last place off
    assert torch.allclose(total, ref_total, rtol=2**-7, atol=0)
    exact = _exact_from(total.double(), norm_weight, weight)
    scale = exact.abs().max().item()
    assert ((y.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-4 * scale).all()  # one rounding (truncated here)
    assert torch.allclose(y.float(), ref_y.float(), rtol=0.05, atol=0.02 * scale)


def test_add_norm_linear_routes_by_rows_and_support():
    """The GEMV for the rows gemv.linear gives one (8 of a narrow weight, 2 of a wide one); the
    unfused kernels (same results as the reference) for more rows, or a weight of another dtype."""
    n, k = 24, 64
    for m in (1, 2, 3, 9):
        x, residual, norm_weight, weight = _inputs(m, n, k, torch.float32, m)
        y, total = ng.add_norm_linear(x, residual, norm_weight, EPS, weight)
        ref_y, ref_total = ng.add_norm_gemv_reference(x, residual, norm_weight, EPS, weight)
        assert torch.equal(total, ref_total) and torch.allclose(y, ref_y, atol=1e-4, rtol=1e-4), m
    x, residual, norm_weight, weight = _inputs(1, n, k, torch.float32, 0)
    assert not ng.norm_gemv_supported(x, residual, norm_weight, weight.double())
    assert not ng.norm_gemv_supported(x[:, :32], residual, norm_weight, weight)
    with pytest.raises(ValueError, match="add_norm_linear routes the rest"):
        ng.add_norm_gemv(torch.cat([x] * 9), torch.cat([residual] * 9), norm_weight, EPS, weight)
    wide = torch.zeros(1025, 64)  # past NARROW_N: 2 rows at most, as gemv.linear
    assert ng.norm_gemv_supported(torch.cat([x] * 2), torch.cat([residual] * 2), norm_weight, wide)
    assert not ng.norm_gemv_supported(torch.cat([x] * 3), torch.cat([residual] * 3), norm_weight, wide)


def test_reference_is_the_decoder_layers_unfused_math():
    x, residual, norm_weight, weight = _inputs(2, 16, 32, torch.float32, 3)
    y, total = ng.add_norm_gemv_reference(x, residual, norm_weight, EPS, weight)
    assert torch.equal(total, residual + x)
    assert torch.equal(y, torch.nn.functional.linear(rms_norm_reference(residual + x, norm_weight, EPS), weight))


# -- the post-attention norm folded into the MoE ----------------------------------------------------
def _moe(dtype, seed, shared=0):
    from thinktalk.layers.moe import SparseMoE

    torch.manual_seed(seed)
    moe = SparseMoE(64, 24, 8, 3, shared_expert_intermediate_size=shared)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return moe.to(dtype)


@pytest.mark.parametrize("route_in_gate_up", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_norm_in_the_moe_matches_the_unfused_reference_fp32(tokens, route_in_gate_up):
    """The routing picked by each gate-up program from the logits (route_in_gate_up, the engine's
    default), or by the router's own top-k kernel first: the unfused reference's result either way."""
    moe = _moe(torch.float32, tokens)
    x, residual, norm_weight, _ = _inputs(tokens, 8, 64, torch.float32, 100 + tokens)
    got = ng.add_norm_moe(x, residual, norm_weight, EPS, moe, route_in_gate_up=route_in_gate_up)
    assert got is not None
    out, total = got
    ref_out, ref_total = ng.add_norm_moe_reference(x, residual, norm_weight, EPS, moe)
    assert torch.equal(total, ref_total)
    assert (out - ref_out).abs().max() < 1e-4 * max(1.0, ref_out.abs().max().item())


def test_norm_in_the_moe_bf16_within_its_rounding():
    moe = _moe(torch.bfloat16, 1)
    x, residual, norm_weight, _ = _inputs(2, 8, 64, torch.bfloat16, 5)
    out, total = ng.add_norm_moe(x, residual, norm_weight, EPS, moe)
    ref_out, ref_total = ng.add_norm_moe_reference(x, residual, norm_weight, EPS, moe)
    assert torch.allclose(total, ref_total, rtol=2**-7, atol=0)  # the interpreter truncates (see above)
    scale = ref_out.float().abs().max().item()
    assert torch.allclose(out.float(), ref_out.float(), rtol=0.05, atol=0.03 * scale)


def test_norm_in_the_moe_declines_what_it_does_not_cover():
    """A shared expert, more tokens than the MoE GEMVs take, experts of another dtype: None (the
    layer then runs the norm and the MoE as before)."""
    x, residual, norm_weight, _ = _inputs(1, 8, 64, torch.float32, 0)
    assert ng.add_norm_moe(x, residual, norm_weight, EPS, _moe(torch.float32, 0, shared=16)) is None
    nine = _inputs(9, 8, 64, torch.float32, 0)
    assert ng.add_norm_moe(nine[0], nine[1], nine[2], EPS, _moe(torch.float32, 0)) is None
    assert ng.add_norm_moe(x, residual, norm_weight, EPS, _moe(torch.float64, 0)) is None
