"""The decode GEMV for quantized weights (Triton, under the CPU interpreter) against its reference.

Shapes are off every tile: N not a multiple of the rows per program (masked rows), K not a
multiple of the K step (masked columns) and, for the group formats, a last group cut short; M = 1..4
(4 = a padded power of two for 3 rows). The CPU interpreter cannot run the kernels' inline PTX, so
the shift-and-mask twin of the byte permutes runs here; test_quant_gemv_cuda.py checks the PTX.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from thinktalk.kernels import quant_gemv as gv
from thinktalk.kernels.common import interpreting
from thinktalk.kernels.quant_format import QFormat, quantize, resolve_format

pytestmark = [
    pytest.mark.skipif(gv.triton is None, reason="triton is not installed"),
    # decorated before this file set TRITON_INTERPRET (another test file imported them first): the
    # kernels would fall back to the reference, so do not pretend to test them
    pytest.mark.skipif(not interpreting(), reason="TRITON_INTERPRET=1 was not set before the kernels were imported"),
]

FORMATS = [  # (method, group_size, sym, fp8_block, K)
    ("int4", 128, True, None, 200),  # one group of 128, then a short one of 72
    ("int4", 32, False, None, 200),
    ("int4", None, True, None, 200),  # per channel
    ("int4", 48, True, None, 192),  # groups that are not a power of two: chunks of 16 columns
    ("int8", 64, True, None, 196),
    ("int8", None, False, None, 196),  # per channel, asymmetric
    ("fp8", None, True, None, 199),  # per channel; odd K
    ("fp8", None, True, 32, 200),  # square blocks (128 in real checkpoints)
]


def _case(method, group, sym, block, k, n=40, m=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    fmt = resolve_format(method, k, group, sym, block)
    q, s, z = quantize(w, fmt, scale_dtype=dtype if method != "fp8" else None)
    return x, q, s, z, fmt, bias


def _check(x, q, s, z, fmt, bias, dtype, config=None, label=""):
    exact = gv.quant_gemv_reference(x.double(), q, s, z, fmt, None if bias is None else bias.double())
    got = gv.quant_gemv(x.to(dtype), q, s, z, fmt, None if bias is None else bias.to(dtype), config=config)
    ref = gv.quant_gemv_reference(x.to(dtype), q, s, z, fmt, None if bias is None else bias.to(dtype))
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    print(f"quant_gemv {label} {dtype}: max abs err {err:.3g} (reference in {dtype}: {ref_err:.3g})")
    assert got.dtype == dtype and got.shape == exact.shape
    if dtype == torch.float32:
        assert err < 1e-4
    else:
        assert err <= 2 * ref_err + 1e-2
    return got


@pytest.mark.parametrize("method,group,sym,block,k", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_matches_reference(method, group, sym, block, k, m):
    x, q, s, z, fmt, bias = _case(method, group, sym, block, k, m=m)
    assert gv.gemv_supported(fmt, k)
    label = f"{method} g={group} sym={sym} block={block} m={m}"
    _check(x, q, s, z, fmt, bias if m % 2 else None, torch.float32, label=label)


@pytest.mark.parametrize("method,group,sym,block,k", [FORMATS[1], FORMATS[4], FORMATS[7]])
def test_gemv_half_precision(method, group, sym, block, k):
    for dtype in (torch.bfloat16, torch.float16):
        x, q, s, z, fmt, bias = _case(method, group, sym, block, k, m=2, dtype=dtype)
        _check(x, q, s, z, fmt, bias, dtype, label=f"{method} g={group}")


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_N=2, BLOCK_K=64, SPLIT_K=1, num_warps=1, num_stages=1),
        dict(BLOCK_N=8, BLOCK_K=64, SPLIT_K=2, num_warps=2, num_stages=3),  # split-K + the sum kernel
        dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=2),  # splits of 2, 1 steps
        dict(BLOCK_N=4, BLOCK_K=128, SPLIT_K=8, num_warps=1, num_stages=3),  # more splits than steps
    ],
)
def test_gemv_configs_and_split_k(config):
    for method, group, sym, k in (("int4", 32, False, 256), ("int8", 64, True, 320), ("fp8", None, True, 256)):
        x, q, s, z, fmt, bias = _case(method, group, sym, None, k, n=36, m=3, seed=5)
        _check(x, q, s, z, fmt, bias, torch.float32, config=config, label=f"{method} {config}")


def test_even_k_path_and_default_configs():
    """K a multiple of the step (no K masks, scales one group per chunk): the shapes of real layers."""
    for method, k, n in (("int4", 1024, 72), ("int8", 512, 40), ("fp8", 512, 24)):
        x, q, s, z, fmt, bias = _case(method, 128, True, 128 if method == "fp8" else None, k, n=n, m=2, seed=7)
        cfg = gv.gemv_config(2, n, k, fmt)
        assert k % cfg["BLOCK_K"] == 0
        _check(x, q, s, z, fmt, None, torch.float32, label=f"{method} K={k} default {cfg}")


def test_default_config_fills_the_gpu():
    """Hundreds of programs for the thinker's projections; split-K only where N is small."""
    int4 = QFormat("int4", 1, 128)
    for n, k in ((4096, 2048), (2048, 4096), (512, 2048), (151936, 2048)):
        cfg = gv.gemv_config(1, n, k, int4)
        programs = -(-n // cfg["BLOCK_N"]) * cfg["SPLIT_K"]
        assert programs >= gv.MIN_PROGRAMS or cfg["BLOCK_N"] == 2, (n, k, cfg)
        assert k % cfg["BLOCK_K"] == 0


def test_unsupported_layouts_fall_back_to_the_reference():
    # int4 rows that are not whole 32-bit words, int8 groups that split a word
    for fmt, k in ((QFormat("int4", 1, 32), 204), (QFormat("int8", 1, 6), 60)):
        assert not gv.gemv_supported(fmt, k)
        g = torch.Generator().manual_seed(1)
        w, x = torch.randn(12, k, generator=g), torch.randn(2, k, generator=g)
        q, s, z = quantize(w, fmt)
        torch.testing.assert_close(gv.quant_gemv(x, q, s, z, fmt), gv.quant_gemv_reference(x, q, s, z, fmt))


def test_zero_rows_and_too_many_rows():
    x, q, s, z, fmt, _ = _case("int8", 64, True, None, 196, m=3)
    assert gv.quant_gemv(x[:0], q, s, z, fmt).shape == (0, 40)
    with pytest.raises(ValueError, match="few rows"):
        gv.quant_gemv(torch.randn(17, 196), q, s, z, fmt)
