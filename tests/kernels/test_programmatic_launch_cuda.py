"""Programmatic dependent launch on the GPU: chains of dependent kernels launched so that each may
be placed before the one it reads from has finished give bit-for-bit the results of plain launches,
eagerly and replayed from a CUDA graph; and an engine's greedy tokens are the same with it on and
off. (Off Hopper the launch arguments are off and both sides are plain launches.)

    pytest -q tests/kernels/test_programmatic_launch_cuda.py   # on a CUDA machine, in its own process
"""

import pytest
import torch
from tiny_engine import greedy_tokens, tiny_model

from thinktalk.kernels import common, gemv
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.rms_norm import add_rms_norm
from thinktalk.kernels.router import softmax_topk

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(common.triton is None or interpreting(), reason="the kernels run in the Triton interpreter here"),
]

H, I, E = 2048, 768, 64


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    common.set_programmatic_launch(False)


def _weights(layers: int):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    return [dict(norm=1 + rand(H, scale=0.1), up=rand(2 * H, H, scale=H**-0.5), down=rand(H, 2 * H, scale=(2 * H) ** -0.5),
                 router=rand(E, H, scale=H**-0.5), gu=rand(E, 2 * I, H, scale=H**-0.5), dn=rand(E, H, I, scale=I**-0.5))
            for _ in range(layers)]


def _chain(x: torch.Tensor, layers) -> torch.Tensor:
    """A decode layer's kernels, each reading the one before: norm (+ residual), two dense GEMVs
    (the second split over K), router GEMV, softmax-top-k, the two MoE GEMVs; torch adds between."""
    residual = torch.zeros_like(x)
    for w in layers:
        h, residual = add_rms_norm(x, residual, w["norm"], 1e-6)
        dense = gemv.gemv(gemv.gemv(h, w["up"]), w["down"])
        weights, ids = softmax_topk(gemv.gemv(h, w["router"]), 8, True)
        x = dense + gemv.experts(h, w["gu"], w["dn"], weights, ids)
    return x + residual


def test_pdl_on_where_hopper():
    common.set_programmatic_launch(True)
    assert common.pdl_args(torch.device("cuda")).get("launch_pdl", False) == (torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.parametrize("rows", [1, 4])
def test_chain_equals_plain_launches_eager_and_graphed(rows):
    layers = _weights(6)
    inputs = [torch.randn(rows, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(s)).to(torch.bfloat16)
              for s in range(12)]
    common.set_programmatic_launch(False)
    expected = [_chain(x, layers) for x in inputs]
    common.set_programmatic_launch(True)
    for x, want in zip(inputs, expected):
        assert torch.equal(_chain(x, layers), want)
    static = inputs[0].clone()
    _chain(static, layers)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static, layers)
    for _ in range(3):  # replays back to back: each replay's first kernel follows the last one's
        for x, want in zip(inputs, expected):
            static.copy_(x)
            graph.replay()
            assert torch.equal(out, want)
    torch.cuda.synchronize()


def test_engine_tokens_equal_with_and_without():
    from thinktalk.engine import EngineConfig

    model = tiny_model(torch.bfloat16)
    requests = [(5, 40), (19, 25), (33, 40), (7, 12), (26, 33)]

    def run(pdl: bool):
        return greedy_tokens(model, EngineConfig(programmatic_launch=pdl, num_kv_blocks=256, max_num_seqs=8), requests)

    assert run(True) == run(False)
