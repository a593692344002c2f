"""Per-item media work kept between the calls of one conversation.

A realtime session re-sends the whole conversation every turn (so the engine's prefix cache finds
the earlier turns), and with it every earlier audio clip and camera frame. Decoding, resizing and
patching an image, or computing a clip's mel features, depends on that item alone (for clips: with
`audio_per_clip`), so `OmniProcessor.prepare_messages(..., cache=MediaCache())` does it once per
item and hands later calls the result (`PreparedImage`, `PreparedClip`): a turn then processes
only its new media. The tensors are the very ones a fresh call computes, so the requests, and the
media digests that key the prefix cache (items.py), are unchanged; those digests are computed once
per item too (the processor passes them on as `item_digests`).

Entries are keyed by a digest of the item's source content (bytes, arrays, data URLs) and the part
options that change the result; a source named by path or remote URL is not cached (the file can
change). Only the entries that the latest call used are kept (`finish_call`), so the cache holds
the media of the conversation as it was last sent. Thread-safe; a miss is computed outside the
lock.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .items import item_digest


@dataclass(frozen=True)
class PreparedImage:
    """An image after the processor's image path: patch rows [N, C*T*P*P] and grid [1, 3], and its
    item digest (items.py), made once with them."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    digest: bytes

    @classmethod
    def of(cls, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> "PreparedImage":
        return cls(pixel_values, grid_thw, item_digest("image", pixel_values, tuple(grid_thw[0].tolist())))


@dataclass(frozen=True)
class PreparedClip:
    """An audio clip's log-mel features computed alone: [1, n_mels, T] and mask [1, T], and its
    item digest (items.py), made once with them."""

    features: torch.Tensor
    mask: torch.Tensor
    digest: bytes

    @classmethod
    def of(cls, features: torch.Tensor, mask: torch.Tensor) -> "PreparedClip":
        frames = int(mask.sum())
        return cls(features, mask, item_digest("audio", features[0, :, :frames], (frames,)))


def source_key(source: Any) -> bytes | None:
    """A digest of a media source's content, or None for a source that is not cached (a path or
    remote URL: what it names can change; anything else unknown)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):  # (array, rate)
        inner = source_key(source[0])
        if inner is None:
            return None
        h.update(inner + repr(source[1]).encode())
    elif isinstance(source, (bytes, bytearray, memoryview)):
        h.update(b"bytes")
        h.update(source)
    elif isinstance(source, torch.Tensor):
        return source_key(source.detach().cpu().numpy())
    elif isinstance(source, np.ndarray):
        h.update(f"array{source.dtype}{source.shape}".encode())
        h.update(np.ascontiguousarray(source).view(np.uint8))
    elif isinstance(source, str) and source.startswith("data:"):
        h.update(source.encode())
    else:
        return None
    return h.digest()


class MediaCache:
    def __init__(self):
        self._entries: dict[tuple, Any] = {}  # what the previous call used
        self._used: dict[tuple, Any] = {}  # what the current call used
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, kind: str, source: Any, options: tuple, make: Callable[[], Any]) -> Any:
        """make() for this source and options, computed once while calls keep using it."""
        digest = source_key(source)
        if digest is None:
            return make()
        key = (kind, digest, options)
        with self._lock:
            found = key in self._used or key in self._entries
            if found:
                value = self._used[key] if key in self._used else self._entries[key]
                self._used[key] = value
                self.hits += 1
                return value
        value = make()
        with self._lock:
            self._used[key] = value
            self.misses += 1
        return value

    def finish_call(self) -> None:
        """Keep only what the call just made used (the conversation as last sent)."""
        with self._lock:
            self._entries, self._used = self._used, {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries.keys() | self._used.keys())
