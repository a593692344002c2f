"""Video input: decode (PyAV) -> sample frames at 2 fps -> recipe pre-resize -> vision patches.

`load_video` follows what the reference recipe's qwen-omni-utils (``fetch_video``) does:

* frame count: ``nframes = total_frames / video_fps * fps`` clamped to
  ``[ceil2(min_frames), floor2(min(max_frames, total_frames))]`` and to ``total_frames``, then floored
  to a multiple of 2 (``FRAME_FACTOR``); or ``round2(nframes)`` when a fixed count is asked for;
* frame indices ``torch.linspace(first, last, nframes).round()``, the sample rate
  ``nframes / total_frames * video_fps``; `start` / `end` (seconds) pick the frame range like its
  decord / torchcodec readers do;
* per-frame size: its `smart_resize` with factor ``image_patch_size * 2`` (the recipe calls it with
  the default patch 14, so 28), ``min_pixels = 128 * factor**2`` and
  ``max_pixels = max(min(768 * factor**2, total_pixels / nframes * 2), 1.05 * min_pixels)`` with
  ``total_pixels = 128000 * factor**2 * 0.9``; the resize is torchvision's tensor resize (float32
  bicubic with anti-aliasing, clamped and rounded back to uint8).

Frames are decoded with PyAV and converted with ``to_ndarray(format="rgb24")``, as torchvision's and
transformers' PyAV readers do. Frame counting uses the demuxed packet count of the video stream.

`preprocess_video` reproduces transformers 5.17's ``Qwen2VLVideoProcessor`` (as the Qwen3-Omni
processor calls it: ``size = {shortest_edge: 128*32*32, longest_edge: 768*32*32}``, no per-frame cap)
on the frames it is given: uint8 frames are resized with PyTorch's native uint8 bicubic kernel,
float frames in float (no rounding), exactly as that processor does for each dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import InputError, MediaError
from .audio import decode_audio_stream, resample
from .image import (
    VisionConfig,
    default_vision_config,
    normalize,
    patchify,
    resize_like_torchvision,
    smart_resize,
    smart_resize_qwen_utils,
)
from .media import av_error_types, describe, open_av, resolve_source

# qwen-omni-utils (the reference recipe's media loader) constants.
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
RECIPE_IMAGE_PATCH_SIZE = 14  # process_mm_info's default image_patch_size
RECIPE_MERGE_SIZE = 2
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
MODEL_SEQ_LEN = 128000

# Qwen3OmniMoeProcessor's `videos_kwargs` defaults (they override the video processor's own size).
PROCESSOR_VIDEO_MIN_PIXELS = 128 * 32 * 32
PROCESSOR_VIDEO_MAX_PIXELS = 768 * 32 * 32
PROCESSOR_DEFAULT_FPS = 1.0  # what the processor assumes when no fps is passed
MAX_VIDEO_TOKENS = 128000  # Qwen2VLVideoProcessor.max_video_tokens (only used with cap_pixels_per_frame)


@dataclass
class VideoMetadata:
    """What was decoded and how it was sampled."""

    fps: float  # native frame rate
    total_num_frames: int  # frames in the selected range
    frames_indices: list[int]  # indices of the kept frames (in the whole stream)
    sample_fps: float  # frames kept per second of video
    temporal_patch_size: int = 2
    width: int = 0  # decoded size
    height: int = 0
    resized_width: int = 0  # size of the returned frames
    resized_height: int = 0
    duration: float | None = None  # seconds covered by the selected range
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def second_per_grid(self) -> float:
        """Seconds covered by one temporal patch of `temporal_patch_size` frames."""
        return self.temporal_patch_size / self.sample_fps


class VideoClip(NamedTuple):
    """`load_video`'s result; unpacks as ``frames, metadata, audio``."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    metadata: VideoMetadata
    audio: np.ndarray | None  # mono float32 at 16 kHz, when asked for


