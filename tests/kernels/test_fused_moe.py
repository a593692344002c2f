"""The Triton fused MoE against the torch reference, run by Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F

from thinktalk.kernels import fused_moe as fm
from thinktalk.layers.moe import SparseMoE, moe_reference, route

pytestmark = pytest.mark.skipif(fm.triton is None, reason="triton is not installed")


def _inputs(n, hidden, inter, experts, top_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    router = torch.randn(experts, hidden, generator=g)
    weights, ids = route(x, router, top_k, normalize=True)
    return [t.to(dtype) for t in (x, gate_up, down, weights)] + [ids]


def _errors(n, hidden, inter, experts, top_k, dtype, config=None, scan_pairs=False):
    x, gate_up, down, weights, ids = _inputs(n, hidden, inter, experts, top_k, dtype)
    exact = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    got = fm.fused_moe(x, gate_up, down, weights, ids, F.silu, config=config, scan_pairs=scan_pairs)
    ref = moe_reference(x, gate_up, down, weights, ids)  # the reference in the same dtype
    assert got.dtype == dtype and got.shape == x.shape
    return (got.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,hidden,inter,experts,top_k",
    [(1, 64, 32, 8, 2), (13, 64, 32, 8, 2), (40, 48, 40, 6, 3)],  # decode, prefill, dims off the tiles
)
def test_fused_moe_matches_reference(dtype, n, hidden, inter, experts, top_k):
    err, ref_err = _errors(n, hidden, inter, experts, top_k, dtype)
    print(f"fused_moe {dtype} n={n}: max abs err {err:.3g} (reference in {dtype}: {ref_err:.3g})")
    if dtype == torch.float32:
        assert err < 1e-5
    else:  # fp32 accumulation: no worse than the reference computed in the low precision (the
        # interpreter truncates 16-bit stores where the GPU rounds; the kernels store twice)
        assert err <= 3 * ref_err + 1e-3


def test_fused_moe_small_tiles_many_blocks():
    # BLOCK_M 16 with several blocks per expert, BLOCK_N/BLOCK_K below the dims (k and n loops)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    err, _ = _errors(50, 64, 48, 4, 2, torch.float32, config=cfg)
    print(f"fused_moe fp32 small tiles: max abs err {err:.3g}")
    assert err < 1e-5


def test_fused_moe_own_down_tiles():
    # the down projection with tiles of its own (N and K tiles unlike gate_up's)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_N_D=32, BLOCK_K_D=16, num_warps_d=2, num_stages_d=2)
    err, _ = _errors(50, 64, 48, 4, 2, torch.float32, config=cfg)
    assert err < 1e-5


@pytest.mark.parametrize(
    "n,experts,top_k,config,most_chunks",
    [
        (9, 16, 2, None, 1),  # decode tiles (BLOCK_M 16): 18 pairs, a few an expert, some experts unused
        (40, 8, 3, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), 2),  # experts with over 16 rows: 2 chunks
        (30, 4, 2, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, BLOCK_N_D=16, BLOCK_K_D=32), 2),  # own down tiles
    ],
)
def test_fused_moe_scanning_the_pairs_matches_the_sorted_path(n, experts, top_k, config, most_chunks):
    """scan_pairs: each expert's programs find their rows in the top-k ids (in pair order, BLOCK_M
    at a time) instead of moe_align's sort; the same products, so the same result to the bit as
    the sorted path, and the reference's within fp32 rounding."""
    x, gate_up, down, weights, ids = _inputs(n, 64, 48, experts, top_k, torch.float32, seed=3)
    assert -(-torch.bincount(ids.flatten()).max().item() // 16) == most_chunks
    scanned = fm.fused_moe(x, gate_up, down, weights, ids, F.silu, config=config, scan_pairs=True)
    sorted_ = fm.fused_moe(x, gate_up, down, weights, ids, F.silu, config=config)
    ref = moe_reference(x, gate_up, down, weights, ids)
    assert torch.equal(scanned, sorted_)
    assert (scanned - ref).abs().max().item() < 1e-5


def test_fused_moe_scan_leaves_prefill_and_pair_blocks_alone(monkeypatch):
    """scan_pairs only where it fits: not for 1-2 tokens (a block a pair), nor past SCAN_PAIRS_MAX
    pairs (moe_align runs there)."""
    calls = []
    real = fm.moe_align
    monkeypatch.setattr(fm, "moe_align", lambda *a: calls.append(a) or real(*a))
    for n, expect_align in [(1, False), (9, False), (40, True)]:
        monkeypatch.setattr(fm, "SCAN_PAIRS_MAX", 64)
        calls.clear()
        x, gate_up, down, weights, ids = _inputs(n, 32, 16, 16, 2, torch.float32)
        got = fm.fused_moe(x, gate_up, down, weights, ids, F.silu, scan_pairs=True)
        assert (got - moe_reference(x, gate_up, down, weights, ids)).abs().max().item() < 1e-5
        assert bool(calls) == expect_align, n


@pytest.mark.parametrize("align", [fm.moe_align, fm.moe_align_torch], ids=["triton", "torch"])
def test_moe_align_covers_every_pair_once(align):
    ids = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3], [0, 1]])
    sorted_ids, expert_ids = align(ids, num_experts=5, block_m=4)
    nk = ids.numel()
    real = sorted_ids[sorted_ids < nk]
    assert sorted(real.tolist()) == list(range(nk))
    flat = ids.flatten()
    blocks = sorted_ids.view(-1, 4)
    for block, expert in zip(blocks, expert_ids.tolist()):
        rows = block[block < nk]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows.long()] == expert).all()
    assert (expert_ids >= 0).sum() == 4  # experts 0, 1, 2, 3 each fit one block; expert 4 unused


@pytest.mark.parametrize("n,experts,top_k,block_m", [
    (1, 8, 2, 16), (64, 128, 8, 16), (128, 128, 8, 16),  # one program (up to ALIGN_ONE_PROGRAM pairs)
    (129, 128, 8, 16), (300, 128, 8, 16), (700, 16, 4, 64),  # count / offsets / scatter kernels
])
def test_triton_align_equals_torch_align(n, experts, top_k, block_m):
    g = torch.Generator().manual_seed(n)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(n)])
    got_rows, got_experts = fm.moe_align(ids, experts, block_m)
    ref_rows, ref_experts = fm.moe_align_torch(ids, experts, block_m)
    assert torch.equal(got_experts, ref_experts)
    # within a block the Triton version places an expert's pairs in any order
    assert torch.equal(got_rows.view(-1, block_m).sort(1).values, ref_rows.view(-1, block_m).sort(1).values)


def test_sparse_moe_swaps_in_fused_kernel():
    torch.manual_seed(0)
    moe = SparseMoE(hidden_size=32, moe_intermediate_size=16, num_experts=4, top_k=2, shared_expert_intermediate_size=16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(9, 32)
    ref = moe(x)
    moe.experts_fn = fm.fused_moe
    got = moe(x)
    err = (got - ref).abs().max().item()
    print(f"SparseMoE with fused_moe: max abs err {err:.3g}")
    assert err < 1e-5


def test_other_activation_falls_back_to_reference():
    x, gate_up, down, weights, ids = _inputs(5, 32, 16, 4, 2, torch.float32)
    got = fm.fused_moe(x, gate_up, down, weights, ids, F.gelu)
    torch.testing.assert_close(got, moe_reference(x, gate_up, down, weights, ids, F.gelu))
