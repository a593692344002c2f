"""Qwen3-Omni's 3-D (time, height, width) M-RoPE positions of a prompt.

Same results, dtype (float32) and shapes as transformers 5.17's
``Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index``:

* text runs count up on all three axes, continuing from one past the largest position of the
  previous run (the largest over all three axes of the *last piece* placed, as the reference does);
* an audio clip (``<|audio_start|> pads <|audio_end|>``) counts up like text;
* an image / video of grid (t, h, w) takes, per merged token, ``(start + t_pos, start + row,
  start + col)`` with ``t_pos = t_index * second_per_grid * position_id_per_seconds`` (images use
  ``second_per_grid = 1``);
* with `use_audio_in_video`, ``<|vision_start|><|audio_start|> ... <|audio_end|><|vision_end|>``
  holds video and audio tokens interleaved by time; the two position streams are merged in the
  same order (a video token goes first when its time position is <= the audio token's);
* without any image or video grid the prompt is treated as text (cumulative attention mask).

Every token id and constant comes from the thinker config.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .audio import audio_token_count


def _run(length: Any, start: Any) -> torch.Tensor:
    """A [3, length] run of positions start, start+1, ... (dtype follows `start` as in the reference)."""
    return torch.arange(length).view(1, -1).expand(3, -1) + start


def _vision_positions(start: Any, t_pos: torch.Tensor, grid_h: Any, grid_w: Any, merge: int) -> torch.Tensor:
    rows = grid_h // merge
    cols = grid_w // merge
    frames = len(t_pos)
    h = torch.arange(rows).view(1, -1, 1).expand(frames, -1, cols).flatten().float()
    w = torch.arange(cols).view(1, 1, -1).expand(frames, rows, -1).flatten().float()
    t = t_pos.view(-1, 1).expand(-1, rows * cols).flatten().float()
    return torch.stack([t, h, w]) + start


def _interleave(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge video and audio position columns by time (video first on ties).

    Returns the merged [3, n] float block and the last piece the reference appends for it (the
    remainder of whichever stream outlasts the other), whose max() seeds the next position.
    """
    vt = video[0].tolist()
    at = audio[0].tolist()
    i = j = 0
    from_audio: list[bool] = []
    while i < len(vt) and j < len(at):
        take_video = vt[i] <= at[j]
        from_audio.append(not take_video)
        i, j = (i + 1, j) if take_video else (i, j + 1)
    mask = torch.tensor(from_audio, dtype=torch.bool)
    head = torch.empty(3, len(from_audio), dtype=torch.float32)
    head[:, ~mask] = video[:, :i].float()
    head[:, mask] = audio[:, :j].float()
    merged = torch.cat([head, video[:, i:].float(), audio[:, j:].float()], dim=1)
    if i < len(vt):
        tail = video[:, i:]
    elif j < len(at):
        tail = audio[:, j:]
    elif from_audio:
        tail = audio[:, j - 1 : j] if from_audio[-1] else video[:, i - 1 : i]
    else:
        tail = None
    return merged, tail


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    use_audio_in_video: bool = False,
    audio_seqlens: torch.Tensor | None = None,
    second_per_grids: torch.Tensor | None = None,
    *,
    config: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids float32 [3, B, L], mrope_position_deltas float32 [B, 1]).

    `config` is the thinker config (`ConfigNode` of ``thinker_config``). `audio_seqlens` are the
    mel lengths of all audio clips in the batch in prompt order (``feature_attention_mask.sum(-1)``),
    `second_per_grids` the processor's ``video_second_per_grid``.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if image_grid_thw is None and video_grid_thw is None:
        positions = attention_mask.float().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 1)
        positions = positions.unsqueeze(0).expand(3, -1, -1).to(attention_mask.device)
        largest = positions.max(0, keepdim=False)[0].max(-1, keepdim=True)[0]
        return positions, largest + 1 - torch.sum(attention_mask, dim=-1, keepdim=True)

    if second_per_grids is not None and not isinstance(second_per_grids, torch.Tensor):
        second_per_grids = torch.tensor(list(second_per_grids), dtype=torch.float32)
    if audio_seqlens is not None and not isinstance(audio_seqlens, torch.Tensor):
        audio_seqlens = torch.tensor(list(audio_seqlens), dtype=torch.long)

    keep = attention_mask == 1
    position_ids = torch.zeros(3, input_ids.shape[0], input_ids.shape[1], dtype=torch.float, device=input_ids.device)
    deltas = []
    walker = _PromptWalker(config, image_grid_thw, video_grid_thw, audio_seqlens, second_per_grids, use_audio_in_video)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][keep[row]]
        try:
            positions = walker.positions(ids)
        except (IndexError, ValueError, TypeError) as exc:
            raise InputError(
                f"prompt {row}: multimodal placeholders do not match the given grids / audio lengths ({exc})"
            ) from exc
        position_ids[..., row, keep[row]] = positions.to(position_ids.device)
        deltas.append(positions.max() + 1 - len(ids))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


