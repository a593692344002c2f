"""Image input: load (Pillow) -> RGB -> smart resize -> normalise -> flattened vision patches.

`preprocess_images` reproduces transformers 5.17's ``Qwen2VLImageProcessor``, which is the
torchvision-backed ("fast") processor: the image becomes a uint8 CHW tensor, is resized with
``torchvision.transforms.v2.functional.resize(..., BICUBIC, antialias=True)`` - on CPU that is
PyTorch's native uint8 bicubic anti-aliased kernel, output rounded to uint8 - to the `smart_resize`
size (multiples of patch_size * merge_size, pixel count within [min_pixels, max_pixels]); then
``(x - mean / rescale) / (std / rescale)`` in float32 and the patch layout
``[t, h/m, w/m, m, m, C, temporal_patch, p, p]`` (an image is repeated `temporal_patch_size` times).
We call the same PyTorch kernel directly (no torchvision at runtime), so the values are identical.

The helpers `resize_like_torchvision`, `normalize` and `patchify` are shared with video.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ASSETS
from ..errors import InputError, MediaError
from .media import describe, resolve_source

# Pillow resample ids as stored in preprocessor configs -> torch interpolate modes we support.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}
_MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisionConfig:
    """The Qwen2VLImageProcessor fields of preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    image_std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    rescale_factor: float = 1 / 255
    resample: int = 3

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisionConfig":
        values: dict[str, Any] = {}
        for name in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample"):
            if data.get(name) is not None:
                values[name] = data[name]
        for name in ("image_mean", "image_std"):
            if data.get(name) is not None:
                values[name] = tuple(float(v) for v in data[name])
        size = data.get("size") or {}
        min_pixels = data.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = data.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels is not None:
            values["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            values["max_pixels"] = int(max_pixels)
        return cls(**values)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@lru_cache(maxsize=1)
def default_vision_config() -> VisionConfig:
    return VisionConfig.from_dict(json.loads((ASSETS / "preprocessor_config.json").read_text()))


# --------------------------------------------------------------------------------------------
# sizes


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """transformers' Qwen2-VL `smart_resize`: sides divisible by `factor`, area within bounds."""
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_qwen_utils(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-omni-utils' variant (used by the reference recipe before the processor runs)."""
    _check_aspect(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_aspect(height: int, width: int) -> None:
    if min(height, width) <= 0:
        raise MediaError(f"image has an empty size {width}x{height}")
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise MediaError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) is too extreme; "
            f"it must be at most {_MAX_ASPECT_RATIO}"
        )


# --------------------------------------------------------------------------------------------
# loading


def to_rgb(image: Any) -> Any:
    """RGB Pillow image; transparency is composited onto white (as qwen-omni-utils does for RGBA).

    qwen-omni-utils composites only RGBA and plainly converts other modes; we also composite
    LA / PA / palette images that carry transparency, where a plain conversion would expose
    whatever colour hides under the transparent pixels.
    """
    from PIL import Image

    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[3])
        return canvas
    return image.convert("RGB")


