"""The decode GEMVs for unquantized weights (Triton, under the CPU interpreter) against F.linear and
the MoE reference; and the dispatch the engine installs (GEMVs for a few rows, the rest unchanged).

Shapes are small and off the tiles on purpose: N off the rows per program (masked rows), K off
the step (masked columns), explicit split-K tiles.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F
from moe_synth import random_moe

from thinktalk.kernels import gemv as gm
from thinktalk.kernels.common import interpreting
from thinktalk.layers.moe import moe_reference

pytestmark = [
    pytest.mark.skipif(gm.triton is None, reason="triton is not installed"),
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]


def _err(got, exact):
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("n,k", [(40, 64), (24, 96), (16, 40)])  # K = 40: one masked step
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_matches_linear_fp32(n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    bias = torch.randn(n, generator=g)
    for b in (None, bias):
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        got = gm.gemv(x, w, b)
        assert got.dtype == x.dtype and got.shape == (m, n)
        assert _err(got, exact) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_half_precision_within_output_rounding(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 128, generator=g).to(dtype)
    w = (torch.randn(48, 128, generator=g) * 128**-0.5).to(dtype)
    exact = F.linear(x.double(), w.double())
    got = gm.gemv(x, w)
    ref = F.linear(x, w)  # the same product in the dtype (torch's order of sums)
    assert got.dtype == dtype
    assert _err(got, exact) <= 2 * _err(ref, exact) + 1e-3


def test_gemv_split_k_and_explicit_tiles():
    """Explicit tiles (split-K with a bias and its reduction kernel, two rows per program, no
    split) give the same product as the default."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 512, generator=g)
    w = torch.randn(8, 512, generator=g) * 0.05
    bias = torch.randn(8, generator=g)
    exact = F.linear(x.double(), w.double(), bias.double())
    for cfg in (None, dict(BLOCK_N=2, BLOCK_K=32, SPLIT_K=4, num_warps=1, num_stages=2),
                dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, num_warps=2, num_stages=3)):
        assert _err(gm.gemv(x, w, bias, config=cfg), exact) < 1e-5


def test_default_tiles_are_the_measured_ones():
    """Thinker decode shapes (bf16) get the tiles the H100 sweep picked (gemv.py's table): 4 rows
    and 256 columns a program (router: 2 rows), 6 stages where there are at most 512 programs;
    the MoE's gate_up 8 rows of 128 columns, its down 4 rows of 256."""
    pick = {(n, k): gm.gemv_config(1, n, k, 2) for n, k in ((5120, 2048), (2048, 4096), (128, 2048))}
    assert pick[(5120, 2048)] == dict(BLOCK_N=4, BLOCK_K=256, SPLIT_K=1, num_warps=2, num_stages=4)
    assert pick[(2048, 4096)] == dict(BLOCK_N=4, BLOCK_K=256, SPLIT_K=1, num_warps=2, num_stages=6)
    assert pick[(128, 2048)] == dict(BLOCK_N=2, BLOCK_K=256, SPLIT_K=1, num_warps=2, num_stages=6)
    assert gm.moe_gemv_config(1, 8, 2048, 768, 2) == dict(
        BLOCK_N_GU=8, BLOCK_K_GU=128, num_warps_gu=2, BLOCK_N_D=4, BLOCK_K_D=256, num_warps_d=2, num_stages=4)
    assert gm.gemv_config(1, 151936, 2048, 2)["BLOCK_K"] == 256
    assert gm.gemv_config(1, 24, 40, 4)["BLOCK_K"] == 64  # ragged K: one masked step




@pytest.mark.parametrize("n,top_k", [(1, 3), (3, 2), (5, 4)])
def test_moe_gemv_matches_reference(n, top_k):
    x, gate_up, down, weights, ids = random_moe(n, 64, 40, 6, top_k, seed=n)  # I = 40: down's K step masked
    exact = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    got = gm.moe_gemv(x, gate_up, down, weights, ids)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert _err(got, exact) < 1e-5


def test_moe_gemv_bf16_and_shared_experts():
    """Tokens picking the same experts, bf16 weights: within twice the reference's own rounding."""
    x, gate_up, down, weights, ids = random_moe(4, 64, 32, 4, 2, seed=7)
    ids = torch.tensor([[0, 1], [1, 0], [2, 1], [1, 3]])
    exact = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    bf = [t.to(torch.bfloat16) for t in (x, gate_up, down, weights)]
    got = gm.moe_gemv(bf[0], bf[1], bf[2], bf[3], ids)
    ref = moe_reference(bf[0], bf[1], bf[2], bf[3], ids)
    assert got.dtype == torch.bfloat16
    assert _err(got, exact) <= 2 * _err(ref, exact) + 1e-3