class _PromptWalker:
    """Walks prompts in order, consuming image / video / audio items across the whole batch."""

    def __init__(self, config: Any, image_grid_thw: Any, video_grid_thw: Any, audio_seqlens: Any,
                 second_per_grids: Any, use_audio_in_video: bool):
        self.merge = config.vision_config.spatial_merge_size
        self.image_id = config.image_token_id
        self.video_id = config.video_token_id
        self.audio_id = config.audio_token_id
        self.vision_start_id = config.vision_start_token_id
        self.audio_start_id = config.audio_start_token_id
        self.per_second = config.position_id_per_seconds
        self.n_window = config.audio_config.n_window
        self.image_grid_thw = image_grid_thw
        self.video_grid_thw = video_grid_thw
        self.audio_seqlens = audio_seqlens
        self.second_per_grids = second_per_grids
        self.use_audio_in_video = use_audio_in_video
        self.image_idx = self.video_idx = self.audio_idx = 0
        self.pieces: list[torch.Tensor] = []
        self.last_max: Any = None  # max() of the last piece the reference appends

    def _put(self, piece: torch.Tensor) -> None:
        self.pieces.append(piece)
        self.last_max = piece.max()

    def _next_start(self) -> Any:
        return self.last_max + 1 if self.last_max is not None else 0

    def _video_positions(self, start: Any) -> tuple[torch.Tensor, Any]:
        grid = self.video_grid_thw[self.video_idx]
        spg = self.second_per_grids[self.video_idx].cpu().float()
        t_pos = (torch.arange(grid[0]) * spg * self.per_second).float()
        return _vision_positions(start, t_pos, grid[1], grid[2], self.merge), grid.prod() // self.merge**2

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[3, len(ids)] float positions of one (unpadded) prompt."""
        tokens = ids.tolist()
        starts = torch.argwhere(ids == self.vision_start_id).squeeze(1)
        starts = starts[starts + 1 < len(tokens)]
        after_start = ids[starts + 1]
        audio_nums = int((ids == self.audio_start_id).sum())
        image_nums = int((after_start == self.image_id).sum())
        video_marker = self.audio_start_id if self.use_audio_in_video else self.video_id
        video_nums = int((after_start == video_marker).sum())
        items = image_nums + audio_nums + (0 if self.use_audio_in_video else video_nums)
        left_images, left_videos, left_audios = image_nums, video_nums, audio_nums
        has_vision = self.image_id in tokens or self.video_id in tokens
        has_audio = self.audio_id in tokens
        self.pieces, self.last_max = [], None
        cursor = 0  # index into tokens

        for _ in range(items):
            st_idx = self._next_start()
            if has_vision and (left_videos > 0 or left_images > 0):
                vision_at = tokens.index(self.vision_start_id, cursor)
            else:
                vision_at = len(tokens) + 1
            if has_audio and left_audios > 0:
                audio_at = tokens.index(self.audio_start_id, cursor)
            else:
                audio_at = len(tokens) + 1
            first = min(vision_at, audio_at)
            text_len = first - cursor
            if text_len != 0:
                self._put(_run(text_len, st_idx))
                st_idx += text_len
            bos_len = eos_len = 2 if (first == vision_at and vision_at + 1 == audio_at) else 1
            self._put(_run(bos_len, st_idx))
            st_idx += bos_len

            if first == audio_at:
                n_audio = audio_token_count(self.audio_seqlens[self.audio_idx], self.n_window)
                self._put(_run(n_audio, st_idx))
                cursor += int(text_len + bos_len + n_audio + eos_len)
                self.audio_idx += 1
                left_audios -= 1
            elif tokens[vision_at + 1] == self.image_id:
                grid = self.image_grid_thw[self.image_idx]
                t_pos = (torch.arange(grid[0]) * 1 * self.per_second).float()
                self._put(_vision_positions(st_idx, t_pos, grid[1], grid[2], self.merge))
                cursor += int(text_len + bos_len + grid.prod() // self.merge**2 + eos_len)
                self.image_idx += 1
                left_images -= 1
            elif tokens[vision_at + 1] == self.video_id:
                video_pos, n_video = self._video_positions(st_idx)
                self._put(video_pos)
                cursor += int(text_len + bos_len + n_video + eos_len)
                self.video_idx += 1
                left_videos -= 1
            elif vision_at + 1 == audio_at:  # audio in video
                n_audio = audio_token_count(self.audio_seqlens[self.audio_idx], self.n_window)
                audio_pos = _run(n_audio, st_idx)
                video_pos, n_video = self._video_positions(st_idx)
                merged, tail = _interleave(video_pos, audio_pos)
                self.pieces.append(merged)
                if tail is not None:
                    self.last_max = tail.max()
                cursor += int(text_len + bos_len + n_audio + n_video + eos_len)
                self.audio_idx += 1
                self.video_idx += 1
                left_videos -= 1
                left_audios -= 1
            self._put(_run(eos_len, self._next_start()))

        if cursor < len(tokens):
            self._put(_run(len(tokens) - cursor, self._next_start()))
        return torch.cat([p.float() for p in self.pieces], dim=1).reshape(3, -1)
