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

pytestmark = [
    pytest.mark.skipif(quant_gemv.triton is None, reason="triton is not installed"),
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]


def _spy(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(a[0].shape[0])
        return fn(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


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
