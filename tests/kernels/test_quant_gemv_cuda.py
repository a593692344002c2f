"""The decode GEMVs (quantized, and kernels/gemv.py's bf16 ones) compiled for the GPU (inline-PTX byte permutes, pipelined loads), at the
thinker's shapes, against the torch references; and replayed from a CUDA graph.

    pytest -q tests/kernels/test_quant_gemv_cuda.py        # on a CUDA machine, in its own process

Skipped without CUDA, and when an earlier test file of the same process set TRITON_INTERPRET=1
(the kernels would then run in the interpreter, which test_quant_gemv.py covers).
"""

import pytest
import torch

from thinktalk.kernels import gemv as fg
from thinktalk.kernels import quant_gemv as gv
from thinktalk.kernels import quant_moe_gemv as mg
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.quant_format import quantize, resolve_format
from thinktalk.kernels.quant_moe import QuantTensor, quant_moe_reference
from thinktalk.layers.moe import moe_reference, route

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(gv.triton is None or interpreting(), reason="the kernels run in the Triton interpreter here"),
]

FORMATS = [  # (method, group, sym, fp8_block)
    ("int4", 128, True, None), ("int4", 128, False, None), ("int4", 32, True, None), ("int4", None, True, None),
    ("int8", 128, True, None), ("int8", None, False, None), ("fp8", None, True, None), ("fp8", None, True, 128),
]


