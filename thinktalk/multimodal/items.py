"""The media items of one prompt: which placeholder tokens each fills, and a digest of its content.

The paged KV cache keys a block holding placeholder tokens by the items whose tokens fall in it
(kv_cache.py), so a conversation that is re-sent with one more audio clip or image still finds the
blocks of its earlier turns: their items are unchanged even though the request's media as a whole
is not.

Items of one kind (audio, image, video) fill that kind's placeholder tokens in prompt order, each
as many as its encoder output has (also with `use_audio_in_video`, where a video's audio and frame
tokens interleave: within each kind the order still holds). A digest covers exactly what the
encoder reads of the item: an audio clip's unpadded mel frames (so the padding that a longer clip
in the same request adds does not change it), an image's or video's pixel rows and its grid.

The same items let the engine encode only part of a prompt's media: a prompt whose first blocks
come from the prefix cache needs the encoders only for the items with placeholders after them
(`items_from`, `select_items`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .audio import audio_token_count


@dataclass(frozen=True)
class MediaItem:
    kind: str  # "audio" | "image" | "video"
    token_id: int  # the placeholder id its tokens carry
    num_tokens: int
    digest: bytes  # 16 bytes


def item_digest(kind: str, tensor: torch.Tensor, meta: tuple[int, ...]) -> bytes:
    """The digest of one item from what the encoder reads of it (see the module docstring)."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{kind}{meta}{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy())
    return h.digest()


def media_items(inputs: dict[str, Any], thinker_cfg) -> list[MediaItem]:
    """The items of one prompt's processor outputs (audio, then images, then videos; each kind in
    prompt order). `inputs["item_digests"]`, when the processor gives it (items it took from a
    media_cache.MediaCache, which digested them once), holds their digests in this order, None
    where the digest is to be computed here."""
    items: list[MediaItem] = []
    known = iter(inputs.get("item_digests") or ())

    def digest(kind: str, tensor: torch.Tensor, meta: tuple[int, ...]) -> bytes:
        return next(known, None) or item_digest(kind, tensor, meta)

    feats, mask = inputs.get("input_features"), inputs.get("feature_attention_mask")
    if feats is not None:
        lens = mask.sum(-1).tolist()
        counts = audio_token_count(torch.tensor(lens), thinker_cfg.audio_config.n_window).tolist()
        for i, (n_frames, n_tokens) in enumerate(zip(lens, counts)):
            items.append(MediaItem("audio", thinker_cfg.audio_token_id, int(n_tokens),
                                   digest("audio", feats[i, :, : int(n_frames)], (int(n_frames),))))
    merge = thinker_cfg.vision_config.spatial_merge_size
    for kind, pixels, grids, token_id in (
        ("image", inputs.get("pixel_values"), inputs.get("image_grid_thw"), thinker_cfg.image_token_id),
        ("video", inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"), thinker_cfg.video_token_id),
    ):
        if pixels is None:
            continue
        row = 0
        for grid in grids.tolist():
            rows = int(np.prod(grid))
            items.append(MediaItem(kind, token_id, rows // merge**2, digest(kind, pixels[row : row + rows], tuple(grid))))
            row += rows
    return items


def item_of_token(prompt_ids: list[int], items: list[MediaItem]) -> np.ndarray | None:
    """For each prompt token, the index (in `items`) of the item whose placeholder it is, else -1.

    None when a kind's placeholder count in the prompt is not the sum of its items' token counts
    (a prompt not made by our processor): the caller then cannot tell the items apart.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64)
    owner = np.full(len(ids), -1, dtype=np.int64)
    for token_id in {it.token_id for it in items}:
        index = [i for i, it in enumerate(items) if it.token_id == token_id]
        where = np.flatnonzero(ids == token_id)
        counts = [items[i].num_tokens for i in index]
        if sum(counts) != len(where):
            return None
        owner[where] = np.repeat(np.asarray(index, dtype=np.int64), counts)
    return owner


def items_from(owner: np.ndarray, start: int) -> tuple[int, list[int]]:
    """The items to encode for computing prompt tokens start..: (lo, item indices).

    owner: `item_of_token` of the prompt. The items are those with a placeholder at or after
    `start`; lo <= start is the first position of any of them, moved back until every item with a
    placeholder at or after lo is among them, so the tokens lo.. hold each chosen item's
    placeholders whole and no other item's (a video's audio interleaves with its frames).
    """
    positions = np.arange(len(owner))
    valid = owner >= 0
    n_items = int(owner.max()) + 1 if valid.any() else 0
    first = np.full(n_items, len(owner), dtype=np.int64)
    last = np.full(n_items, -1, dtype=np.int64)
    np.minimum.at(first, owner[valid], positions[valid])
    np.maximum.at(last, owner[valid], positions[valid])
    lo = start
    while True:
        keep = np.flatnonzero(last >= lo)
        new = min(lo, int(first[keep].min())) if keep.size else lo
        if new == lo:
            return lo, keep.tolist()
        lo = new


def select_items(mm: Any, items: list[MediaItem], keep: list[int]) -> Any:
    """`mm` (models.thinker.MultimodalInputs of `items`) with only the items `keep` (indices into
    `items`): their audio clips, and their images' and videos' pixel rows and grids; a kind with
    none kept becomes None. Each kind keeps its prompt order. The kept clips encode as they do
    among all of them (`audio_longest_frames`); what differs from encoding everything is only
    float rounding of smaller matrix products."""
    chosen = set(keep)
    fields: dict[str, Any] = {}
    audio = [k for k, i in enumerate(i for i, it in enumerate(items) if it.kind == "audio") if i in chosen]
    if mm.input_features is not None:
        fields["input_features"] = mm.input_features[audio] if audio else None
        fields["feature_attention_mask"] = mm.feature_attention_mask[audio] if audio else None
        # the audio encoder pads each clip's chunks as in a call over all the clips
        longest = max(int(mm.feature_attention_mask.sum(-1).max()), mm.audio_longest_frames or 0)
        fields["audio_longest_frames"] = longest if audio else None
    for kind, pixel_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                      ("video", "pixel_values_videos", "video_grid_thw")):
        pixels, grids = getattr(mm, pixel_key), getattr(mm, grid_key)
        if pixels is None:
            continue
        mine = [k for k, i in enumerate(i for i, it in enumerate(items) if it.kind == kind) if i in chosen]
        rows = grids.prod(-1).tolist()
        starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
        fields[pixel_key] = torch.cat([pixels[starts[k] : starts[k] + rows[k]] for k in mine]) if mine else None
        fields[grid_key] = grids[mine] if mine else None
    return replace(mm, **fields)