# --------------------------------------------------------------------------------------------
# sampling


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def sample_frame_count(
    total_frames: int,
    video_fps: float,
    fps: float | None = FPS,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    *,
    label: str = "video",
) -> int:
    """qwen-omni-utils' `smart_nframes`."""
    if nframes is not None:
        count = _round_by(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        lo = _ceil_by(min_frames, FRAME_FACTOR)
        hi = _floor_by(max_frames if max_frames is not None else min(FPS_MAX_FRAMES, total_frames), FRAME_FACTOR)
        count = total_frames / video_fps * fps
        count = min(min(max(count, lo), hi), total_frames)
        count = _floor_by(count, FRAME_FACTOR)
    if not (FRAME_FACTOR <= count <= total_frames):
        raise MediaError(
            f"{label}: cannot sample {count} frames from {total_frames}; a video needs at least "
            f"{FRAME_FACTOR} frames (and nframes must lie in [{FRAME_FACTOR}, {total_frames}])"
        )
    return int(count)


def frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None, label: str) -> tuple[int, int]:
    """First and last frame index of [start, end] seconds (qwen-omni-utils' decord reader rule)."""
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise InputError(f"{label}: empty time range start={start} end={end} for a {duration:.2f} s video")
    return first, last


def recipe_frame_size(
    height: int,
    width: int,
    nframes: int,
    *,
    image_patch_size: int = RECIPE_IMAGE_PATCH_SIZE,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    total_pixels: float | None = None,
) -> tuple[int, int]:
    """The per-frame size qwen-omni-utils resizes sampled frames to."""
    factor = image_patch_size * RECIPE_MERGE_SIZE
    min_px = VIDEO_MIN_TOKEN_NUM * factor * factor if min_pixels is None else min_pixels
    total = MODEL_SEQ_LEN * factor * factor * 0.9 if total_pixels is None else total_pixels
    max_px = max(min(VIDEO_MAX_TOKEN_NUM * factor * factor, total / nframes * FRAME_FACTOR), int(min_px * 1.05))
    if max_pixels is not None:
        max_px = min(max_pixels, max_px)
    return smart_resize_qwen_utils(height, width, factor, min_px, max_px)


