"""Chat template, tokenizer and multimodal placeholder expansion: our Qwen3OmniMoeProcessor.

`OmniProcessor.__call__` returns the same keys and values as transformers 5.17's
``Qwen3OmniMoeProcessor(text, images, videos, audio, return_tensors="pt", padding=True)``:
each ``<|audio_pad|>`` / ``<|image_pad|>`` / ``<|video_pad|>`` of the text is repeated to the number
of encoder outputs of its item (audio: `audio_token_count` of the mel length; image / video:
``t * h * w / merge_size**2``); with `use_audio_in_video`, each
``<|vision_start|><|video_pad|><|vision_end|>`` becomes
``<|vision_start|><|audio_start|>`` + video and audio pads interleaved by time +
``<|audio_end|><|vision_end|>``, where video token k of temporal index t sits at time
``t * second_per_grid * position_id_per_seconds`` and audio token j at j (a video token goes first on
ties). Batches are padded on the left with the pad token.

`OmniProcessor.prepare_messages` is the reference recipe end to end (qwen-omni-utils'
``process_mm_info`` + ``apply_chat_template`` + the processor); see its docstring for the choices.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..errors import InputError, MediaError
from .audio import DEFAULT_N_WINDOW, MelConfig, audio_token_count, load_audio, log_mel_features, stack_clip_features
from .media_cache import MediaCache, PreparedClip, PreparedImage
from .tokenizer import load_tokenizer
from .image import VisionConfig, load_image, preprocess_images, recipe_resize_image
from .video import (
    PROCESSOR_DEFAULT_FPS,
    PROCESSOR_VIDEO_MAX_PIXELS,
    PROCESSOR_VIDEO_MIN_PIXELS,
    VideoClip,
    load_video,
    preprocess_video,
)

# Qwen3OmniMoeProcessor's defaults, used when the checkpoint has no config to read them from.
DEFAULT_POSITION_ID_PER_SECONDS = 13.0

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


# --------------------------------------------------------------------------------------------
# chat template


def _jinja_environment() -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (assistant-mask marker)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _read_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | dict[str, str] | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        value = json.loads(json_file.read_text()).get("chat_template")
    else:
        value = tokenizer_config.get("chat_template")
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        return {item["name"]: item["template"] for item in value}
    return value


# --------------------------------------------------------------------------------------------
# message parts


def part_kind(part: Any) -> str | None:
    """'image' / 'audio' / 'video' / 'text' the way the chat template classifies a content part."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "image" or "image" in part or "image_url" in part:
        return "image"
    if kind == "audio" or "audio" in part or "audio_url" in part:
        return "audio"
    if kind == "video" or "video" in part:
        return "video"
    if kind == "text":
        return "text"
    return None


def _part_source(part: dict[str, Any], kind: str) -> Any:
    for key in (kind, f"{kind}_url", "url", "path", "base64"):
        if key in part and part[key] is not None:
            value = part[key]
            if isinstance(value, dict) and "url" in value:
                value = value["url"]
            return value
    raise InputError(f"a {kind} content part has no {kind!r} (or url / path) field")


