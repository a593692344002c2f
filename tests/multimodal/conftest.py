"""Fixtures for the multimodal parity tests.

The reference is transformers' `Qwen3OmniMoeProcessor`, loaded offline from a temp folder holding
copies of thinktalk/assets/qwen3_omni (config_instruct.json copied as config.json). All media are
synthesised here (sine tones, gradients, noise) and written with PyAV / Pillow into tmp folders.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
from pathlib import Path

import pytest
from mm_synth import AUDIO_FORMATS, gradient_frames, make_image, tone, write_audio, write_video

from thinktalk.config import ASSETS, reference_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------------
# reference objects


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_omni_hf")
    for item in ASSETS.iterdir():
        if item.is_file():
            shutil.copyfile(item, folder / item.name)
    shutil.copyfile(ASSETS / "config_instruct.json", folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def hf_processor(hf_folder):
    pytest.importorskip("torchvision")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoProcessor.from_pretrained(str(hf_folder))


@pytest.fixture(scope="session")
def processor():
    from thinktalk.multimodal.processor import OmniProcessor

    return OmniProcessor.from_pretrained(ASSETS)


@pytest.fixture(scope="session")
def thinker_config():
    return reference_config().thinker_config


@pytest.fixture(scope="session")
def hf_rope_index(hf_folder):
    """transformers' `get_rope_index`, bound to a stand-in object.

    The method only reads `self.config`, `self.spatial_merge_size` and
    `self.get_llm_pos_ids_for_vision`, so no (30B) model needs to be built to call it.
    """
    pytest.importorskip("transformers")
    from transformers import AutoConfig
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cls = modeling.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    cfg = AutoConfig.from_pretrained(str(hf_folder)).thinker_config
    stub = types.SimpleNamespace(config=cfg, spatial_merge_size=cfg.vision_config.spatial_merge_size)
    stub.get_llm_pos_ids_for_vision = functools.partial(cls.get_llm_pos_ids_for_vision, stub)
    return functools.partial(cls.get_rope_index, stub)


@pytest.fixture(scope="session")
def mm_files(tmp_path_factory) -> dict[str, Path]:
    """Small media files shared by the tests."""
    root = tmp_path_factory.mktemp("mm_media")
    files: dict[str, Path] = {}
    for suffix in AUDIO_FORMATS:
        files[f"audio_{suffix}"] = write_audio(root / f"tone.{suffix}", tone(2.0, 16000), 16000)
    files["audio_stereo_44k"] = write_audio(root / "stereo44.wav", tone(1.5, 44100, channels=2), 44100)
    files["audio_5s"] = write_audio(root / "five.wav", tone(5.0, 16000, freq=300), 16000)
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")):
        path = root / f"image.{ext}"
        make_image(160, 120, seed=1).save(path, fmt)
        files[f"image_{ext}"] = path
    rgba = root / "rgba.png"
    make_image(64, 48, seed=2, mode="RGBA").save(rgba)
    files["image_rgba"] = rgba
    gif = root / "anim.gif"
    first, second = make_image(60, 40, seed=3), make_image(60, 40, seed=4)
    first.save(gif, save_all=True, append_images=[second], duration=100, loop=0)
    files["image_gif"] = gif
    frames = gradient_frames(30, 64, 96, seed=5)
    files["video"] = write_video(root / "clip.mp4", frames, fps=10, audio=tone(3.0, 16000, freq=330))
    files["video_silent"] = write_video(root / "silent.mp4", gradient_frames(12, 48, 64, seed=6), fps=6)
    files["video_short"] = write_video(root / "short.mkv", gradient_frames(10, 40, 56, seed=7), fps=10, codec="libx264")
    return files
