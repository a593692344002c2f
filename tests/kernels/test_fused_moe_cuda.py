"""The fused MoE's alignment and grouped GEMMs compiled for the GPU (the one-program alignment's
barrier only matters there), against the torch references.

    pytest -q tests/kernels/test_fused_moe_cuda.py        # on a CUDA machine, in its own process
"""

import pytest
import torch

from thinktalk.kernels import fused_moe as fm
from thinktalk.kernels.common import interpreting
from thinktalk.layers.moe import moe_reference, route

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(fm.triton is None or interpreting(), reason="the kernels run in the Triton interpreter here"),
]


@pytest.mark.parametrize("n", [2, 9, 64, 128, 129, 512])
def test_align_cuda_equals_torch(n):
    g = torch.Generator(device="cuda").manual_seed(n)
    ids = torch.stack([torch.randperm(128, device="cuda", generator=g)[:8] for _ in range(n)])
    got_rows, got_experts = fm.moe_align(ids, 128, 16)
    ref_rows, ref_experts = fm.moe_align_torch(ids, 128, 16)
    assert torch.equal(got_experts, ref_experts)
    # an expert's pairs land in any order across its blocks (atomic cursors): compare per expert
    for e in range(128):
        rows = lambda r, x: r.view(-1, 16)[x == e].flatten().sort().values  # noqa: E731
        assert torch.equal(rows(got_rows, got_experts), rows(ref_rows, ref_experts))


@pytest.mark.parametrize("n", [16, 64, 300])
def test_fused_moe_cuda_matches_reference(n):
    g = torch.Generator(device="cuda").manual_seed(7)
    e, h, i = 32, 2048, 768
    gu = (torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    dn = (torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5).to(torch.bfloat16)
    x = torch.randn(n, h, device="cuda", generator=g)
    wts, ids = route(x, torch.randn(e, h, device="cuda", generator=g), 8, True)
    exact = moe_reference(x, gu.float(), dn.float(), wts, ids)
    got = fm.fused_moe(x.to(torch.bfloat16), gu, dn, wts.to(torch.bfloat16), ids)
    err = ((got.float() - exact).abs().max() / exact.abs().max()).item()
    print(f"fused_moe n={n}: rel err {err:.2e}")
    assert err < 2e-2
