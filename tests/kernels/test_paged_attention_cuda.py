"""The paged decode kernel's split merge done by each group's last split program (merge_tickets)
on the GPU, at the thinker's shapes: the merge kernel's result up to the order of its sums,
eagerly and replayed from a CUDA graph many times (a ticket left non-zero would make every later
merge wrong), with programmatic launch on and off.

    pytest -q tests/kernels/test_paged_attention_cuda.py   # on a CUDA machine, in its own process
"""

import pytest
import torch

from thinktalk.kernels import common
from thinktalk.kernels import paged_attention as pa
from thinktalk.kernels.common import interpreting

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(common.triton is None or interpreting(), reason="the kernels run in the Triton interpreter here"),
]

SCALE = 128**-0.5


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    common.set_programmatic_launch(False)


def _inputs(batch: int, lens: list[int], seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = max(-(-n // 16) for n in lens)
    blocks = batch * width
    kc = torch.randn(blocks + 1, 16, 4, 128, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(blocks + 1, 16, 4, 128, device="cuda", generator=g).to(torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda", generator=g).int().view(batch, width)
    q = torch.randn(batch, 32, 128, device="cuda", generator=g).to(torch.bfloat16)
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("lens,splits", [([700], 32), ([1, 64, 65, 3000], 17), ([513] * 8, 8)])
def test_last_split_merges_as_the_merge_kernel(lens, splits, pdl):
    common.set_programmatic_launch(pdl)
    q, kc, vc, tables, ctx = _inputs(len(lens), lens)
    tickets = pa.merge_tickets("cuda")
    by_kernel = pa.paged_attention(q, kc, vc, tables, ctx, SCALE, num_splits=splits)
    eager = pa.paged_attention(q, kc, vc, tables, ctx, SCALE, num_splits=splits, merge_tickets=tickets)
    exact = pa.paged_attention_reference(q.float(), kc.float(), vc.float(), tables, ctx, SCALE)
    err_kernel = (by_kernel.float() - exact).abs().max().item()
    err_last = (eager.float() - exact).abs().max().item()
    print(f"lens={lens} splits={splits}: max abs err merge kernel {err_kernel:.3e}, last split {err_last:.3e}")
    # the same terms, summed in another order (then each rounded to bf16 once)
    assert torch.allclose(eager.float(), by_kernel.float(), rtol=2**-7, atol=2**-9)
    assert err_last <= 2 * err_kernel + 2**-9
    assert torch.count_nonzero(tickets) == 0

    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out.copy_(pa.paged_attention(q, kc, vc, tables, ctx, SCALE, num_splits=splits, merge_tickets=tickets))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(4):  # four launches in a row reusing the tickets, as four layers would
            out.copy_(pa.paged_attention(q, kc, vc, tables, ctx, SCALE, num_splits=splits, merge_tickets=tickets))
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)  # deterministic: the merge's order is fixed
    assert torch.count_nonzero(tickets) == 0
