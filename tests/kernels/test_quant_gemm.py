"""Quantized dense GEMMs (Triton, under the CPU interpreter) against their torch references.

Besides kernel == reference, the quantizers themselves are checked: codes in range, the int4
packing, and the quantization error within what round-to-nearest allows.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from thinktalk.kernels import quant_gemm as qg
from thinktalk.kernels.quant_format import (
    FP8_DTYPE, QFormat, codes_of, dequantize, pack_int4, quant_act_fp8, quantize, resolve_format, unpack_int4,
)

from thinktalk.kernels.common import interpreting  # noqa: E402

pytestmark = [
    pytest.mark.skipif(qg.triton is None, reason="triton is not installed"),
    # the kernels were decorated before this file set TRITON_INTERPRET (another test file imported
    # them first): they would silently fall back to the references, so do not pretend to test them
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]

FORMATS = [  # (method, group_size, sym, fp8_block)
    ("int4", 128, True, None),
    ("int4", 32, False, None),
    ("int8", 64, True, None),
    ("int8", None, False, None),  # per channel, asymmetric
    ("fp8", None, True, None),  # per channel
    ("fp8", None, True, 32),  # square blocks (128 in real checkpoints)
]


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * k**-0.5, torch.randn(7, k, generator=g)


@pytest.mark.parametrize("method,group,sym,block", FORMATS)
def test_quantize_error_and_codes(method, group, sym, block):
    w, _ = _weights(96, 256)
    fmt = resolve_format(method, 256, group, sym, block)
    q, s, z = quantize(w, fmt)
    assert q.dtype == fmt.qweight_dtype() and q.shape == (96, fmt.packed_k(256))
    assert s.shape == fmt.scale_shape(96, 256) and (z is None) == sym
    w_hat = dequantize(q, s, z, fmt, 256)
    rel = ((w_hat - w).norm() / w.norm()).item()
    bound = {"int4": 0.13, "int8": 0.01, "fp8": 0.04}[method]  # RTN on Gaussian weights
    print(f"quantize {method} g={group} sym={sym} block={block}: relative error {rel:.4f}")
    assert rel < bound
    if method != "fp8":  # every element within half a step of its block's scale
        step = dequantize(torch.ones_like(q) if method == "int8" else pack_int4(torch.ones(96, 256, dtype=torch.uint8)),
                          s, None if z is None else torch.zeros_like(z), fmt, 256)
        assert ((w_hat - w).abs() <= step.abs() * 0.5 + 1e-6).all()


def test_int4_packing_round_trip_and_layout():
    codes = torch.randint(0, 16, (5, 11), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed, 11), codes)
    assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))  # even column in the low nibble


@pytest.mark.parametrize("method,group,sym,block", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_matches_reference(method, group, sym, block, dtype):
    w, x = _weights(96, 256)  # N off the 64-wide tile: masked columns
    fmt = resolve_format(method, 256, group, sym, block)
    q, s, z = quantize(w, fmt, scale_dtype=dtype if method != "fp8" else None)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(11)).to(dtype)  # not the global RNG: order-free
    exact = qg.quant_matmul_reference(x.double(), q, s, z, fmt, bias.double())
    got = qg.quant_matmul(x.to(dtype), q, s, z, fmt, bias)
    ref = qg.quant_matmul_reference(x.to(dtype), q, s, z, fmt, bias)
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    print(f"quant_matmul {method} g={group} sym={sym} block={block} {dtype}: max abs err {err:.3g} (reference in {dtype}: {ref_err:.3g})")
    assert got.dtype == dtype and got.shape == (7, 96)
    if dtype == torch.float32:
        assert err < 1e-4
    else:
        assert err <= 2 * ref_err + 1e-2


def test_quant_matmul_ragged_groups_and_tiles():
    # K not a multiple of the group (last group short), scales gathered per element, tiny tiles
    w, x = _weights(40, 200, seed=3)
    fmt = QFormat("int4", 1, 48, False)
    q, s, z = quantize(w, fmt)
    exact = qg.quant_matmul_reference(x.double(), q, s, z, fmt)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1)
    got = qg.quant_matmul(x, q, s, z, fmt, config=cfg)
    err = (got.double() - exact).abs().max().item()
    print(f"quant_matmul int4 ragged groups: max abs err {err:.3g}")
    assert err < 1e-4


@pytest.mark.parametrize("block", [None, 32])
def test_w8a8_fp8_block_kernel_matches_reference(block):
    w, x = _weights(96, 256, seed=1)
    fmt = resolve_format("fp8", 256, fp8_block=block)
    q, s, _ = quantize(w, fmt)
    exact = qg.w8a8_fp8_reference(x.double(), q, s, None, fmt)
    got = qg.w8a8_fp8_matmul(x, q, s, None, fmt)  # CPU: the Triton kernel (no _scaled_mm)
    err = (got.double() - exact).abs().max().item()
    wo = qg.quant_matmul_reference(x.double(), q, s, None, fmt)
    act_err = ((exact - wo).norm() / wo.norm()).item()
    print(f"w8a8 fp8 block={block}: max abs err vs reference {err:.3g}; activation quantization rel err {act_err:.4f}")
    assert err < 1e-4
    assert act_err < 0.05


def test_activation_quantization():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(12)) * torch.logspace(-2, 2, 5)[:, None]
    xq, xs = quant_act_fp8(x, 64)
    assert xq.dtype == FP8_DTYPE and xs.shape == (5, 4)
    assert (xq.float().abs().amax(-1) == 448).all()
    back = xq.float() * xs.repeat_interleave(64, dim=-1)
    assert ((back - x).norm(dim=-1) / x.norm(dim=-1)).max() < 0.05


def test_codes_of_fp8_and_backend_switch():
    w, x = _weights(32, 64)
    fmt = QFormat("fp8", 1, 64)
    q, s, _ = quantize(w, fmt)
    assert torch.equal(codes_of(q, fmt, 64), q.float())
    with qg.use_backend("reference"):
        assert not qg.use_triton(torch.device("cpu"))
    assert qg.use_triton(torch.device("cpu"))  # interpreter on (the module skips otherwise)
