"""Paged KV blocks: allocation with reference counts, and prefix reuse by content hash.

The KV cache is cut into `num_blocks` blocks of `block_size` token slots. A sequence owns an
ordered block table; its token t lives in slot t % block_size of block table[t // block_size].

Prefix reuse: once every slot of a block holds computed keys/values, the block is indexed by a
hash chained over the whole prefix: hash(previous block's hash, the block's token ids, its
positions, extra). For a block that holds multimodal placeholder tokens, `extra` is the digests
of the media items those placeholders belong to (kv_cache.py; multimodal/items.py), so two
prompts with the same placeholder ids but different images, audio or video never share a block
(and, through the chain, nothing after it), while a conversation re-sent with one more item still
shares the blocks of the items it had. A new sequence looks its full prompt blocks up in order
and shares the longest run found (ref count + 1), computing only the rest.

A block whose ref count drops to zero goes back to the free list but keeps its hash and content:
until it is handed out again it can still be found and revived, so a second turn of a
conversation, or a preempted request coming back, reuses it. The free list is in LRU order (blocks
freed longest ago are reused first, a sequence's tail before its head), and `num_free_blocks`
counts such cached-but-unused blocks as free: they cost nothing to evict.

Pure Python, no torch: the tensors live in `kv_cache.py`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


def block_hash(prev: bytes | None, token_ids: Iterable[int], positions: np.ndarray | None = None, extra: bytes | None = None) -> bytes:
    """The key of one full block: chained over the prefix, 128-bit blake2b."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\0" * 16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if positions is not None:
        h.update(np.ascontiguousarray(positions, dtype=np.int64).tobytes())
    if extra:
        h.update(b"mm")
        h.update(extra)
    return h.digest()


def media_digest(items: Iterable) -> bytes:
    """A digest of a request's media inputs (tensors, arrays, bytes, numbers; None skipped), for
    `block_hash`'s extra when a request has no per-item digests. Hashes contents, dtypes and
    shapes (grids included)."""
    h = hashlib.blake2b(digest_size=16)
    for t in items:
        if t is None:
            continue
        if hasattr(t, "detach"):  # a torch tensor: hash its raw bytes
            import torch

            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy())
        elif isinstance(t, np.ndarray):
            h.update(f"{t.dtype}{t.shape}".encode())
            h.update(np.ascontiguousarray(t).view(np.uint8))
        elif isinstance(t, (bytes, bytearray, memoryview)):
            h.update(t)
        else:
            h.update(repr(t).encode())
    return h.digest()


@dataclass
class SeqBlocks:
    """One sequence's place in the paged cache (`Request.kv` on the paged path)."""

    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_cached: int = 0  # of those, tokens found in the prefix cache at admission
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full, computed blocks

    @property
    def length(self) -> int:
        return self.num_computed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first

    # -- accounting -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix lookup ----------------------------------------------------------------------------
    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Block ids holding the longest run of `hashes` from the start (no ref counts change)."""
        found = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def can_allocate(self, num_tokens: int, cached_blocks: list[int] = (), keep_free: int = 0) -> bool:
        """Room for a sequence of num_tokens reusing `cached_blocks` (reviving a free one costs one),
        with at least keep_free blocks still free afterwards."""
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(cached_blocks) + revived + keep_free <= len(self.free)

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, seq: SeqBlocks, num_tokens: int, cached_blocks: list[int] = (), cached_hashes: list[bytes] = ()) -> None:
        """Give an empty sequence blocks for num_tokens, sharing `cached_blocks` for its prefix."""
        assert not seq.block_table, "sequence already holds blocks"
        if not self.can_allocate(num_tokens, cached_blocks):
            raise RuntimeError("not enough free KV blocks; check can_allocate first")
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(cached_blocks)
        seq.hashes = list(cached_hashes[: len(cached_blocks)])
        seq.num_computed = seq.num_cached = len(cached_blocks) * self.block_size
        self._grow(seq, num_tokens)

    def append(self, seq: SeqBlocks, num_tokens: int) -> bool:
        """Make room for the sequence to hold num_tokens in all; False (nothing taken) if it can't."""
        if self.blocks_for(num_tokens) - len(seq.block_table) > len(self.free):
            return False
        self._grow(seq, num_tokens)
        return True

    def _grow(self, seq: SeqBlocks, num_tokens: int) -> None:
        while len(seq.block_table) < self.blocks_for(num_tokens):
            block, _ = self.free.popitem(last=False)
            old = self.block_hashes[block]
            if old is not None:  # evict its cached content
                if self.cached.get(old) == block:
                    del self.cached[old]
                self.block_hashes[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def commit(self, seq: SeqBlocks, num_computed: int, hash_of) -> None:
        """The sequence now holds num_computed tokens; index the blocks that became full.

        hash_of(index, prev_hash) -> the chain hash of full block `index`.
        """
        seq.num_computed = num_computed
        full = num_computed // self.block_size
        while len(seq.hashes) < full:
            index = len(seq.hashes)
            h = hash_of(index, seq.hashes[-1] if seq.hashes else None)
            seq.hashes.append(h)
            block = seq.block_table[index]
            if self.enable_prefix_caching and h not in self.cached:
                self.cached[h] = block
                self.block_hashes[block] = h

    def free_seq(self, seq: SeqBlocks) -> None:
        """Drop the sequence's hold on its blocks (tail first, so prefixes are evicted last)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.hashes = []
        seq.num_computed = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block not in use (e.g. after new weights are loaded)."""
        for block in self.free:
            if self.block_hashes[block] is not None:
                self.cached.pop(self.block_hashes[block], None)
                self.block_hashes[block] = None