def _resize_frame_v1(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision.transforms.functional.resize on a uint8 tensor: float bicubic AA, clamp, round."""
    if frame.shape[0] == height and frame.shape[1] == width:
        return frame
    x = torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    x = torch.nn.functional.interpolate(x, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).round_().to(torch.uint8)
    return x[0].permute(1, 2, 0).contiguous().numpy()


# --------------------------------------------------------------------------------------------
# loading


def _count_packets(blob: Any) -> tuple[int, float | None, float | None]:
    errors = av_error_types()
    with open_av(blob, "video") as container:
        if not container.streams.video:
            kind = "an audio-only file" if container.streams.audio else "no video stream"
            raise MediaError(f"{blob.label}: no video stream ({kind})")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    count += 1
        except errors as exc:
            raise MediaError(f"{blob.label}: corrupt video data ({exc})") from exc
    return count, fps, duration


def load_video(
    source: Any,
    fps: float = FPS,
    *,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    resize: bool = True,
    image_patch_size: int = RECIPE_IMAGE_PATCH_SIZE,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    total_pixels: float | None = None,
    with_audio: bool = False,
    audio_sampling_rate: int = 16000,
    temporal_patch_size: int = 2,
) -> VideoClip:
    """Decode and sample a video the way the reference recipe does; see the module docstring.

    `source`: a path, ``file://`` / ``data:`` URL or bytes of any container FFmpeg reads (mp4, mkv,
    webm, mov, avi, ...), or an already-sampled uint8 array [T, H, W, 3] taken to be at `fps`.
    With `with_audio`, also returns the video's audio track as 16 kHz mono (for use_audio_in_video;
    a video without one is an error). `resize=False` returns frames at their decoded size.
    """
    if isinstance(source, np.ndarray):
        return _clip_from_array(source, fps, resize, image_patch_size, min_pixels, max_pixels, total_pixels,
                                temporal_patch_size)
    blob = resolve_source(source, "video")
    total, video_fps, duration = _count_packets(blob)
    if total == 0:
        raise MediaError(f"{blob.label}: the video stream has no frames")
    if not video_fps:
        if not duration:
            raise MediaError(f"{blob.label}: cannot tell the frame rate of the video stream")
        video_fps = total / duration
    first, last = frame_range(total, video_fps, start, end, blob.label)
    in_range = last - first + 1
    count = sample_frame_count(in_range, video_fps, fps, nframes, min_frames, max_frames, label=blob.label)
    indices = torch.linspace(first, last, count).round().long().tolist()
    wanted: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        wanted.setdefault(index, []).append(slot)

    frames: list[np.ndarray | None] = [None] * count
    size: tuple[int, int] | None = None
    decoded_hw = (0, 0)
    errors = av_error_types()
    with open_av(blob, "video") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = -1
        last_frame: np.ndarray | None = None
        try:
            for frame in container.decode(stream):
                index += 1
                if index > indices[-1]:
                    break
                if index not in wanted:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                decoded_hw = rgb.shape[:2]
                if resize:
                    if size is None:
                        size = recipe_frame_size(rgb.shape[0], rgb.shape[1], count, image_patch_size=image_patch_size,
                                                 min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)
                    rgb = _resize_frame_v1(rgb, *size)
                for slot in wanted[index]:
                    frames[slot] = rgb
                last_frame = rgb
        except errors as exc:
            raise MediaError(f"{blob.label}: corrupt or undecodable video data ({exc})") from exc
    if last_frame is None:
        raise MediaError(f"{blob.label}: no video frame could be decoded")
    # Fewer decodable frames than packets: reuse the last decoded frame for the missing tail.
    out = np.stack([f if f is not None else last_frame for f in frames])
    meta = VideoMetadata(
        fps=float(video_fps),
        total_num_frames=in_range,
        frames_indices=indices,
        sample_fps=count / max(in_range, 1e-6) * video_fps,
        temporal_patch_size=temporal_patch_size,
        width=int(decoded_hw[1]),
        height=int(decoded_hw[0]),
        resized_width=int(out.shape[2]),
        resized_height=int(out.shape[1]),
        duration=in_range / video_fps,
    )
    audio = None
    if with_audio:
        audio = _video_audio(blob, start, end, audio_sampling_rate)
    return VideoClip(out, meta, audio)


def _video_audio(blob: Any, start: float | None, end: float | None, sampling_rate: int) -> np.ndarray:
    try:
        wave, rate = decode_audio_stream(blob, kind="video audio")
    except MediaError as exc:
        if "no audio stream" in str(exc) or "without an audio track" in str(exc):
            raise MediaError(f"{blob.label}: the video has no audio track, which use_audio_in_video needs") from exc
        raise
    if start is not None or end is not None:  # librosa's offset / duration, at the native rate
        offset = float(start or 0.0)
        first = int(round(rate * offset))
        wave = wave[first:] if end is None else wave[first : first + int(round(rate * (float(end) - offset)))]
    if wave.size == 0:
        raise MediaError(f"{blob.label}: the video's audio track is empty")
    return resample(wave, rate, sampling_rate)


def _clip_from_array(frames: np.ndarray, fps: float, resize: bool, image_patch_size: int, min_pixels: Any,
                     max_pixels: Any, total_pixels: Any, temporal_patch_size: int) -> VideoClip:
    label = describe(frames, "video")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"{label}: frames must be a uint8 array [T, H, W, 3]")
    if frames.shape[0] == 0:
        raise MediaError(f"{label}: no frames")
    count = _ceil_by(frames.shape[0], FRAME_FACTOR)
    if count > frames.shape[0]:  # pad with the last frame, as qwen-omni-utils does for frame lists
        frames = np.concatenate([frames, np.repeat(frames[-1:], count - frames.shape[0], axis=0)])
    h, w = frames.shape[1:3]
    if resize:
        size = recipe_frame_size(h, w, count, image_patch_size=image_patch_size, min_pixels=min_pixels,
                                 max_pixels=max_pixels, total_pixels=total_pixels)
        frames = np.stack([_resize_frame_v1(f, *size) for f in frames])
    meta = VideoMetadata(fps=float(fps), total_num_frames=count, frames_indices=list(range(count)),
                         sample_fps=float(fps), temporal_patch_size=temporal_patch_size, width=w, height=h,
                         resized_width=frames.shape[2], resized_height=frames.shape[1], duration=count / fps)
    return VideoClip(frames, meta, None)


# --------------------------------------------------------------------------------------------
# processing


def _video_tensor(video: Any) -> torch.Tensor:
    """[T, C, H, W] tensor from THWC numpy / TCHW torch, RGB-converted as the video processor does."""
    if isinstance(video, VideoClip):
        video = video.frames
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise InputError(f"{describe(video, 'video')}: frames must be [T, H, W, C]")
        if not video.flags.writeable or not video.flags.c_contiguous:
            video = np.array(video, copy=True)  # torch needs a writable, contiguous buffer
        x = torch.from_numpy(video)
        if x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2).contiguous()
    elif isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise InputError("video tensor must be [T, C, H, W]")
        x = video.cpu()
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2).contiguous()
    else:
        raise InputError(f"unsupported video input {type(video).__name__}; load it with load_video first")
    if x.shape[0] == 0:
        raise MediaError("video has no frames")
    if x.dtype not in (torch.uint8, torch.float32, torch.float64):
        raise InputError(f"video frames must be uint8 or float, got {x.dtype}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 4:
        if not (x[:, 3] < 255).any():
            x = x[:, :3]
        else:  # blend the transparency layer onto white
            alpha = x[:, 3] / 255.0
            x = (1 - alpha[:, None]) * 255 + alpha[:, None] * x[:, :3]
    elif x.shape[1] != 3:
        raise InputError(f"video frames must have 1, 3 or 4 channels, got {x.shape[1]}")
    return x


def preprocess_video(
    video: Any,
    config: VisionConfig | None = None,
    *,
    fps: float | None = None,
    min_pixels: int = PROCESSOR_VIDEO_MIN_PIXELS,
    max_pixels: int = PROCESSOR_VIDEO_MAX_PIXELS,
    cap_pixels_per_frame: bool = False,
    max_video_tokens: int = MAX_VIDEO_TOKENS,
    as_float: bool = False,
    chunk_frames: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(pixel_values_videos float32 [N, 3 * tp * p * p], video_grid_thw int64 [1, 3], second_per_grid).

    `video`: uint8 or float [T, H, W, 3] frames (or a `VideoClip`). `fps` is the rate the frames
    were sampled at; the default is the clip's sample rate for a `VideoClip`, else the reference
    processor's default of 1.0. ``second_per_grid = temporal_patch_size / fps``.
    `as_float` casts uint8 frames to float32 first, which is what the reference recipe hands the
    processor (qwen-omni-utils returns float frames), so the resize runs in float without rounding.
    Frames are processed `chunk_frames` at a time to bound memory; the result does not depend on it.
    """
    cfg = config or default_vision_config()
    if fps is None:
        fps = video.metadata.sample_fps if isinstance(video, VideoClip) else PROCESSOR_DEFAULT_FPS
    if fps <= 0:
        raise InputError(f"video fps must be positive, got {fps}")
    x = _video_tensor(video)
    factor = cfg.factor
    limit = max_pixels
    if cap_pixels_per_frame:
        total_pixels = int(max_video_tokens * factor * factor * 0.9)
        limit = max(min(max_pixels, total_pixels * cfg.temporal_patch_size // x.shape[0]), int(min_pixels * 1.05))
    h, w = smart_resize(x.shape[-2], x.shape[-1], factor, min_pixels, limit)
    tp = cfg.temporal_patch_size
    if pad := -x.shape[0] % tp:  # repeat the last frame up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
    step = max(tp, chunk_frames - chunk_frames % tp)
    parts = []
    grid_t = 0
    for begin in range(0, x.shape[0], step):
        chunk = x[begin : begin + step]
        if as_float and chunk.dtype == torch.uint8:
            chunk = chunk.to(torch.float32)
        chunk = normalize(resize_like_torchvision(chunk, h, w, "bicubic"), cfg)
        flat, (gt, gh, gw) = patchify(chunk, cfg)
        parts.append(flat)
        grid_t += gt
    pixel_values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return pixel_values.contiguous(), torch.tensor([[grid_t, gh, gw]], dtype=torch.long), tp / fps
