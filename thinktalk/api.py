"""The Python API: load a checkpoint, give it messages, get text (and speech) back.

    from thinktalk import Omni
    omni = Omni.load("/models/Qwen3-Omni-30B-A3B-Instruct")       # or Omni.load() for the demo
    out = omni.generate([{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is this?"}]}],
        speaker="Ethan")
    out.text, out.audio  # str, float32 waveform at out.sample_rate (24 kHz) or None

Messages use the Hugging Face recipe's content parts: text, image, audio and video, each given
as a path, bytes or (audio) an array.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .config import OmniConfig
from .engine import Engine, EngineConfig
from .errors import InputError
from .models.thinker import MultimodalInputs
from .request import Request, SamplingParams, sampling_from
from .weights.tiny import demo_model_path, is_tiny_random

if TYPE_CHECKING:
    from .speech_stage import SpeechEvent

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTICE = "demo model: tiny random weights, its text and speech are meaningless"
MM_KEYS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    reasoning: str | None = None  # the Thinking model's <think> part, apart from the answer
    audio: np.ndarray | None = None  # float32 mono
    sample_rate: int = 24000
    codes: torch.Tensor | None = None  # codec codes the audio was made from
    prompt_tokens_by_modality: dict[str, int] = field(default_factory=dict)
    logprobs: list[dict] | None = None


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a Thinking-model answer into (reasoning, content) at </think>."""
    if "</think>" not in text:
        return None, text
    reasoning, content = text.split("</think>", 1)
    return reasoning.replace("<think>", "", 1).strip("\n"), content.lstrip("\n")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


MAX_SPEECH_SLOTS = 64  # requests speaking at once never exceed this by default (talker KV: 2.5 GiB at full size)