def test_moe_gemv_explicit_tiles():
    x, gate_up, down, weights, ids = random_moe(2, 64, 48, 5, 2, seed=9)
    exact = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    for cfg in (dict(BLOCK_N_GU=2, BLOCK_K_GU=64, num_warps_gu=1, BLOCK_N_D=16, BLOCK_K_D=16, num_warps_d=2, num_stages=1),
                dict(BLOCK_N_GU=16, BLOCK_K_GU=32, num_warps_gu=4, BLOCK_N_D=4, BLOCK_K_D=64, num_warps_d=1, num_stages=3)):
        assert _err(gm.moe_gemv(x, gate_up, down, weights, ids, config=cfg), exact) < 1e-5


def test_dispatch_gemv_for_few_rows_only(monkeypatch):
    """`linear` / `experts` take the GEMVs up to GEMV_MAX_M rows / GEMV_MAX_TOKENS tokens and
    F.linear / the grouped fused MoE beyond (counted by wrapping the kernels they call)."""
    calls = []
    real_gemv, real_moe_gemv, real_fused = gm.gemv, gm.moe_gemv, gm.fused_moe
    monkeypatch.setattr(gm, "gemv", lambda *a, **k: calls.append("gemv") or real_gemv(*a, **k))
    monkeypatch.setattr(gm, "moe_gemv", lambda *a, **k: calls.append("moe_gemv") or real_moe_gemv(*a, **k))
    monkeypatch.setattr(gm, "fused_moe", lambda *a, **k: calls.append("fused_moe") or real_fused(*a, **k))
    g = torch.Generator().manual_seed(11)
    narrow = torch.randn(24, 32, generator=g)
    wide = torch.randn(gm.NARROW_N + 8, 32, generator=g)
    for w, rows, expect in ((narrow, 1, "gemv"), (narrow, gm.GEMV_MAX_M, "gemv"), (narrow, gm.GEMV_MAX_M + 1, None),
                            (wide, gm.GEMV_MAX_ROWS_WIDE, "gemv"), (wide, gm.GEMV_MAX_ROWS_WIDE + 1, None)):
        calls.clear()
        x = torch.randn(1, rows, 32, generator=g)  # leading dims kept
        got = gm.linear(x, w)
        assert got.shape == (1, rows, w.shape[0])
        assert _err(got, F.linear(x.double(), w.double())) < 1e-4
        assert calls == ([expect] if expect else [])
    x, gate_up, down, weights, ids = random_moe(gm.GEMV_MAX_TOKENS + 1, 32, 16, 4, 2, seed=12)
    for n, expect in ((2, "moe_gemv"), (gm.GEMV_MAX_TOKENS + 1, "fused_moe")):
        calls.clear()
        got = gm.experts(x[:n], gate_up, down, weights[:n], ids[:n])
        exact = moe_reference(x[:n].double(), gate_up.double(), down.double(), weights[:n].double(), ids[:n])
        assert _err(got, exact) < 1e-4
        assert calls == [expect]


def test_engine_installs_the_gemvs_or_not():
    """use_triton_kernels puts kernels/gemv.py's dispatchers into the modules (decode_gemv=True) or
    F.linear / the grouped fused MoE (False, also undoing an earlier True); outputs match the
    modules' torch reference for a few rows either way."""
    from torch import nn

    from thinktalk.engine import use_triton_kernels
    from thinktalk.kernels.fused_moe import fused_moe
    from thinktalk.layers.mlp import GatedMLP
    from thinktalk.layers.moe import SparseMoE

    torch.manual_seed(0)
    model = nn.ModuleList([SparseMoE(32, 16, 4, 2, shared_expert_intermediate_size=16), GatedMLP(32, 48)])
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 32)
    ref = [m(x) for m in model]
    for on in (True, False):
        use_triton_kernels(model, moe=True, layers=True, decode_gemv=on)
        moe, mlp = model
        assert moe.experts_fn is (gm.experts if on else fused_moe)
        assert moe.linear_fn is mlp.linear_fn is (gm.linear if on else F.linear)
        for m, r in zip(model, ref):
            assert _err(m(x), r.double()) < 1e-5
