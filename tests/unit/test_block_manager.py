"""Block manager: allocation, ref counts, free-list accounting, chained prefix hashes."""

import numpy as np
import pytest
import torch

from thinktalk.block_manager import BlockManager, SeqBlocks, block_hash, media_digest


def _hashes(tokens, block_size, extra_for=None, extra=None):
    out, prev = [], None
    for i in range(len(tokens) // block_size):
        ids = tokens[i * block_size : (i + 1) * block_size]
        e = extra if extra_for is not None and any(t in extra_for for t in ids) else None
        prev = block_hash(prev, ids, None, e)
        out.append(prev)
    return out


def _commit(bm, seq, tokens, n):
    bm.commit(seq, n, lambda i, prev: block_hash(prev, tokens[i * bm.block_size : (i + 1) * bm.block_size]))


def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8
    seq = SeqBlocks()
    bm.allocate(seq, 9)  # 3 blocks
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.append(seq, 12) and len(seq.block_table) == 3  # still fits
    assert bm.append(seq, 13) and len(seq.block_table) == 4
    other = SeqBlocks()
    assert not bm.can_allocate(17)  # 5 blocks > 4 free
    assert bm.can_allocate(16)
    assert not bm.can_allocate(16, keep_free=1)
    bm.allocate(other, 16)
    assert bm.num_free_blocks == 0
    assert not bm.append(seq, 17)  # nothing taken on failure
    assert len(seq.block_table) == 4
    with pytest.raises(RuntimeError):
        bm.allocate(SeqBlocks(), 1)
    bm.free_seq(seq)
    bm.free_seq(other)
    assert bm.num_free_blocks == 8 and all(r == 0 for r in bm.ref_counts)
    assert seq.block_table == [] and seq.num_computed == 0


def test_block_hash_chains_and_mixes_media():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4])
    assert a != block_hash(None, [1, 2, 3, 5])
    assert block_hash(a, [5, 6]) != block_hash(block_hash(None, [0, 2, 3, 4]), [5, 6])  # chained
    assert block_hash(None, [7, 7], extra=b"img1") != block_hash(None, [7, 7], extra=b"img2")
    pos = np.array([[0, 1], [0, 1], [0, 1]])
    assert block_hash(None, [7, 7], pos) != block_hash(None, [7, 7], pos + 1)  # M-RoPE positions count


def test_media_digest_sees_content_dtype_and_shape():
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert media_digest([x, None]) == media_digest([x.clone()])
    assert media_digest([x]) != media_digest([x + 1])
    assert media_digest([x]) != media_digest([x.view(4, 3)])
    assert media_digest([x.bfloat16()]) != media_digest([x])
    assert media_digest([x, torch.tensor([[1, 2, 2]])]) != media_digest([x, torch.tensor([[1, 2, 3]])])


def test_prefix_reuse_shares_blocks_and_survives_free():
    bs = 4
    bm = BlockManager(num_blocks=10, block_size=bs)
    tokens = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = SeqBlocks()
    bm.allocate(first, len(tokens))
    _commit(bm, first, tokens, len(tokens))
    assert len(first.hashes) == 2 and len(bm.cached) == 2

    # same prompt, different tail: the two full blocks are shared (ref count 2)
    tokens2 = tokens[:8] + [1, 2, 3]
    hits = bm.match_prefix(_hashes(tokens2, bs))
    assert hits == first.block_table[:2]
    second = SeqBlocks()
    free_before = bm.num_free_blocks
    bm.allocate(second, len(tokens2), hits, _hashes(tokens2, bs))
    assert second.num_computed == second.num_cached == 8
    assert bm.num_free_blocks == free_before - 1  # only the third block is new
    assert [bm.ref_counts[b] for b in hits] == [2, 2]

    # both gone: the cached blocks are free again but still findable
    bm.free_seq(first)
    bm.free_seq(second)
    assert bm.num_free_blocks == 10
    assert bm.match_prefix(_hashes(tokens, bs)) == hits
    third = SeqBlocks()
    bm.allocate(third, 10, hits, _hashes(tokens, bs))  # reviving costs free blocks
    assert bm.num_free_blocks == 7 and third.num_cached == 8
    bm.free_seq(third)

    # a different first block breaks the chain: no reuse even though block 2 is equal
    other = [0] + tokens[1:]
    assert bm.match_prefix(_hashes(other, bs)) == []


def test_eviction_reuses_least_recently_freed_and_forgets_hash():
    bs = 2
    bm = BlockManager(num_blocks=4, block_size=bs)
    a_tokens, b_tokens = [1, 2, 3, 4], [5, 6, 7, 8]
    a, b = SeqBlocks(), SeqBlocks()
    bm.allocate(a, 4)
    _commit(bm, a, a_tokens, 4)
    bm.allocate(b, 4)
    _commit(bm, b, b_tokens, 4)
    a_head = a.block_table[0]
    bm.free_seq(a)  # freed first: evicted first, its tail before its head
    bm.free_seq(b)
    c = SeqBlocks()
    bm.allocate(c, 2)
    assert bm.match_prefix(_hashes(a_tokens, bs)) == [a_head]  # a's tail block was taken
    assert len(bm.match_prefix(_hashes(b_tokens, bs))) == 2
    bm.append(c, 4)
    assert bm.match_prefix(_hashes(a_tokens, bs)) == []  # then its head
    assert bm.num_free_blocks == 2


def test_media_extra_keeps_images_apart():
    bs, image_tok = 4, 999
    bm = BlockManager(num_blocks=16, block_size=bs)
    prompt = [1, 2, 3, 4, 999, 999, 999, 999, 5, 6, 7, 8, 9]
    seq = SeqBlocks()
    bm.allocate(seq, len(prompt))
    img1 = media_digest([torch.ones(3)])
    hashes1 = _hashes(prompt, bs, {image_tok}, img1)
    bm.commit(seq, len(prompt), lambda i, prev: hashes1[i])
    hashes2 = _hashes(prompt, bs, {image_tok}, media_digest([torch.zeros(3)]))
    # the text block before the image is shared, the image block and all after it are not
    assert len(bm.match_prefix(hashes2)) == 1
    assert len(bm.match_prefix(hashes1)) == 3


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    seq = SeqBlocks()
    bm.allocate(seq, 4)
    _commit(bm, seq, [1, 2, 3, 4], 4)
    assert bm.match_prefix(_hashes([1, 2, 3, 4], 2)) == []
