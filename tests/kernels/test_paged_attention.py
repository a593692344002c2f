"""The Triton paged decode kernel and the SDPA prefill against plain references (CPU interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from thinktalk.kernels import paged_attention as pa
from thinktalk.layers.attention import causal_attention


def _paged(batch, q_heads, kv_heads, head_dim, block_size, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = batch * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    # scattered, non-contiguous block tables; unused entries point at block 0
    perm = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    tables = perm.int()
    q = torch.randn(batch, q_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def _dense_reference(q, k_cache, v_cache, tables, lens, scale):
    """Independent of the paged reference: explicit gather, softmax in float64."""
    out = []
    bs = k_cache.shape[1]
    for b, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        k = k_cache[tables[b, t // bs].long(), t % bs].double()
        v = v_cache[tables[b, t // bs].long(), t % bs].double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(out)


CASES = [
    # batch, q heads, kv heads, head dim, block size, context lengths
    (3, 4, 2, 16, 4, [1, 7, 30]),
    (2, 8, 1, 32, 16, [17, 64]),  # GQA group 8 (Qwen3-Omni's 32/4), a full tile
    (2, 4, 4, 24, 8, [5, 130]),  # no grouping, head dim not a power of two, several tiles
    (2, 4, 2, 8, 4, [3, 9]),  # a head dim below tl.dot's 16 (tiny test models): padded
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-bs{c[4]}")
def test_paged_decode_kernel_matches_reference(dtype, case):
    if not pa.available("cpu"):
        pytest.skip("triton is not installed")
    batch, hq, hkv, d, bs, lens = case
    q, kc, vc, tables, ctx = _paged(batch, hq, hkv, d, bs, lens, dtype)
    scale = d**-0.5
    exact = _dense_reference(q, kc, vc, tables, ctx, scale)
    ref = pa.paged_attention_reference(q, kc, vc, tables, ctx, scale)
    errs = {}
    for splits in (1, 3):
        got = pa.paged_attention(q, kc, vc, tables, ctx, scale, num_splits=splits)
        assert got.dtype == dtype and got.shape == q.shape
        errs[splits] = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    print(f"paged_attention {dtype} {case}: max abs err {errs} (torch reference: {ref_err:.3g})")
    tol = 1e-5 if dtype == torch.float32 else 2 * ref_err + 2e-3
    assert max(errs.values()) <= tol
    assert ref_err <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_prefill_attention_matches_contiguous_reference():
    g = torch.Generator().manual_seed(1)
    for lq, lk in [(9, 9), (5, 12), (1, 7)]:  # whole context, reused prefix/chunk, one token
        q = torch.randn(lq, 8, 16, generator=g)
        k = torch.randn(lk, 2, 16, generator=g)
        v = torch.randn(lk, 2, 16, generator=g)
        got = pa.prefill_attention(q, k, v, 0.25)
        ref = causal_attention(q, k, v, 0.25)
        err = (got - ref).abs().max().item()
        print(f"prefill_attention lq={lq} lk={lk}: max abs err {err:.3g}")
        assert err < 1e-5


def test_gather_context_follows_block_table():
    cache = torch.arange(6 * 4, dtype=torch.float32).view(6, 4, 1, 1)
    table = torch.tensor([5, 2, 0])
    got = pa.gather_context(cache, table, 9).flatten().tolist()
    assert got == [20, 21, 22, 23, 8, 9, 10, 11, 0]
