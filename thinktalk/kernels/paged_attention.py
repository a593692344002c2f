"""Attention over the paged KV cache: a Triton decode kernel, its torch reference, and prefill.

Cache layout (see `kv_cache.py`): per layer one K and one V tensor [num_blocks, block_size, Hkv, D];
a sequence's token t lives in block `block_tables[seq, t // block_size]` at offset
`t % block_size`.

Decode (one query token per sequence) is memory-bound: `paged_attention` runs one Triton program
per (sequence, kv head, split). The program loads each key/value tile once and scores it against
all the query heads of its GQA group at once (the group, 8 heads for Qwen3-Omni's 32/4, is padded
to 16 rows for `tl.dot`), with an online softmax in fp32. For few sequences with long contexts the
context is split across programs (flash-decoding); the partial outputs and their log-sum-exps are
merged by a softmax-weighted sum in a merge kernel after it. Shapes depend only on the batch, so a
decode step can be CUDA-graphed: splits whose range is empty write a -inf log-sum-exp and drop out
of the merge.
`paged_attention_reference` is the same function in plain torch (gather the context, SDPA), used
on CPU and as the test oracle.

Prefill (many query tokens per sequence) is compute-bound and is not written by hand here:
`prefill_attention` calls torch's `scaled_dot_product_attention` once per sequence, on the new
tokens' keys directly when the chunk is the whole context (`is_causal=True`), else on the context
gathered from the paged cache with a lower-right causal mask (`causal_lower_right`: the queries
are the last Lq of Lk positions, as with a reused prefix or a chunked prefill). Both take GQA
natively (`enable_gqa`), and on CUDA both dispatch to the FlashAttention-2 backend. The gather is
O(context) memory traffic, small next to the O(Lq * context) attention itself; a varlen
FlashAttention call over the block table would save it and one launch per sequence, at the cost of
an extra dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .common import available, dot_in_fp32, dot_precision, pdl_args, triton, wait_prior_next_first

if triton is not None:
    import triton.language as tl

__all__ = ["paged_attention", "paged_attention_reference", "prefill_attention", "available"]


# -- prefill ------------------------------------------------------------------------------------
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [Lq, Hq, D] are the last Lq positions of k/v [Lk, Hkv, D]. Returns [Lq, Hq, D]."""
    lq, lk = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if lq == lk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = causal_lower_right(lq, lk)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


# -- decode: reference --------------------------------------------------------------------------
def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence: cache [B, bs, H, D] -> [length, H, D]."""
    block_size = cache.shape[1]
    t = torch.arange(length, device=cache.device)
    return cache[block_table[t // block_size].long(), t % block_size]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]: one query per sequence, at position context_lens[b] - 1 (its own key is in the
    cache). k/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int;
    context_lens [B] int. Returns [B, Hq, D]. (The keyword arguments are hints the kernel takes.)"""
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = gather_context(k_cache, block_tables[b], length)
        v = gather_context(v_cache, block_tables[b], length)
        out[b] = prefill_attention(q[b : b + 1], k, v, scale)[0]
    return out


# -- decode: Triton -----------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr,
        qk_scale,  # softmax scale * log2(e)
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_tb,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        wait_prior_next_first(USE_PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + seq)
        num_tiles = tl.cdiv(length, BLOCK_N)
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        first = split * per_split
        last = tl.minimum(first + per_split, num_tiles)

        offs_g = tl.arange(0, GROUP_PAD)
        g_ok = offs_g < GROUP
        heads = kv_head * GROUP + offs_g
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, D_PAD), dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for tile in range(first, last):
            pos = tile * BLOCK_N + offs_n
            n_ok = pos < length
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            kt = tl.load(k_ptr + block[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                         + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [D, N]
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [G, N], log2 units
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        if NUM_SPLITS > 1:
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


    @triton.jit
    def _merge_splits_kernel(partial_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                             stride_ob, stride_oh, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
                             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        """out[b, h] = sum_s softmax(lse[b, h, :])[s] * partial[b, h, s] (lse in log2 units)."""
        wait_prior_next_first(USE_PDL)
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))
        w = w / tl.sum(w, axis=0)
        p = tl.load(partial_ptr + seq * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=(offs_s[:, None] < NUM_SPLITS) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        out = tl.sum(p * w[:, None], axis=0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


def _num_splits(batch: int, kv_heads: int, max_context_len: int | None, block_n: int, device) -> int:
    if max_context_len is None or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, batch * kv_heads)  # enough programs to fill the GPU twice
    tiles = triton.cdiv(max_context_len, block_n)
    return max(1, min(want, tiles // 4, 32))  # each split keeps >= 4 tiles of work


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_attention_reference` (same arguments, same result).

    max_context_len: a host-side bound used only to choose the split count; num_splits forces it
    (fix it when capturing a CUDA graph)."""
    if not available(q.device):
        return paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    block_n = 64  # tokens per tile, independent of the cache block size
    splits = num_splits or _num_splits(batch, kv_heads, max_context_len, block_n, q.device)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_attention needs the head dimension contiguous")
    if splits == 1:
        out = torch.empty_like(q)
        partial, lse = out[:, :, None, :], out  # lse unused
        strides_o = (out.stride(0), out.stride(1), 0)
        strides_l = (0, 0)
    else:
        partial = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
        strides_o = (partial.stride(0), partial.stride(1), partial.stride(2))
        strides_l = (lse.stride(0), lse.stride(1))
    upcast = dot_in_fp32(q.dtype)
    precision = dot_precision(torch.float32 if upcast else q.dtype)
    grid = (batch, kv_heads, splits)
    pdl = pdl_args(q.device)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *strides_o, *strides_l,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        # tl.dot needs K >= 16 when compiled (the interpreter does not check): small test heads are padded
        D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=splits, PRECISION=precision, UPCAST=upcast, num_warps=4, num_stages=2, **pdl,
    )
    if splits == 1:
        return out
    # the splits' partial outputs weighted by their share of the softmax mass, in one kernel
    out = torch.empty_like(q)
    _merge_splits_kernel[(batch, num_heads)](
        partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), NUM_SPLITS=splits, S_PAD=triton.next_power_of_2(splits),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), num_warps=1, **pdl,
    )
    return out