def _rel(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("method,group,sym,block", FORMATS)
@pytest.mark.parametrize("n,k", [(4096, 2048), (2048, 4096), (512, 2048), (1000, 1024)])
def test_gemv_cuda_matches_reference(method, group, sym, block, n, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    fmt = resolve_format(method, k, group, sym, block)
    q, s, z = quantize(w, fmt, scale_dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        exact = gv.quant_gemv_reference(x.float(), q, s, z, fmt, bias.float())
        got = gv.quant_gemv(x, q, s, z, fmt, bias)
        err = _rel(got, exact)
        print(f"gemv {method} g={group} sym={sym} block={block} {n}x{k} m={m}: rel err {err:.2e}")
        assert err < 1e-2  # bf16 output rounding is 4e-3


def test_gemv_split_k_cuda():
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(256, 4096, device="cuda", generator=g) * 0.02
    fmt = resolve_format("int4", 4096, 128)
    q, s, z = quantize(w, fmt, scale_dtype=torch.bfloat16)
    x = torch.randn(2, 4096, device="cuda", generator=g).to(torch.bfloat16)
    exact = gv.quant_gemv_reference(x.float(), q, s, z, fmt)
    for split in (2, 4, 8):
        cfg = dict(BLOCK_N=4, BLOCK_K=512, SPLIT_K=split, num_warps=1, num_stages=3)
        assert _rel(gv.quant_gemv(x, q, s, z, fmt, config=cfg), exact) < 1e-2


@pytest.mark.parametrize("method,group,sym,block", [FORMATS[0], FORMATS[1], FORMATS[4], FORMATS[6], FORMATS[7]])
def test_moe_gemv_cuda_matches_reference(method, group, sym, block):
    g = torch.Generator(device="cuda").manual_seed(2)
    e, h, i = 16, 2048, 768
    gu = torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5
    dn = torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5
    f1, f2 = resolve_format(method, h, group, sym, block), resolve_format(method, i, group, sym, block)
    a = QuantTensor(*quantize(gu, f1, scale_dtype=torch.bfloat16), f1, h)
    b = QuantTensor(*quantize(dn, f2, scale_dtype=torch.bfloat16), f2, i)
    router = torch.randn(e, h, device="cuda", generator=g)
    for n in (1, 8):
        x = torch.randn(n, h, device="cuda", generator=g)
        wts, ids = route(x, router, 8, True)
        exact = quant_moe_reference(x, a, b, wts, ids)
        got = mg.quant_moe_gemv(x.to(torch.bfloat16), a, b, wts.to(torch.bfloat16), ids)
        err = _rel(got, exact)
        print(f"moe gemv {method} g={group} sym={sym} block={block} n={n}: rel err {err:.2e}")
        assert err < 2e-2


def test_gemv_and_moe_replay_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(3)
    fmt = resolve_format("int4", 2048, 128)
    q, s, z = quantize(torch.randn(4096, 2048, device="cuda", generator=g) * 0.02, fmt, scale_dtype=torch.bfloat16)
    e, h, i = 8, 2048, 768
    f1, f2 = resolve_format("int4", h, 128), resolve_format("int4", i, 128)
    a = QuantTensor(*quantize(torch.randn(e, 2 * i, h, device="cuda", generator=g) * 0.02, f1,
                              scale_dtype=torch.bfloat16), f1, h)
    b = QuantTensor(*quantize(torch.randn(e, h, i, device="cuda", generator=g) * 0.03, f2,
                              scale_dtype=torch.bfloat16), f2, i)
    x = torch.zeros(1, 2048, device="cuda", dtype=torch.bfloat16)
    wts = torch.zeros(1, 4, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(1, 4, device="cuda", dtype=torch.long)

    def step():
        return gv.quant_gemv(x, q, s, z, fmt), mg.quant_moe_gemv(x, a, b, wts, ids)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_dense, out_moe = step()
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(10 + seed)
        x.copy_(torch.randn(1, 2048, device="cuda", generator=gen))
        ids.copy_(torch.randperm(e, device="cuda", generator=gen)[:4][None])
        wts.copy_(torch.softmax(torch.randn(1, 4, device="cuda", generator=gen), -1))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out_dense, gv.quant_gemv_reference(x.float(), q, s, z, fmt)) < 1e-2
        assert _rel(out_moe, quant_moe_reference(x.float(), a, b, wts.float(), ids)) < 2e-2


@pytest.mark.parametrize("n,k", [(5120, 2048), (2048, 4096), (128, 2048), (1000, 1024)])
def test_bf16_gemv_cuda_matches_linear(n, k):
    """kernels/gemv.py (unquantized weights) at the thinker's shapes: qkv, o_proj, router (split-K)."""
    g = torch.Generator(device="cuda").manual_seed(4)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        for b in (None, bias):
            exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
            err = _rel(fg.gemv(x, w, b), exact)
            print(f"bf16 gemv {n}x{k} m={m} bias={b is not None}: rel err {err:.2e}")
            assert err < 1e-2  # bf16 output rounding is 4e-3


def test_bf16_moe_gemv_cuda_matches_reference_and_replays():
    g = torch.Generator(device="cuda").manual_seed(5)
    e, h, i = 16, 2048, 768
    gu = (torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    dn = (torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5).to(torch.bfloat16)
    router = torch.randn(e, h, device="cuda", generator=g)
    for n in (1, 8):
        x = torch.randn(n, h, device="cuda", generator=g)
        wts, ids = route(x, router, 8, True)
        exact = moe_reference(x, gu.float(), dn.float(), wts, ids)
        err = _rel(fg.moe_gemv(x.to(torch.bfloat16), gu, dn, wts.to(torch.bfloat16), ids), exact)
        print(f"bf16 moe gemv n={n}: rel err {err:.2e}")
        assert err < 2e-2
    x = torch.zeros(2, h, device="cuda", dtype=torch.bfloat16)
    wts = torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(2, 8, device="cuda", dtype=torch.long)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fg.moe_gemv(x, gu, dn, wts, ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fg.moe_gemv(x, gu, dn, wts, ids)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(20 + seed)
        x.copy_(torch.randn(2, h, device="cuda", generator=gen))
        ids.copy_(torch.stack([torch.randperm(e, device="cuda", generator=gen)[:8] for _ in range(2)]))
        wts.copy_(torch.softmax(torch.randn(2, 8, device="cuda", generator=gen), -1))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, moe_reference(x.float(), gu.float(), dn.float(), wts.float(), ids)) < 2e-2