class Omni:
    def __init__(self, model, processor, path: Path, engine_config: EngineConfig | None = None, *,
                 speech_slots: int | None = None):
        """speech_slots: requests the speech stage speaks at once (more wait for a place); the talker's
        paged KV pool is sized to 2,048 tokens per slot (40 MiB each for the full model), at least
        8,192, shared in blocks, so one long answer may use what short ones leave. Default: the engine's
        max_num_seqs, at most MAX_SPEECH_SLOTS, so a single-user setup (max_num_seqs 1) holds one
        slot's worth and a server as many as it decodes thinker requests together."""
        from .multimodal.processor import OmniProcessor  # noqa: F401  (type of `processor`)

        self.model = model
        self.cfg: OmniConfig = model.cfg
        self.processor = processor
        self.path = path
        self.random_weights = is_tiny_random(self.cfg)
        talker_cfg = self.cfg.get("talker_config")
        capture = talker_cfg.accept_hidden_layer if model.has_talker else None
        eos = [self.cfg.get("im_end_token_id", 151645)]
        self.tokenizer_eos = eos
        if speech_slots is not None and speech_slots < 1:
            raise ValueError(f"speech_slots must be at least 1, got {speech_slots}")
        config = engine_config or EngineConfig()
        self.speech_slots = speech_slots or min(config.max_num_seqs, MAX_SPEECH_SLOTS)
        self.device = next(model.parameters()).device
        if model.has_talker:
            config = reserve_for_speech(config, self.cfg, self.speech_slots, self.device)
        self.engine = Engine(model, eos, config, capture_layer=capture)
        self._speech_stage = None  # made on first use (speech_stage)
        if self.random_weights:
            log.warning("%s (%s)", RANDOM_WEIGHTS_NOTICE, path)

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        talker: bool = True,
        engine_config: EngineConfig | None = None,
        progress: bool = True,
        quantization=None,
        speech_slots: int | None = None,
    ) -> "Omni":
        """Load a checkpoint folder; without one, the demo model (made on first use).

        dtype: torch dtype or "bfloat16" / "float16" / "float32"; quantization: None, "fp8",
        "int8", "int4" or a weights.quant.QuantConfig (pre-quantized checkpoints need none);
        speech_slots: see Omni.__init__.
        """
        from .multimodal.processor import OmniProcessor
        from .weights.loader import load_model

        path = Path(model) if model is not None else demo_model_path()
        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        net = load_model(path, device=device, dtype=dtype, with_talker=talker, progress=progress, quantization=quantization)
        return cls(net, OmniProcessor.from_pretrained(path), path, engine_config, speech_slots=speech_slots)

    @property
    def can_speak(self) -> bool:
        return self.model.has_talker

    @property
    def voices(self) -> list[str]:
        if not self.can_speak:
            return []
        return [name.capitalize() for name in self.cfg.talker_config.speaker_id]

    # -- requests -----------------------------------------------------------------------------
    def make_request(
        self,
        messages: list[dict[str, Any]],
        sampling: SamplingParams,
        *,
        speaker: str | None = None,
        use_audio_in_video: bool = False,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
        audio_per_clip: bool = False,
        media_cache=None,
    ) -> Request:
        """Render, tokenize and load the media of one conversation into an engine request.

        audio_per_clip: each audio clip's features as if it came alone, not padded to the longest
        clip as the reference does; for conversations re-sent turn after turn, whose earlier clips
        must keep their features (and so their cached KV) when a longer clip is added.
        media_cache: a multimodal.media_cache.MediaCache kept across the turns of one conversation,
        so each image and (with audio_per_clip) clip is processed once.
        """
        if speaker is not None:
            speaker = self.check_speaker(speaker)
        inputs = self.processor.prepare_messages(
            messages, use_audio_in_video=use_audio_in_video, enable_thinking=enable_thinking, tools=tools,
            audio_per_clip=audio_per_clip, cache=media_cache,
        )
        req = request_from_inputs(inputs, self.cfg.thinker_config, sampling, self.device, use_audio_in_video)
        req.speaker = speaker
        return req

    def check_speaker(self, speaker: str) -> str:
        if not self.can_speak:
            raise InputError("this model has no talker: speech output is not available", param="speaker")
        if speaker.lower() not in self.cfg.talker_config.speaker_id:
            raise InputError(f"unknown voice {speaker!r}; choose one of {', '.join(self.voices)}", param="voice")
        return speaker

    def generate(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        *,
        speaker: str | None = None,
        preset: str | None = None,
        use_audio_in_video: bool = False,
        enable_thinking: bool | None = None,
        speech_max_frames: int | None = None,
        **sampling: Any,
    ) -> Result | list[Result]:
        """One conversation -> Result; a list of conversations -> list of Results (batched)."""
        batch = bool(messages) and isinstance(messages[0], list)
        conversations = messages if batch else [messages]
        sp = sampling_from(preset, **sampling)
        reqs = [
            self.make_request(conv, SamplingParams(**vars(sp)), speaker=speaker,
                              use_audio_in_video=use_audio_in_video, enable_thinking=enable_thinking)
            for conv in conversations
        ]
        stage = self.speech_stage if speaker is not None else None
        for req in reqs:
            req.speech_max_frames = speech_max_frames
            self.engine.add_request(req)
        try:
            for req in reqs:  # the talker runs beside the thinker; audio is decoded at the end
                if stage is not None:
                    stage.add(req, decode_audio=False)
        except BaseException:
            self._stop(reqs, stage)
            raise
        while any(r.finish_reason is None for r in reqs) or (stage is not None and any(r.request_id in stage.jobs for r in reqs)):
            self.engine.step()
            self._apply_stop_strings(reqs)
            failed = next((r for r in reqs if r.error is not None), None)
            if failed is not None:  # refused while running (out of memory): the others stop too
                self._stop(reqs, stage)
                raise failed.error
            if stage is not None:
                stage.step()
        results = [self.finish(r, speech=self._collect_speech(stage, r) if stage is not None else None) for r in reqs]
        return results if batch else results[0]

    def _stop(self, reqs: list[Request], stage) -> None:
        """Abort the requests in the thinker and, with a speech stage, cancel and drop their speech."""
        for req in reqs:
            self.engine.abort(req.request_id)
            if stage is not None:
                stage.cancel(req.request_id)
        if stage is not None:
            stage.step()
            for req in reqs:
                stage.pop(req.request_id)

    def _apply_stop_strings(self, reqs: list[Request]) -> None:
        """End requests whose text contains one of their stop strings (finish_reason "stop")."""
        for req in reqs:
            if req.finish_reason is None and req.sampling.stop and req.output_ids:
                text = self.processor.decode(req.output_ids, skip_special_tokens=True)
                if any(stop in text for stop in req.sampling.stop):
                    self.engine.abort(req.request_id)
                    req.finish_reason = "stop"

    @property
    def speech_stage(self):
        """The streaming speech stage (speech_stage.SpeechStage) of this model, made on first use."""
        if not self.can_speak:
            raise InputError("this model has no talker: speech output is not available", param="speaker")
        if self._speech_stage is None:
            from .speech_stage import SpeechStage

            self._speech_stage = SpeechStage(self.model, self.cfg, sorted(self.engine.eos_token_ids),
                                             max_active=self.speech_slots)
        return self._speech_stage

    def _collect_speech(self, stage, req: Request) -> tuple[torch.Tensor, np.ndarray]:
        """(codes, waveform) of a request spoken by the stage; the waveform as `speak` decodes it."""
        job = stage.pop(req.request_id)
        codes = job.codes()
        if codes.shape[-1] == 0:
            return codes, np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            wav = self.model.code2wav.chunked_decode(codes[None])
        return codes, wav.flatten().float().cpu().numpy()

    def stream_speech(
        self,
        messages: list[dict[str, Any]],
        *,
        speaker: str = "Ethan",
        preset: str | None = None,
        use_audio_in_video: bool = False,
        enable_thinking: bool | None = None,
        speech_max_frames: int | None = None,
        **sampling: Any,
    ) -> Iterator["SpeechEvent"]:
        """One spoken answer as it is produced: SpeechEvent(text=new text, pcm=new float32 24 kHz
        samples or None), ..., then one with finished=True. The talker starts after the first answer
        tokens and the first PCM (4 codec frames, 320 ms) comes while the thinker is still writing.
        Closing the iterator early cancels the request (thinker and speech)."""
        from collections import deque

        from .speech_stage import SpeechEvent

        stage = self.speech_stage
        req = self.make_request(messages, sampling_from(preset, **sampling), speaker=speaker,
                                use_audio_in_video=use_audio_in_video, enable_thinking=enable_thinking)
        req.speech_max_frames = speech_max_frames
        chunks: deque = deque()
        self.engine.add_request(req)
        try:
            stage.add(req, on_chunk=chunks.append)
        except BaseException:
            self.engine.abort(req.request_id)
            raise
        text = _TextDelta(self.processor, self.engine.eos_token_ids)
        done = False
        try:
            while not done:
                if self.engine.has_work():
                    self.engine.step()
                if req.error is not None:  # refused while running (out of memory); `finally` stops the talker
                    raise req.error
                stage.step()
                delta = text.update(req.output_ids, final=req.finish_reason is not None)
                if delta:
                    yield SpeechEvent(text=delta)
                while chunks:
                    chunk = chunks.popleft()
                    if chunk.pcm.size:
                        yield SpeechEvent(pcm=chunk.pcm)
                    if chunk.finished:
                        done = True
                        stage.pop(req.request_id)
                        while req.finish_reason is None:  # speech ended first (length cap): finish the text
                            self.engine.step()
                            delta = text.update(req.output_ids, final=req.finish_reason is not None)
                            if delta:
                                yield SpeechEvent(text=delta)
                        yield SpeechEvent(finished=True, finish_reason=req.finish_reason,
                                          speech_finish_reason=chunk.finish_reason)
        finally:
            if not done:  # closed early: stop the thinker and the talker
                self.engine.abort(req.request_id)
                stage.cancel(req.request_id)
                stage.step()
                stage.pop(req.request_id)

    def stream(self, req: Request) -> Iterator[int]:
        """Drive the engine until `req` finishes, yielding its new tokens (other requests advance too)."""
        self.engine.add_request(req)
        sent = 0
        while req.finish_reason is None:
            self.engine.step()
            while sent < len(req.output_ids):
                yield req.output_ids[sent]
                sent += 1
        if req.error is not None:  # refused while running (out of memory)
            raise req.error

    def finish(self, req: Request, speech: tuple[torch.Tensor, np.ndarray] | None = None) -> Result:
        """The Result of a finished request; speech: its (codes, audio) when already made (else
        a speaking request is spoken now, by `speak`)."""
        ids = [t for t in req.output_ids if t not in self.engine.eos_token_ids]
        text = self.processor.decode(ids, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in req.sampling.stop if stop in text]
        if cuts:  # the answer ends before its first stop string, as OpenAI's API does
            text = text[: min(cuts)]
        reasoning, content = split_reasoning(text)
        result = Result(
            text=content, reasoning=reasoning, token_ids=list(req.output_ids), finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_ids), prompt_tokens_by_modality=self.count_modalities(req.prompt_ids),
            logprobs=req.output_logprobs or None,
        )
        if speech is not None:
            result.codes, result.audio = speech
        elif req.speaker is not None and req.capture is not None:
            result.codes, result.audio = self.speak(req)
        return result

    def count_modalities(self, ids: list[int]) -> dict[str, int]:
        t = self.cfg.thinker_config
        counts = {"image": 0, "audio": 0, "video": 0}
        for token in ids:
            if token == t.image_token_id:
                counts["image"] += 1
            elif token == t.audio_token_id:
                counts["audio"] += 1
            elif token == t.video_token_id:
                counts["video"] += 1
        counts["text"] = len(ids) - sum(counts.values())
        return counts

    # -- speech -------------------------------------------------------------------------------
    from .tts import forced_prefill, say, speech_request  # text-to-speech methods, in tts.py

    @torch.inference_mode()
    def speak(self, req: Request, greedy: bool | None = None, max_frames: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Talker + code predictor over the finished answer, then code2wav (reference path).

        greedy: argmax talker and code predictor (default: when the thinker itself was greedy).
        max_frames: at most this many codec frames (12.5 per second of speech; default: the talker's limit).
        """
        from .speech import TalkerSampling, generate_codes

        layer = self.cfg.talker_config.accept_hidden_layer
        embeds = torch.cat(req.capture[0])
        hidden = torch.cat(req.capture[layer])
        ids = torch.tensor(req.prompt_ids + req.output_ids, device=self.device)
        greedy = req.sampling.greedy if greedy is None else greedy
        max_frames = req.speech_max_frames if max_frames is None else max_frames
        generator = None
        if req.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        codes = generate_codes(
            self.model.talker, embeds, hidden, ids, req.speaker, self.cfg,
            embed_tokens=self.model.thinker.model.embed_tokens, prompt_len=len(req.prompt_ids),
            sampling=TalkerSampling(do_sample=not greedy), generator=generator,
            eos_token_ids=sorted(self.engine.eos_token_ids), mm=getattr(req, "mm_inputs", None),
            max_new_tokens=None if max_frames is None else max_frames + 1,  # the last code is never fed back
        )
        if codes.shape[-1] == 0:
            return codes, np.zeros(0, dtype=np.float32)
        wav = self.model.code2wav.chunked_decode(codes[None])
        return codes, wav.flatten().float().cpu().numpy()


# code2wav's largest streaming window (benchmarks/quant_memory_plan.py) + its CUDA graphs' pool
# (1.13 GiB measured for the default largest batch of 4, benchmarks/results/code2wav_graphs_h100.json)
SPEECH_WORKING_SET = 1.5 * 2**30


def reserve_for_speech(config: EngineConfig, cfg: OmniConfig, slots: int, device, total_memory: int | None = None) -> EngineConfig:
    """The engine config with room kept for the speech stage when the KV pool is sized from the
    memory budget (CUDA, paged, no num_kv_blocks): the pool is planned when the engine starts, before
    the stage allocates its talker KV pool and runs code2wav, so on a small card (24 GB) the
    budget would otherwise go to the thinker's KV and speech would not fit. The share
    gpu_memory_utilization gives up: (the talker pool's default size for `slots` requests, 2,048
    tokens each, at least 8,192 + SPEECH_WORKING_SET) / total."""
    from dataclasses import replace

    device = torch.device(device)
    paged = config.kv_backend == "paged" or (config.kv_backend == "auto" and device.type == "cuda")
    if device.type != "cuda" or not paged or config.num_kv_blocks:
        return config
    from .speech_graphs import DEFAULT_BLOCK_SIZE, plan_talker_blocks, talker_kv_bytes

    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory
    dtype = torch.bfloat16  # the talker's KV dtype on a GPU; fp32 would double it (never used there)
    blocks = plan_talker_blocks(cfg.talker_config, dtype, max_active=slots)
    reserve = talker_kv_bytes(cfg.talker_config, blocks, DEFAULT_BLOCK_SIZE, dtype) + SPEECH_WORKING_SET
    share = config.gpu_memory_utilization - reserve / total_memory
    if share <= 0:
        raise ValueError(f"gpu_memory_utilization {config.gpu_memory_utilization} leaves no room for the speech stage "
                         f"({reserve / 2**30:.2f} GiB for the talker KV of {slots} requests); lower speech_slots or max_num_seqs")
    log.info("KV budget: %.3f of GPU memory (%.2f GiB kept for the talker KV of %d requests and code2wav)",
             share, reserve / 2**30, slots)
    return replace(config, gpu_memory_utilization=share)


def request_from_inputs(
    inputs: dict[str, Any], thinker_cfg, sampling: SamplingParams, device, use_audio_in_video: bool = False
) -> Request:
    """Processor outputs of one conversation -> an engine request with its M-RoPE positions."""
    from .multimodal.items import media_items
    from .multimodal.mrope import get_rope_index

    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(input_ids))
    audio_lens = inputs["feature_attention_mask"].sum(1) if inputs.get("feature_attention_mask") is not None else None
    positions, delta = get_rope_index(
        input_ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), mask, use_audio_in_video,
        audio_lens, inputs.get("video_second_per_grid"), config=thinker_cfg,
    )
    mm = MultimodalInputs(**{k: _to(inputs.get(k), device) for k in MM_KEYS})
    has_mm = any(getattr(mm, k) is not None for k in MM_KEYS)
    req = Request(
        prompt_ids=input_ids[0].tolist(),
        positions=positions[:, 0],
        rope_delta=float(delta.flatten()[0]),  # fractional when video time is not whole
        sampling=sampling,
        mm=mm if has_mm else None,
    )
    if has_mm:
        req.media_items = media_items(inputs, thinker_cfg)
    req.mm_inputs = inputs  # kept for the talker (grids, audio lengths)
    return req


class _TextDelta:
    """Incremental detokenisation: the new text of a growing answer, holding back a partial character."""

    def __init__(self, processor, eos_ids):
        self.processor, self.eos_ids, self.sent = processor, set(eos_ids), ""

    def update(self, ids: list[int], final: bool = False) -> str:
        text = self.processor.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x