def load_image(source: Any) -> Any:
    """Load an image as an RGB `PIL.Image` (png, jpeg, webp, gif (first frame), bmp, tiff, ...).

    `source`: a path, ``file://`` or ``data:`` URL, bytes, a PIL image, or a uint8 HxWx3 array.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        label = describe(source, "image")
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise InputError(f"{label}: an image array must be uint8 HxW, HxWx3 or HxWx4")
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    blob = resolve_source(source, "image")
    try:
        with Image.open(io.BytesIO(blob.read_bytes())) as im:
            im.seek(0)  # animated gif / webp / apng: the first frame
            im.load()
            if im.width <= 0 or im.height <= 0:
                raise MediaError(f"{blob.label}: image has an empty size")
            return to_rgb(im)
    except MediaError:
        raise
    except UnidentifiedImageError as exc:
        raise MediaError(f"{blob.label}: not a recognised image format (unsupported or corrupt)") from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{blob.label}: image is too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"{blob.label}: corrupt or truncated image ({exc})") from exc


def recipe_resize_image(image: Any, patch_size: int = 14, merge_size: int = 2,
                        min_tokens: int = 4, max_tokens: int = 16384) -> Any:
    """What qwen-omni-utils' ``fetch_image`` does after loading: a Pillow bicubic resize to its own
    smart-resize grid (patch factor ``patch_size * merge_size``; the recipe's default patch is 14)."""
    from PIL import Image

    factor = patch_size * merge_size
    width, height = image.size
    h, w = smart_resize_qwen_utils(height, width, factor, min_tokens * factor**2, max_tokens * factor**2)
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------
# tensor ops shared with video


def resize_like_torchvision(x: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """`torchvision.transforms.v2.functional.resize(x, [h, w], mode, antialias=True)` for [..., C, H, W].

    uint8 on CPU: PyTorch's native uint8 kernel (rounded uint8 out); uint8 elsewhere: float,
    clamped and rounded back; float: float in and out, no clamping.
    """
    if tuple(x.shape[-2:]) == (height, width):
        return x
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    native = x.dtype == torch.uint8 and x.device.type == "cpu" and mode == "bicubic"
    if x.dtype in (torch.float32, torch.float64) or native:
        out = F.interpolate(flat, size=[height, width], mode=mode, align_corners=False, antialias=True)
    else:
        out = F.interpolate(flat.to(torch.float32), size=[height, width], mode=mode, align_corners=False, antialias=True)
        if x.dtype == torch.uint8 and mode == "bicubic":
            out = out.clamp_(0, 255)
        out = out.round_().to(x.dtype)
    return out.reshape(*lead, c, height, width)


def normalize(x: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """transformers' fused rescale + normalise: (x - mean / r) / (std / r) in float32."""
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = x.to(torch.float32)
    return x.sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def patchify(frames: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of temporal_patch_size) -> ([gt*gh*gw, C*tp*p*p], (gt, gh, gw))."""
    t, c, h, w = frames.shape
    p, tp, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def _image_tensor(image: Any, index: int) -> torch.Tensor:
    """uint8 [3, H, W] the way transformers turns the input into a tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.array(image, copy=True)
        return torch.from_numpy(arr).view(image.size[1], image.size[0], 3).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"image #{index}: a tensor image must be uint8 [3, H, W]")
        return image.cpu()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"image #{index}: an array image must be uint8 [H, W, 3] (got {image.dtype} {image.shape})")
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
    raise InputError(f"image #{index}: unsupported type {type(image).__name__}; load it with load_image first")


def preprocess_images(
    images: Sequence[Any],
    config: VisionConfig | None = None,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values float32 [N_patches, 3 * tp * p * p], image_grid_thw int64 [n_images, 3])."""
    cfg = config or default_vision_config()
    if not isinstance(images, (list, tuple)):
        images = [images]
    min_pixels = cfg.min_pixels if min_pixels is None else min_pixels
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    mode = _RESAMPLE_MODES.get(int(cfg.resample), "bicubic")
    patches, grids = [], []
    for i, image in enumerate(images):
        x = _image_tensor(image, i)
        h, w = smart_resize(x.shape[-2], x.shape[-1], cfg.factor, min_pixels, max_pixels)
        x = resize_like_torchvision(x.unsqueeze(0), h, w, mode)[0]
        x = normalize(x, cfg)
        frames = x.unsqueeze(0).expand(cfg.temporal_patch_size, -1, -1, -1)
        flat, grid = patchify(frames, cfg)
        patches.append(flat)
        grids.append(grid)
    if not patches:
        raise InputError("no images given")
    pixel_values = patches[0] if len(patches) == 1 else torch.cat(patches, dim=0)
    return pixel_values.contiguous(), torch.tensor(grids, dtype=torch.long)
