"""The decode MoE for quantized experts (Triton GEMVs, under the CPU interpreter) against its reference.

A few tokens, each with top-k experts (ids straight from the router, no sort), intermediate size
off the K step (masked columns in down), hidden off the rows per program (masked rows).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F
from moe_synth import random_moe

from thinktalk.kernels import quant_moe_gemv as mg
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.quant_format import quantize, resolve_format
from thinktalk.kernels.quant_moe import QuantTensor, quant_moe_reference
from thinktalk.layers.moe import moe_reference

pytestmark = [
    pytest.mark.skipif(mg.triton is None, reason="triton is not installed"),
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]




def _q(w, method, group, sym, block, dtype=torch.float32):
    fmt = resolve_format(method, w.shape[-1], group, sym, block)
    q, s, z = quantize(w, fmt, scale_dtype=dtype if method != "fp8" else None)
    return QuantTensor(q, s, z, fmt, w.shape[-1])


@pytest.mark.parametrize(
    "method,group,sym,block",
    [("int4", 32, True, None), ("int4", 16, False, None), ("int4", None, True, None), ("int8", 32, True, None),
     ("int8", None, False, None), ("fp8", None, True, None), ("fp8", None, True, 16)],
)
@pytest.mark.parametrize("n,top_k", [(1, 3), (3, 2)])
def test_moe_gemv_matches_reference(method, group, sym, block, n, top_k):
    x, gate_up, down, weights, ids = random_moe(n, 64, 40, 6, top_k)  # I = 40: K steps of down masked
    a, b = _q(gate_up, method, group, sym, block), _q(down, method, group, sym, block)
    assert mg.moe_gemv_supported(a, b)
    exact = quant_moe_reference(x.double(), a, b, weights.double(), ids)
    got = mg.quant_moe_gemv(x, a, b, weights, ids)
    err = (got.double() - exact).abs().max().item()
    print(f"quant_moe_gemv {method} g={group} sym={sym} block={block} n={n} top{top_k}: max abs err {err:.3g}")
    assert got.dtype == x.dtype and got.shape == x.shape
    assert err < 1e-4


@pytest.mark.parametrize("method,dtype", [("int4", torch.bfloat16), ("int8", torch.float16), ("fp8", torch.bfloat16)])
def test_moe_gemv_half_precision(method, dtype):
    x, gate_up, down, weights, ids = random_moe(3, 64, 32, 5, 2, seed=4)
    a = _q(gate_up, method, 32 if method != "fp8" else None, True, None, dtype)
    b = _q(down, method, 32 if method != "fp8" else None, True, None, dtype)
    exact = quant_moe_reference(x.double(), a, b, weights.double(), ids)
    got = mg.quant_moe_gemv(x.to(dtype), a, b, weights.to(dtype), ids)
    ref = quant_moe_reference(x.to(dtype), a, b, weights.to(dtype), ids)
    full = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids)
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    q_err = ((exact - full).norm() / full.norm()).item()
    print(f"quant_moe_gemv {method} {dtype}: max abs err {err:.3g} (reference in {dtype}: {ref_err:.3g}); "
          f"quantization rel err vs unquantized {q_err:.4f}")
    assert got.dtype == dtype
    assert err <= 2 * ref_err + 1e-2


def test_moe_gemv_shared_experts_and_configs():
    """Tokens that pick the same experts (each pair still reads its own), explicit tiles."""
    x, gate_up, down, weights, ids = random_moe(4, 64, 48, 4, 2, seed=2)
    ids = torch.tensor([[0, 1], [1, 0], [2, 1], [1, 3]])
    a, b = _q(gate_up, "int4", 16, False, None), _q(down, "int4", 16, True, None)
    exact = quant_moe_reference(x.double(), a, b, weights.double(), ids)
    for cfg in (
        dict(BLOCK_N_GU=2, BLOCK_K_GU=64, num_warps_gu=1, BLOCK_N_D=16, BLOCK_K_D=16, num_warps_d=2, num_stages=1),
        dict(BLOCK_N_GU=16, BLOCK_K_GU=32, num_warps_gu=4, BLOCK_N_D=4, BLOCK_K_D=64, num_warps_d=1, num_stages=3),
    ):
        got = mg.quant_moe_gemv(x, a, b, weights, ids, config=cfg)
        err = (got.double() - exact).abs().max().item()
        print(f"quant_moe_gemv int4 {cfg}: max abs err {err:.3g}")
        assert err < 1e-4


def test_moe_gemv_default_config_fills_the_gpu():
    """Thinker decode (128 experts, top-8, I = 768, H = 2048): hundreds of programs per kernel."""
    for method in ("int4", "int8", "fp8"):
        cfg = mg.moe_gemv_config(1, 8, 2048, 768, method)
        assert 8 * -(-768 // cfg["BLOCK_N_GU"]) >= 256
        assert -(-2048 // cfg["BLOCK_N_D"]) >= 256
        assert 2048 % cfg["BLOCK_K_GU"] == 0 and 768 % cfg["BLOCK_K_D"] == 0


def test_non_silu_falls_back_to_reference():
    x, gate_up, down, weights, ids = random_moe(2, 32, 16, 4, 2)
    a, b = _q(gate_up, "int8", None, True, None), _q(down, "int8", None, True, None)
    got = mg.quant_moe_gemv(x, a, b, weights, ids, act=F.gelu)
    assert torch.allclose(got, quant_moe_reference(x, a, b, weights, ids, F.gelu))
