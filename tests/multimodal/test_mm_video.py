"""Video: frame sampling (qwen-omni-utils' rule), decoding, the recipe pre-resize, and patch parity
with transformers' Qwen2VLVideoProcessor.

transformers' own video loading cannot stand in for the recipe's (qwen-omni-utils samples and
resizes frames itself and hands the processor the frames), so this compares in three steps:
(1) the sampled frame indices against values worked out by hand from qwen-omni-utils' rule,
(2) our decoded frames against transformers' PyAV reader (`read_video_pyav`) at the same indices,
    and our pre-resize against `torchvision.transforms.functional.resize` (the call qwen-omni-utils
    makes),
(3) `preprocess_video` against `Qwen2VLVideoProcessor` given the very same frames (uint8, and float
    as the recipe passes them), with the size the Qwen3-Omni processor passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mm_synth import gradient_frames, report, tone

from thinktalk.multimodal.video import (
    PROCESSOR_VIDEO_MAX_PIXELS,
    PROCESSOR_VIDEO_MIN_PIXELS,
    load_video,
    preprocess_video,
    recipe_frame_size,
    sample_frame_count,
)


def test_sampling_rule_by_hand(mm_files):
    # 3 s at 10 fps = 30 frames -> 2 fps -> 6 frames at linspace(0, 29, 6).round()
    clip = load_video(mm_files["video"], resize=False)
    meta = clip.metadata
    assert meta.total_num_frames == 30 and meta.fps == 10.0
    assert meta.frames_indices == [0, 6, 12, 17, 23, 29]
    assert meta.sample_fps == pytest.approx(2.0) and meta.second_per_grid == pytest.approx(1.0)
    assert clip.frames.shape == (6, 64, 96, 3) and clip.frames.dtype == np.uint8
    # 1 s at 10 fps -> 2 frames, raised to min_frames 4 -> linspace(0, 9, 4)
    short = load_video(mm_files["video_short"], resize=False).metadata
    assert short.frames_indices == [0, 3, 6, 9] and short.sample_fps == pytest.approx(4.0)
    # 2 s at 6 fps -> 4 frames; fixed counts round to even; max_frames caps
    assert load_video(mm_files["video_silent"], resize=False).metadata.frames_indices == [0, 4, 7, 11]
    assert load_video(mm_files["video"], resize=False, nframes=7).metadata.frames_indices == [0, 4, 8, 12, 17, 21, 25, 29]
    assert sample_frame_count(3000, 30.0) == 200 and sample_frame_count(30000, 30.0) == 768
    assert sample_frame_count(30, 10.0, max_frames=5) == 4
    # a time range: 1.0 s .. 2.5 s of the 10 fps clip -> frames 10..25
    ranged = load_video(mm_files["video"], resize=False, start=1.0, end=2.5).metadata
    assert ranged.frames_indices == [10, 15, 20, 25]


def test_decoded_frames_match_transformers_pyav_reader(mm_files):
    from transformers.video_utils import read_video_pyav

    for key in ("video", "video_short"):
        clip = load_video(mm_files[key], resize=False)
        indices = clip.metadata.frames_indices
        ref, meta = read_video_pyav(str(mm_files[key]), sample_indices_fn=lambda metadata, _i=indices, **_: _i)
        assert np.array_equal(clip.frames, ref)
        # mp4 stores a frame count; mkv does not (transformers then reports 0), so we count packets
        assert meta.total_num_frames == (clip.metadata.total_num_frames if key == "video" else 0)


def test_recipe_resize_matches_torchvision(mm_files):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    raw = load_video(mm_files["video"], resize=False)
    clip = load_video(mm_files["video"])
    h, w = recipe_frame_size(64, 96, 6)
    assert (h, w) == (280, 392) and clip.frames.shape == (6, 280, 392, 3)
    expected = tvf.resize(torch.from_numpy(raw.frames).permute(0, 3, 1, 2), [h, w],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(torch.from_numpy(clip.frames).permute(0, 3, 1, 2), expected)
    # the total-pixel budget shrinks frames of long videos: 768 frames of 1080p get at most
    # 128000 * 28**2 * 0.9 / 768 * 2 = 235200 pixels each
    assert recipe_frame_size(1080, 1920, 768) == (336, 644)
    assert recipe_frame_size(1080, 1920, 8) == (560, 1008)  # else the 768 * 28**2 per-frame cap


def test_video_audio_track(mm_files):
    clip = load_video(mm_files["video"], with_audio=True)
    assert clip.audio is not None and clip.audio.dtype == np.float32
    assert abs(len(clip.audio) - 48000) <= 2048  # 3 s at 16 kHz, up to AAC padding


def _hf_video(hf_processor, frames):
    return hf_processor.video_processor(
        videos=[frames],
        size={"shortest_edge": PROCESSOR_VIDEO_MIN_PIXELS, "longest_edge": PROCESSOR_VIDEO_MAX_PIXELS},
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_preprocess_video_matches_reference(hf_processor, mm_files, dtype):
    frames = load_video(mm_files["video"]).frames.astype(dtype)
    ref = _hf_video(hf_processor, frames)
    pixels, grid, spg = preprocess_video(frames, fps=2.0)
    assert torch.equal(grid, ref["video_grid_thw"]) and grid.tolist() == [[3, 20, 28]]
    assert pixels.shape == ref["pixel_values_videos"].shape
    err = (pixels - ref["pixel_values_videos"]).abs().max().item()
    report(f"pixel_values_videos {dtype} frames", err)
    assert err <= 1e-5
    assert spg == 1.0


def test_preprocess_video_odd_frame_count_and_large_frames(hf_processor):
    frames = gradient_frames(5, 720, 1280, seed=8)  # odd T (last frame repeated), downscaled to the cap
    ref = _hf_video(hf_processor, frames)
    pixels, grid, _ = preprocess_video(frames, chunk_frames=2)
    assert torch.equal(grid, ref["video_grid_thw"])
    err = (pixels - ref["pixel_values_videos"]).abs().max().item()
    report("pixel_values_videos 5x720x1280 uint8", err)
    assert err <= 1e-5


def test_array_input_is_taken_as_sampled_frames():
    frames = gradient_frames(3, 40, 40)
    clip = load_video(frames, fps=2.0, resize=False)
    assert clip.frames.shape[0] == 4 and np.array_equal(clip.frames[3], frames[2])
    assert clip.metadata.sample_fps == 2.0 and clip.audio is None
    assert tone(0.1).shape == (1600,)