class OmniProcessor:
    """Tokenizer + chat template + image / video / audio preprocessing for Qwen3-Omni."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | dict[str, str] | None,
        special_tokens: dict[str, str],
        vision: VisionConfig,
        mel: MelConfig,
        *,
        video_vision: VisionConfig | None = None,
        position_id_per_seconds: float = DEFAULT_POSITION_ID_PER_SECONDS,
        n_window: int = DEFAULT_N_WINDOW,
        use_sampled_fps: bool = True,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.vision = vision
        self.video_vision = video_vision or vision
        self.mel = mel
        self.position_id_per_seconds = position_id_per_seconds
        self.n_window = n_window
        self.use_sampled_fps = use_sampled_fps
        self._env = _jinja_environment()
        self._templates: dict[str, Any] = {}
        st = self.special_tokens
        self.image_token = st.get("image_token", "<|image_pad|>")
        self.audio_token = st.get("audio_token", "<|audio_pad|>")
        self.video_token = st.get("video_token", "<|video_pad|>")
        self.vision_bos_token = st.get("vision_bos_token", "<|vision_start|>")
        self.vision_eos_token = st.get("vision_eos_token", "<|vision_end|>")
        self.audio_bos_token = st.get("audio_bos_token", "<|audio_start|>")
        self.audio_eos_token = st.get("audio_eos_token", "<|audio_end|>")
        self.eos_token = st.get("eos_token")
        self.pad_token = st.get("pad_token")
        for name in ("image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
                     "audio_bos_token", "audio_eos_token"):
            if tokenizer.token_to_id(getattr(self, name)) is None:
                raise ConfigError(f"tokenizer has no {name} {getattr(self, name)!r}")
        self.pad_token_id = tokenizer.token_to_id(self.pad_token) if self.pad_token else None
        self.eos_token_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self._mm_pattern = re.compile("|".join(re.escape(t) for t in (self.audio_token, self.image_token, self.video_token)))

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> "OmniProcessor":
        """Read tokenizer.json (or vocab.json + merges.txt), tokenizer_config.json, the chat template (chat_template.jinja,
        chat_template.json or tokenizer_config.json), preprocessor_config.json and, when present,
        config.json (or the shipped config_instruct.json) from a checkpoint folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not a folder")
        tokenizer = load_tokenizer(folder)
        tok_cfg_file = folder / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}
        special: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            value = _token_text(tok_cfg.get(key))
            if value is not None:
                special[key] = value
        for key, value in (tok_cfg.get("extra_special_tokens") or {}).items():
            if isinstance(value, (str, dict)) and _token_text(value) is not None:
                special[key] = _token_text(value)
        for key in ("image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
                    "audio_bos_token", "audio_eos_token"):
            if key not in special and tok_cfg.get(key):
                special[key] = _token_text(tok_cfg[key])
        pre_file = folder / "preprocessor_config.json"
        if not pre_file.is_file():
            raise ConfigError(f"{folder}: no preprocessor_config.json")
        pre = json.loads(pre_file.read_text())
        vision = VisionConfig.from_dict(pre)
        video_file = folder / "video_preprocessor_config.json"
        video_vision = VisionConfig.from_dict(json.loads(video_file.read_text())) if video_file.is_file() else None
        mel = MelConfig.from_dict(pre)
        options: dict[str, Any] = {}
        for name in ("config.json", "config_instruct.json"):
            cfg_file = folder / name
            if cfg_file.is_file():
                thinker = json.loads(cfg_file.read_text()).get("thinker_config") or {}
                if thinker.get("position_id_per_seconds") is not None:
                    options["position_id_per_seconds"] = thinker["position_id_per_seconds"]
                n_window = (thinker.get("audio_config") or {}).get("n_window")
                if n_window is not None:
                    options["n_window"] = n_window
                break
        options.update(kwargs)
        return cls(tokenizer, _read_chat_template(folder, tok_cfg), special, vision, mel,
                   video_vision=video_vision, **options)

    # -- text --------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        value = self.tokenizer.token_to_id(token)
        if value is None:
            raise InputError(f"unknown token {token!r}")
        return value

    @property
    def image_token_id(self) -> int:
        return self.token_id(self.image_token)

    @property
    def audio_token_id(self) -> int:
        return self.token_id(self.audio_token)

    @property
    def video_token_id(self) -> int:
        return self.token_id(self.video_token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(_valid_unicode(text), add_special_tokens=True).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Token ids (list / numpy / tensor) -> text; a 2-D input gives a list of texts."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row, skip_special_tokens) for row in ids]
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(rows, torch.Tensor) and rows.dim() == 1:
            rows = rows[None]
        return [self.decode(row, skip_special_tokens) for row in rows]

    # -- chat template -------------------------------------------------------------------------
    def _compiled(self, template: str) -> Any:
        if template not in self._templates:
            self._templates[template] = self._env.from_string(template)
        return self._templates[template]

    def _template_text(self, chat_template: str | None) -> str:
        templates = self.chat_template
        if chat_template is not None:
            if isinstance(templates, dict) and chat_template in templates:
                return templates[chat_template]
            return chat_template
        if isinstance(templates, dict):
            if "default" not in templates:
                raise ConfigError(f"several chat templates ({', '.join(templates)}) and none named 'default'")
            return templates["default"]
        if templates is None:
            raise ConfigError("this checkpoint has no chat template")
        return templates

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[str]:
        """Render the chat template as ``processor.apply_chat_template(..., tokenize=False)`` does.

        A list of conversations renders to a list of strings. OpenAI-style
        ``{"type": "image_url", "image_url": {"url": ...}}`` parts are rewritten to
        ``{"type": "image", "url": ...}`` first, as transformers does. `enable_thinking` is passed to
        the template only when not None.
        """
        import jinja2

        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = messages if batched else [messages]
        template = self._compiled(self._template_text(chat_template))
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, dict):
                    raise InputError("tools must be JSON-schema dicts")
        variables = {**self.special_tokens, **kwargs}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        rendered = []
        for conversation in conversations:
            if not isinstance(conversation, (list, tuple)) or not conversation:
                raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
            normalised = [_normalise_message(m) for m in conversation]
            try:
                rendered.append(template.render(messages=normalised, tools=tools, documents=documents,
                                                add_generation_prompt=add_generation_prompt, **variables))
            except jinja2.exceptions.TemplateError as exc:
                raise InputError(f"chat template: {exc}") from exc
            except (AttributeError, TypeError, KeyError) as exc:
                raise InputError(f"messages do not fit the chat template: {exc}") from exc
        return rendered if batched else rendered[0]

    # -- processing ------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        audio: Any = None,
        videos: Any = None,
        *,
        use_audio_in_video: bool = False,
        padding: bool | str = True,
        padding_side: str = "left",
        fps: float | Sequence[float] | None = None,
        return_tensors: str = "pt",
        video_min_pixels: int = PROCESSOR_VIDEO_MIN_PIXELS,
        video_max_pixels: int = PROCESSOR_VIDEO_MAX_PIXELS,
        video_float: bool = False,
        audio_per_clip: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompts and preprocess their media into model inputs (torch tensors).

        `images`: PIL images / uint8 arrays (or anything `load_image` reads); `audio`: 16 kHz mono
        arrays (or anything `load_audio` reads), in prompt order - with `use_audio_in_video`, a
        video's audio takes its place in that order; `videos`: `VideoClip`s or uint8 [T, H, W, 3]
        frames (or anything `load_video` reads). Nested per-prompt lists are flattened.
        `fps`: the frames' sample rate, one value or one per video; by default a `VideoClip`'s own
        sample rate, else 1.0 (the reference processor's default; ``second_per_grid = 2 / fps``).
        `padding` pads prompts of different lengths on `padding_side` ("left" as the reference);
        with ``padding=False`` they must be of equal length. `audio_per_clip`: each clip's mel
        features as if it came alone (see `log_mel_features`), not the reference's batch.
        `images` and `audio` may hold `PreparedImage` / `PreparedClip` items (already processed, by
        `prepare_messages` with a `MediaCache`; clips only with `audio_per_clip` or alone); their
        digests then come along as ``item_digests`` (see `items.media_items`).
        """
        if return_tensors not in ("pt", None):
            raise InputError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if text is None:
            raise InputError("text is required")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a list of strings")
        images = _flatten(images)
        audio = _flatten(audio)
        videos = _flatten(videos)
        self._check_counts(texts, len(images), len(audio), len(videos), use_audio_in_video)

        out: dict[str, torch.Tensor] = {}
        audio_digests: list[bytes | None] = [None] * len(audio)  # known for prepared items
        image_digests: list[bytes | None] = [None] * len(images)
        audio_lengths: list[int] = []
        audio_inputs: dict[str, torch.Tensor] = {}
        if audio:
            def wave(a: Any) -> np.ndarray:
                return a if isinstance(a, np.ndarray) and a.ndim == 1 else load_audio(a, self.mel.sampling_rate)

            if any(isinstance(a, PreparedClip) for a in audio):
                if not audio_per_clip and len(audio) > 1:
                    raise InputError("prepared audio clips need audio_per_clip (their features are computed alone)")
                alone = [(a.features, a.mask) if isinstance(a, PreparedClip) else log_mel_features([wave(a)], self.mel)
                         for a in audio]
                features, mask = stack_clip_features(alone) if len(alone) > 1 else (alone[0][0].clone(), alone[0][1].clone())
                audio_digests = [a.digest if isinstance(a, PreparedClip) else None for a in audio]
            else:
                features, mask = log_mel_features([wave(a) for a in audio], self.mel, per_clip=audio_per_clip)
            audio_inputs = {"feature_attention_mask": mask, "input_features": features}
            audio_lengths = [int(n) for n in audio_token_count(mask.sum(-1), self.n_window)]
        image_grids: list[list[int]] = []
        if images:
            if any(isinstance(im, PreparedImage) for im in images):  # images are processed one by one anyway
                done = [im if isinstance(im, PreparedImage) else self._prepare_image(im) for im in images]
                pixel_values = torch.cat([im.pixel_values for im in done])  # a copy: the cache keeps its own
                grid = torch.cat([im.grid_thw for im in done])
                image_digests = [im.digest for im in done]
            else:
                loaded = [im if _is_image_like(im) else load_image(im) for im in images]
                pixel_values, grid = preprocess_images(loaded, self.vision)
            out["pixel_values"] = pixel_values
            out["image_grid_thw"] = grid
            image_grids = grid.tolist()
        video_grids: list[list[int]] = []
        seconds: list[float] = []
        if videos:
            clips = [v if isinstance(v, (VideoClip, np.ndarray, torch.Tensor)) else load_video(v) for v in videos]
            rates = self._video_rates(clips, fps)
            pixels, grids = [], []
            for clip, rate in zip(clips, rates, strict=True):
                pv, grid, spg = preprocess_video(clip, self.video_vision, fps=rate, min_pixels=video_min_pixels,
                                                 max_pixels=video_max_pixels, as_float=video_float)
                pixels.append(pv)
                grids.append(grid)
                seconds.append(spg)
            out["pixel_values_videos"] = pixels[0] if len(pixels) == 1 else torch.cat(pixels, dim=0)
            out["video_grid_thw"] = torch.cat(grids, dim=0)
            out["video_second_per_grid"] = torch.tensor(seconds)
            video_grids = out["video_grid_thw"].tolist()

        expanded = self.expand_placeholders(texts, audio_lengths, image_grids, video_grids, seconds, use_audio_in_video)
        result = self._tokenize(expanded, padding, padding_side)
        result.update(out)
        result.update(audio_inputs)
        if any(d is not None for d in audio_digests + image_digests):  # items.media_items' order
            result["item_digests"] = audio_digests + image_digests + [None] * len(videos)
        return result

    def _prepare_image(self, image: Any) -> PreparedImage:
        loaded = image if _is_image_like(image) else load_image(image)
        return PreparedImage.of(*preprocess_images([loaded], self.vision))

    def _check_counts(self, texts: list[str], n_images: int, n_audio: int, n_videos: int, use_audio_in_video: bool) -> None:
        """Fail before any media work when the placeholders and the inputs do not pair up."""
        found = {"image": 0, "audio": 0, "video": 0}
        for sample in texts:
            found["image"] += sample.count(self.image_token)
            found["audio"] += sample.count(self.audio_token)
            found["video"] += sample.count(self.video_token)
        if use_audio_in_video:
            found["audio"] += found["video"]
        for kind, given in (("image", n_images), ("audio", n_audio), ("video", n_videos)):
            if found[kind] != given:
                note = " (with use_audio_in_video each video also takes one audio)" if kind == "audio" and use_audio_in_video else ""
                raise InputError(
                    f"the prompts have {found[kind]} {kind} placeholders but {given} {kind} inputs were given{note}"
                )

    def _video_rates(self, clips: list[Any], fps: Any) -> list[float]:
        if fps is None:
            return [c.metadata.sample_fps if isinstance(c, VideoClip) else PROCESSOR_DEFAULT_FPS for c in clips]
        if isinstance(fps, (int, float)):
            return [float(fps)] * len(clips)
        rates = [float(f) for f in fps]
        if len(rates) != len(clips):
            raise InputError(f"got {len(rates)} fps values for {len(clips)} videos")
        return rates

    def _tokenize(self, texts: list[str], padding: bool | str, padding_side: str) -> dict[str, torch.Tensor]:
        texts = [_valid_unicode(t) for t in texts]
        rows = [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        longest = max(len(r) for r in rows)
        if padding in (False, "do_not_pad") and any(len(r) != longest for r in rows):
            raise InputError("prompts have different lengths; pass padding=True to pad them")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if any(len(r) != longest for r in rows) and self.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; cannot pad a batch")
        ids = torch.full((len(rows), longest), self.pad_token_id if self.pad_token_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            sl = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
            ids[i, sl] = torch.tensor(row, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def expand_placeholders(
        self,
        texts: Sequence[str],
        audio_lengths: Sequence[int],
        image_grids: Sequence[Sequence[int]],
        video_grids: Sequence[Sequence[int]],
        second_per_grids: Sequence[float],
        use_audio_in_video: bool = False,
    ) -> list[str]:
        """Repeat each media placeholder to its token count (see the module docstring)."""
        image_merge = self.vision.merge_size**2
        video_merge = self.video_vision.merge_size
        counters = {"audio": 0, "image": 0, "video": 0}
        result = []
        for sample_index, sample in enumerate(texts):
            pieces: list[str] = []
            pos = 0
            for match in self._mm_pattern.finditer(sample):
                if match.start() < pos:  # consumed as part of an audio-in-video block
                    continue
                token = match.group()
                before = sample[pos : match.start()]
                pos = match.end()
                if token == self.audio_token:
                    n = self._take(audio_lengths, counters, "audio", sample_index)
                    pieces += [before, self.audio_token * n]
                elif token == self.image_token:
                    grid = self._take(image_grids, counters, "image", sample_index)
                    pieces += [before, self.image_token * (int(np.prod(grid)) // image_merge)]
                elif not use_audio_in_video:
                    grid = self._take(video_grids, counters, "video", sample_index)
                    pieces += [before, self.video_token * (int(np.prod(grid)) // video_merge**2)]
                else:
                    if not before.endswith(self.vision_bos_token) or not sample.startswith(self.vision_eos_token, pos):
                        raise InputError(
                            f"prompt {sample_index}: with use_audio_in_video every {self.video_token} must be "
                            f"written as {self.vision_bos_token}{self.video_token}{self.vision_eos_token}"
                        )
                    n_audio = self._take(audio_lengths, counters, "audio", sample_index)
                    grid = self._take(video_grids, counters, "video", sample_index)
                    spg = second_per_grids[counters["video"] - 1]
                    pieces += [before[: -len(self.vision_bos_token)],
                               self._audio_video_block(grid, n_audio, spg, video_merge)]
                    pos += len(self.vision_eos_token)
            pieces.append(sample[pos:])
            result.append("".join(pieces))
        for kind, given in (("audio", audio_lengths), ("image", image_grids), ("video", video_grids)):
            if counters[kind] != len(given):
                note = " (with use_audio_in_video each video also takes one audio)" if kind == "audio" and use_audio_in_video else ""
                raise InputError(
                    f"the prompts have {counters[kind]} {kind} placeholders but {len(given)} {kind} inputs were given{note}"
                )
        return result

    @staticmethod
    def _take(items: Sequence[Any], counters: dict[str, int], kind: str, sample_index: int) -> Any:
        index = counters[kind]
        if index >= len(items):
            raise InputError(
                f"prompt {sample_index} has more {kind} placeholders than the {len(items)} {kind} inputs given"
            )
        counters[kind] = index + 1
        return items[index]

    def _audio_video_block(self, grid: Sequence[int], n_audio: int, second_per_grid: float, merge: int) -> str:
        t, h, w = (int(v) for v in grid)
        per_frame = (h // merge) * (w // merge)
        video_times = np.repeat(np.arange(t), per_frame) * second_per_grid * self.position_id_per_seconds
        # Audio token j sits at time j. Merging the two sorted streams with video first on ties puts
        # before video token k exactly the audio tokens with j < its time.
        audio_before = np.minimum(np.searchsorted(np.arange(n_audio), video_times, side="left"), n_audio)
        parts = [self.vision_bos_token, self.audio_bos_token]
        placed = 0
        run_start = 0  # first video token of the current run (no audio between its tokens)
        for k in range(1, len(video_times) + 1):
            if k == len(video_times) or audio_before[k] != audio_before[run_start]:
                if audio_before[run_start] != placed:
                    parts.append(self.audio_token * int(audio_before[run_start] - placed))
                    placed = int(audio_before[run_start])
                parts.append(self.video_token * (k - run_start))
                run_start = k
        parts.append(self.audio_token * (n_audio - placed))
        parts += [self.audio_eos_token, self.vision_eos_token]
        return "".join(parts)

    # -- the recipe end to end -------------------------------------------------------------------
    def load_media(
        self,
        conversations: list[list[dict[str, Any]]],
        use_audio_in_video: bool = False,
        *,
        recipe_resize: bool = True,
        cache: MediaCache | None = None,
        audio_per_clip: bool = False,
    ) -> tuple[list[np.ndarray], list[Any], list[VideoClip]]:
        """Load every media part of the conversations in order: (audios, images, videos).

        Mirrors qwen-omni-utils' ``process_mm_info``: images get its Pillow pre-resize when
        `recipe_resize`; videos are sampled at 2 fps and pre-resized (`load_video`); audio is
        16 kHz mono; with `use_audio_in_video` each video's audio track joins the audio list at the
        video's place. Part options honoured: image ``min_pixels`` / ``max_pixels``; video ``fps``,
        ``nframes``, ``min_frames``, ``max_frames``, ``min_pixels``, ``max_pixels``,
        ``total_pixels``, ``video_start``, ``video_end``; audio ``audio_start``, ``audio_end``.
        With a `cache` (media_cache.py), images come back processed (`PreparedImage`), and so do
        audio clips with `audio_per_clip` (`PreparedClip`), each done once while the cache holds it.
        """
        audios: list[np.ndarray] = []
        images: list[Any] = []
        videos: list[VideoClip] = []
        for conversation in conversations:
            for message in conversation:
                content = message.get("content") if isinstance(message, dict) else None
                if not isinstance(content, list):
                    continue
                for part in content:
                    kind = part_kind(part)
                    if kind == "image":
                        source = _part_source(part, "image")

                        def image(source=source, part=part) -> Any:
                            loaded = load_image(source)
                            return _recipe_image(loaded, part) if recipe_resize else loaded

                        if cache is None:
                            images.append(image())
                        else:
                            options = (recipe_resize, part.get("min_pixels"), part.get("max_pixels"))
                            images.append(cache.get("image", source, options, lambda image=image: self._prepare_image(image())))
                    elif kind == "audio":
                        source, start, end = _part_source(part, "audio"), part.get("audio_start"), part.get("audio_end")

                        def clip(source=source, start=start, end=end) -> np.ndarray:
                            return load_audio(source, self.mel.sampling_rate, start=start, end=end)

                        if cache is None or not audio_per_clip or self.mel.dither != 0.0:  # dither: random each call
                            audios.append(clip())
                        else:
                            audios.append(cache.get("audio", source, (start, end),
                                                    lambda clip=clip: PreparedClip.of(*log_mel_features([clip()], self.mel))))
                    elif kind == "video":
                        source = _part_source(part, "video")
                        if isinstance(source, (list, tuple)):  # a video given as a list of frames
                            source = _frames_from_images(source, part, recipe_resize)
                            rate = part.get("sample_fps", 2.0)
                        else:
                            rate = part.get("fps", 2.0)
                        clip = load_video(
                            source,
                            fps=rate,
                            nframes=part.get("nframes"),
                            min_frames=part.get("min_frames", 4),
                            max_frames=part.get("max_frames"),
                            start=part.get("video_start"),
                            end=part.get("video_end"),
                            resize=recipe_resize,
                            min_pixels=part.get("min_pixels"),
                            max_pixels=part.get("max_pixels"),
                            total_pixels=part.get("total_pixels"),
                            with_audio=use_audio_in_video,
                            audio_sampling_rate=self.mel.sampling_rate,
                            temporal_patch_size=self.video_vision.temporal_patch_size,
                        )
                        videos.append(clip)
                        if use_audio_in_video:
                            if clip.audio is None:
                                raise MediaError("use_audio_in_video: a video given as frames has no audio track")
                            audios.append(clip.audio)
        return audios, images, videos

    def prepare_messages(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        use_audio_in_video: bool = False,
        *,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        recipe_resize: bool = True,
        padding_side: str = "left",
        audio_per_clip: bool = False,
        cache: MediaCache | None = None,
    ) -> dict[str, torch.Tensor]:
        """HF-recipe messages -> model inputs: load the media, render the template, process.

        Content parts: ``{"type": "text", "text": ...}``, ``{"type": "image", "image": path | bytes |
        PIL image | data URL}``, ``{"type": "audio", "audio": path | bytes | array (16 kHz) |
        (array, rate)}``, ``{"type": "video", "video": path | bytes | data URL}`` (also ``url`` /
        ``path`` / ``*_url`` keys). A list of conversations gives a left-padded batch.

        Same as ``process_mm_info`` + ``apply_chat_template`` + the processor with two deliberate
        differences, both switchable: the frames' true sample rate is passed as the video fps
        (``second_per_grid = 2 / sample_fps`` = 1.0 at 2 fps, where the recipe leaves the processor's
        1.0 fps default, i.e. 2.0; set ``use_sampled_fps=False`` on the processor for the recipe's
        value), and `recipe_resize=False` skips qwen-omni-utils' pre-resize of images and frames.
        `audio_per_clip` computes each audio clip's features alone (a third, opt-in difference).
        `cache`: a `MediaCache` kept across the calls of one conversation: each image and (with
        `audio_per_clip`) clip is processed once, for the same results; it then keeps only this
        call's media.
        """
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        text = self.apply_chat_template(conversations, add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking, tools=tools)
        audios, images, videos = self.load_media(conversations, use_audio_in_video, recipe_resize=recipe_resize,
                                                 cache=cache, audio_per_clip=audio_per_clip)
        fps = None if self.use_sampled_fps else PROCESSOR_DEFAULT_FPS
        inputs = self(text, images=images or None, audio=audios or None, videos=videos or None,
                      use_audio_in_video=use_audio_in_video, fps=fps, padding=True, padding_side=padding_side,
                      video_float=recipe_resize, audio_per_clip=audio_per_clip)
        if cache is not None:
            cache.finish_call()
        return inputs


def _frames_from_images(items: Sequence[Any], part: dict[str, Any], recipe_resize: bool) -> np.ndarray:
    """A video given as images (qwen-omni-utils runs each through fetch_image first)."""
    frames = []
    for item in items:
        image = load_image(item)
        frames.append(np.asarray(_recipe_image(image, part) if recipe_resize else image))
    if not frames:
        raise InputError("a video given as a list of frames has no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise InputError("the frames of a video given as a list of images must all have the same size")
    return np.stack(frames)


def _recipe_image(image: Any, part: dict[str, Any]) -> Any:
    from .video import RECIPE_IMAGE_PATCH_SIZE, RECIPE_MERGE_SIZE

    factor = RECIPE_IMAGE_PATCH_SIZE * RECIPE_MERGE_SIZE
    kwargs = {}
    if part.get("min_pixels") is not None:
        kwargs["min_tokens"] = part["min_pixels"] / factor**2
    if part.get("max_pixels") is not None:
        kwargs["max_tokens"] = part["max_pixels"] / factor**2
    return recipe_resize_image(image, RECIPE_IMAGE_PATCH_SIZE, RECIPE_MERGE_SIZE, **kwargs)


def _normalise_message(message: Any) -> Any:
    if not isinstance(message, dict):
        raise InputError(f"each message must be a dict with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
            info = part["image_url"]
            parts.append({"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info})
        else:
            parts.append(part)
    return {**message, "content": parts}


def _flatten(items: Any) -> list[Any]:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], np.ndarray) and np.isscalar(items[1]):
        return [items]  # one (array, sample_rate) audio
    flat: list[Any] = []
    for item in items:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def _is_image_like(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return isinstance(item, (np.ndarray, torch.Tensor))
    return isinstance(item, (Image.Image, np.ndarray, torch.Tensor))


def _valid_unicode(text: str) -> str:
    """The tokenizer takes only text that is valid Unicode; JSON can carry lone surrogates ("\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"the text is not valid Unicode ({exc.reason} at character {exc.start})") from None
    return text
