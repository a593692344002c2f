"""Images: loading (png / jpeg / webp / gif / bytes / data URL / RGBA) and patch parity with
transformers' Qwen2VLImageProcessor (the torchvision backend transformers 5.17 uses by default)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from mm_synth import make_image, report
from PIL import Image

from thinktalk.multimodal.image import load_image, preprocess_images, recipe_resize_image


@pytest.mark.parametrize("key", ["image_png", "image_jpg", "image_webp", "image_gif", "image_rgba"])
def test_load_image_formats(mm_files, key):
    image = load_image(mm_files[key])
    assert image.mode == "RGB"
    with Image.open(mm_files[key]) as raw:
        assert image.size == raw.size
    same_from_bytes = load_image(mm_files[key].read_bytes())
    assert np.array_equal(np.asarray(image), np.asarray(same_from_bytes))


def test_lossless_png_and_data_url_round_trip(mm_files):
    expected = np.asarray(make_image(160, 120, seed=1))
    assert np.array_equal(np.asarray(load_image(mm_files["image_png"])), expected)
    url = "data:image/png;base64," + base64.b64encode(mm_files["image_png"].read_bytes()).decode()
    assert np.array_equal(np.asarray(load_image(url)), expected)
    assert np.array_equal(np.asarray(load_image(f"file://{mm_files['image_png']}")), expected)


def test_gif_takes_first_frame(mm_files):
    first = np.asarray(make_image(60, 40, seed=3).convert("RGB"))
    got = np.asarray(load_image(mm_files["image_gif"]))
    # gif is palettised: compare loosely against the first frame, and far from the second
    second = np.asarray(make_image(60, 40, seed=4))
    assert np.abs(got.astype(int) - first).mean() < np.abs(got.astype(int) - second).mean()


def test_rgba_is_composited_on_white(mm_files):
    rgba = make_image(64, 48, seed=2, mode="RGBA")
    got = np.asarray(load_image(mm_files["image_rgba"])).astype(np.float64)
    arr = np.asarray(rgba).astype(np.float64)
    alpha = arr[..., 3:] / 255
    expected = arr[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(got - expected).max() <= 1.0
    assert got[:, 0].min() >= 254  # fully transparent column -> white


def _check(hf_processor, images, name):
    ref = hf_processor.image_processor(images=images, return_tensors="pt")
    pixels, grid = preprocess_images(images)
    assert grid.dtype == torch.int64 and torch.equal(grid, ref["image_grid_thw"])
    assert pixels.dtype == torch.float32 and pixels.shape == ref["pixel_values"].shape
    err = (pixels - ref["pixel_values"]).abs().max().item()
    report(f"pixel_values {name}", err)
    assert err <= 1e-6
    return grid


def test_preprocess_640x480_matches_reference(hf_processor):
    grid = _check(hf_processor, [make_image(640, 480, seed=10)], "640x480")
    assert grid.tolist() == [[1, 30, 40]] and int(grid.prod()) // 4 == 300


def test_preprocess_two_images_odd_sizes(hf_processor, mm_files):
    images = [load_image(mm_files["image_jpg"]), make_image(33, 97, seed=11)]
    _check(hf_processor, images, "jpg 160x120 + 33x97")


@pytest.mark.parametrize("size", [(64, 64), (200, 30), (1, 1), (1000, 20)])
def test_preprocess_edge_sizes(hf_processor, size):
    _check(hf_processor, [make_image(*size, seed=12)], f"{size[0]}x{size[1]}")


def test_preprocess_accepts_arrays_and_rgba(hf_processor):
    array = np.array(make_image(50, 40, seed=13))
    ref = hf_processor.image_processor(images=[array], return_tensors="pt")
    pixels, _ = preprocess_images([array])
    assert torch.equal(pixels, ref["pixel_values"])
    rgba = make_image(50, 40, seed=14, mode="RGBA")  # given directly, transformers drops alpha; so do we
    ref = hf_processor.image_processor(images=[rgba], return_tensors="pt")
    assert torch.equal(preprocess_images([rgba])[0], ref["pixel_values"])


def test_recipe_resize_matches_qwen_utils_rule():
    # qwen-omni-utils' fetch_image: factor 28 smart-resize, Pillow bicubic
    image = make_image(640, 480, seed=15)
    resized = recipe_resize_image(image)
    assert resized.size == (644, 476)
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((644, 476), Image.Resampling.BICUBIC)))
