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


def _errors(n, hidden, inter, experts, top_k, dtype, config=None):
    x, gate_up, down, weights, ids = _inputs(n, hidden, inter, experts, top_k, dtype)
    exact = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    got = fm.fused_moe(x, gate_up, down, weights, ids, F.silu, config=config)
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


@pytest.mark.parametrize("n,blocks,warps", [(64, 16, 1), (64, 64, 8), (100, 32, 4)])
def test_one_program_align_with_other_tiles(monkeypatch, n, blocks, warps):
    """The tiles tune_fused_moe.py --align sweeps give the same sort (BLOCKS changes the block loop)."""
    tiles = dict(BLOCKS=blocks, ROWS=1024, num_warps=warps)
    monkeypatch.setattr(fm, "ALIGN_ONE_PROGRAM_TILES", {fm.ALIGN_ONE_PROGRAM: tiles})
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(128, generator=g)[:8] for _ in range(n)])
    got_rows, got_experts = fm.moe_align(ids, 128, 16)
    ref_rows, ref_experts = fm.moe_align_torch(ids, 128, 16)
    assert torch.equal(got_experts, ref_experts)
    assert torch.equal(got_rows.view(-1, 16).sort(1).values, ref_rows.view(-1, 16).sort(1).values)


def test_one_program_align_tiles_by_pairs():
    assert fm.align_one_program_tiles(8)["BLOCKS"] == 32 and fm.align_one_program_tiles(512)["num_warps"] == 4
    assert fm.align_one_program_tiles(513)["num_warps"] == 16
    assert fm.align_one_program_tiles(fm.ALIGN_ONE_PROGRAM)["BLOCKS"] == 64
    with pytest.raises(ValueError, match="one-program"):
        fm.align_one_program_tiles(fm.ALIGN_ONE_PROGRAM + 1)


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
