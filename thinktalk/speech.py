"""Reference (non-streaming, plain PyTorch) speech generation: thinker outputs -> codec codes.

This mirrors transformers' `Qwen3OmniMoeForConditionalGeneration.generate` for one conversation:

1. `build_talker_inputs` turns the thinker's tensors into the talker's prefill sequence:

   * user part — every prompt position whose segment (the span from an `<|im_start|>` to the
     next) has role `user`, in order, over all user turns (system and earlier assistant turns are
     left out). Multimodal placeholder positions (audio/image/video token ids) take
     `hidden_projection(thinker hidden state at layer accept_hidden_layer)`; all others
     `text_projection(thinker layer-0 embedding)` (multimodal features already merged).
   * assistant part, from the last `<|im_start|>assistant` of the prompt, 9 positions:

         text:  [a0, a1, a2, tts_pad x4, tts_bos, a3]      (a_i = text_projection(embedding of
         codec: [0,  0,  0,  nothink, think_bos,            assistant-part token i); a3 is the
                 think_eos, speaker, codec_pad, codec_bos]  first answer token)

     input = text + codec embeddings (codec ones from the talker's codec_embedding).
   * trailing text: a4, a5, ... (the rest of the answer, one per talker step), then tts_eos;
     after it the talker is fed tts_pad. tts_* = text_projection(thinker embedding of the
     tts_bos/eos/pad token ids).

2. `generate_codes` prefills the talker, then per step: pick the first-codebook code from the
   talker's logits (repetition penalty over earlier first codes, special codec ids other than
   codec_eos suppressed, then temperature/top-k/top-p or argmax), stop on codec_eos or at
   max_new_tokens, otherwise let the code predictor fill codebooks 1..G-1 and feed the talker
   sum(all 16 codec embeddings) + the next trailing text embedding.

The talker only sees positions the thinker was *fed*: the prompt and every generated token but the
last (whose hidden states are never computed), exactly like transformers' `hidden_states` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import ConfigNode
from .errors import InputError
from .layers.attention import ContiguousKV, SequenceKV
from .models.code_predictor import greedy_pick
from .models.talker import Talker, talker_step
from .request import SamplingParams
from .sampler import apply_penalties, filter_logits


# -- speakers -----------------------------------------------------------------------------------
def voices(cfg: ConfigNode) -> list[str]:
    """The checkpoint's voices, capitalized as documented (Ethan, Chelsie, Aiden)."""
    return [name.capitalize() for name in cfg.talker_config.speaker_id]


def speaker_id(cfg: ConfigNode, speaker: str) -> int:
    """The codec id of a voice, case-insensitive; unknown voice -> InputError listing the valid ones."""
    ids = cfg.talker_config.speaker_id
    key = speaker.lower() if isinstance(speaker, str) else None
    if key not in ids:
        raise InputError(f"unknown speaker {speaker!r}; valid voices: {', '.join(voices(cfg))}", param="speaker")
    return int(ids[key])


# -- sampling -----------------------------------------------------------------------------------
@dataclass
class TalkerSampling:
    """Defaults = transformers' `generate(talker_*=...)` defaults (and the checkpoint's generation_config)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    max_new_tokens: int = 4096
    # the code predictor samples with its own fixed settings when the talker samples, else argmax
    predictor_top_k: int = 50
    predictor_top_p: float = 0.8

    @classmethod
    def greedy(cls, **overrides) -> "TalkerSampling":
        return cls(do_sample=False, **overrides)


def suppressed_codec_ids(cfg: ConfigNode) -> list[int]:
    """The last 1024 talker ids (special codec tokens) except codec_eos: never predicted."""
    vocab = cfg.talker_config.text_config.vocab_size
    eos = cfg.talker_config.codec_eos_token_id
    return [i for i in range(vocab - 1024, vocab) if i != eos]


def pick_first_code(
    logits: torch.Tensor,
    generated: Sequence[int],
    sampling: TalkerSampling,
    suppress: torch.Tensor,
    generator: torch.Generator | None = None,
) -> int:
    """One request's first-codebook code from its talker logits [V] (float32).

    transformers' processor order: repetition penalty (over the first codes generated so far),
    suppress tokens, then (sampling only) temperature, top-k, top-p and a multinomial draw.
    """
    sp = SamplingParams(
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
    )
    logits = logits.float()
    if generated:
        logits = apply_penalties(logits, sp, [], list(generated))
    logits = logits.masked_fill(suppress, float("-inf"))
    if not sampling.do_sample:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, sp.temperature, sp.top_k, sp.top_p).softmax(-1)
    return int(torch.multinomial(probs[None], 1, generator=generator))


def residual_picker(sampling: TalkerSampling, generator: torch.Generator | None = None):
    """The code predictor's `pick(logits [B, V], group) -> [B]` matching the talker's do_sample."""
    if not sampling.do_sample:
        return greedy_pick

    def pick(logits: torch.Tensor, group: int) -> torch.Tensor:
        probs = filter_logits(logits, 1.0, sampling.predictor_top_k, sampling.predictor_top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return pick


# -- talker inputs ------------------------------------------------------------------------------
@dataclass
class TalkerPrompt:
    embeds: torch.Tensor  # [L, H_talker] prefill inputs
    input_ids: torch.Tensor  # [L] user-part thinker ids then tts_pad ids (what the talker's rope index reads)
    positions: torch.Tensor  # [3, L] M-RoPE positions of the prefill
    rope_delta: float  # decode step k (0-based) sits at position L + k + rope_delta
    trailing: torch.Tensor  # [K, H_talker] text embedding added at decode step k < K
    tts_pad: torch.Tensor  # [H_talker] added at decode steps k >= K


def _user_mask(prompt_ids: torch.Tensor, cfg: ConfigNode) -> torch.Tensor:
    """Positions whose segment role (the token after the last <|im_start|> at or before them) is user."""
    n = prompt_ids.shape[0]
    pos = torch.arange(n, device=prompt_ids.device)
    starts = torch.where(prompt_ids == cfg.im_start_token_id, pos, torch.full_like(pos, -1))
    previous = torch.cummax(starts, dim=0).values.clamp_min(0)
    role = prompt_ids[(previous + 1).clamp_max(n - 1)]
    return role == cfg.user_token_id


def _assistant_start(prompt_ids: torch.Tensor, cfg: ConfigNode) -> int:
    hits = ((prompt_ids[:-1] == cfg.im_start_token_id) & (prompt_ids[1:] == cfg.assistant_token_id)).nonzero()
    if hits.numel() == 0:
        raise InputError("the prompt has no '<|im_start|>assistant' turn to speak", param="messages")
    return int(hits[-1, 0])


def talker_rope_index(
    talker_ids: torch.Tensor, cfg: ConfigNode, mm: dict | None = None
) -> tuple[torch.Tensor, float]:
    """M-RoPE positions [3, L] and decode delta of the talker's prefill.

    Like transformers, only images/videos (grids given) make the talker's positions 3-D; text and
    audio placeholders get consecutive positions. The talker is not told use_audio_in_video.
    """
    mm = mm or {}
    if mm.get("image_grid_thw") is None and mm.get("video_grid_thw") is None:
        n = talker_ids.shape[0]
        return torch.arange(n, device=talker_ids.device)[None].expand(3, -1), 0
    from .multimodal.mrope import get_rope_index  # the thinker's, with the talker's ids

    audio_lens = mm.get("audio_feature_lengths")
    if audio_lens is None and mm.get("feature_attention_mask") is not None:
        audio_lens = mm["feature_attention_mask"].sum(1)
    ids = talker_ids[None]
    positions, delta = get_rope_index(
        ids, mm.get("image_grid_thw"), mm.get("video_grid_thw"), torch.ones_like(ids), False, audio_lens,
        mm.get("video_second_per_grid"), config=cfg.thinker_config,
    )
    # float like the reference's (video time positions may be fractional)
    return positions[:, 0], float(torch.as_tensor(delta).flatten()[0])


@torch.no_grad()
def build_talker_inputs(
    talker: Talker,
    thinker_embeds: torch.Tensor,
    thinker_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    speaker: str | int,
    cfg: ConfigNode,
    *,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    prompt_len: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    mm: dict | None = None,
) -> TalkerPrompt:
    """The talker's prefill sequence and per-step trailing text for one conversation.

    thinker_embeds / thinker_hidden: [S, H_thinker] — for every position fed to the thinker
    (prompt + generated tokens but the last), the layer-0 embeddings (multimodal features merged)
    and hidden_states[accept_hidden_layer] (transformers' numbering, 0 = embeddings).
    input_ids: [S'] the prompt followed by the generated ids (preferably all of them, the last too,
    as transformers' `sequences`). prompt_len: length of the prompt (default: all of input_ids).
    embed_tokens: the thinker's token embedding (for the tts_bos/eos/pad ids).
    eos_token_ids: the thinker's stop ids (default <|im_end|>); the tts_eos marker is placed right
    after the first one among the generated ids, as transformers does.
    mm: grids / audio lengths of the prompt (`image_grid_thw`, `video_grid_thw`,
    `video_second_per_grid`, `feature_attention_mask` or `audio_feature_lengths`) for the talker's
    M-RoPE when the prompt holds images or videos.
    """
    tcfg = cfg.talker_config
    dtype = talker.codec_head.weight.dtype
    device = talker.codec_head.weight.device
    input_ids = input_ids.to(device).flatten()
    thinker_embeds = thinker_embeds.to(device=device, dtype=dtype)
    thinker_hidden = thinker_hidden.to(device=device, dtype=dtype)
    prompt_len = input_ids.shape[0] if prompt_len is None else prompt_len
    prompt_ids = input_ids[:prompt_len]
    spk = speaker if isinstance(speaker, int) else speaker_id(cfg, speaker)

    # user part: projections of the whole prompt, then the user positions in order
    th = cfg.thinker_config
    mm_mask = (prompt_ids == th.audio_token_id) | (prompt_ids == th.image_token_id) | (prompt_ids == th.video_token_id)
    full = torch.empty(prompt_len, tcfg.text_config.hidden_size, device=device, dtype=dtype)
    if mm_mask.any():
        full[mm_mask] = talker.hidden_projection(thinker_hidden[:prompt_len][mm_mask])
    full[~mm_mask] = talker.text_projection(thinker_embeds[:prompt_len][~mm_mask])
    user = _user_mask(prompt_ids, cfg)
    user_embeds, user_ids = full[user], prompt_ids[user]

    # tts special embeddings
    special = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=device)
    tts_bos, tts_eos, tts_pad = talker.text_projection(embed_tokens(special).to(dtype)).unbind(0)

    # assistant part
    start = _assistant_start(prompt_ids, cfg)
    assistant = talker.text_projection(thinker_embeds[start:])
    if assistant.shape[0] < 4:
        raise InputError("the answer is empty: there is no text to speak", param="messages")
    text = torch.cat([assistant[:3], tts_pad.expand(4, -1), tts_bos[None], assistant[3:4]])
    codec_ids = torch.tensor(
        [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id, spk, tcfg.codec_pad_id,
         tcfg.codec_bos_id], device=device,
    )
    codec = torch.cat([torch.zeros(3, text.shape[1], device=device, dtype=dtype), talker.embed_codes(codec_ids)])
    trailing = torch.cat([assistant[4:], tts_eos[None]])

    # tts_eos right after the first stop token among the generated ids; tts_pad beyond it
    eos_ids = list(eos_token_ids) if eos_token_ids is not None else [cfg.get("im_end_token_id", 151645)]
    generated = input_ids[prompt_len:].tolist()
    first_eos = next((i for i, t in enumerate(generated) if t in eos_ids), len(generated))
    if first_eos < trailing.shape[0]:
        trailing = torch.cat([trailing[:first_eos], tts_eos[None], tts_pad.expand(trailing.shape[0] - first_eos - 1, -1)])

    embeds = torch.cat([user_embeds, text + codec])
    talker_ids = torch.cat([user_ids, torch.full((text.shape[0],), cfg.tts_pad_token_id, device=device)])
    positions, delta = talker_rope_index(talker_ids, cfg, mm)
    return TalkerPrompt(embeds, talker_ids, positions.to(device), delta, trailing, tts_pad)


# -- the loop -----------------------------------------------------------------------------------
@torch.no_grad()
def generate_codes(
    talker: Talker,
    thinker_embeds: torch.Tensor,
    thinker_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    speaker: str,
    cfg: ConfigNode,
    *,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    prompt_len: int | None = None,
    sampling: TalkerSampling | None = None,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_ids: Sequence[int] | None = None,
    mm: dict | None = None,
) -> torch.Tensor:
    """Speech codes LongTensor [num_code_groups, T] for one answer (T = frames before codec_eos).

    Arguments as `build_talker_inputs`; `speaker` is a voice name (case-insensitive).
    sampling: TalkerSampling (default: transformers' talker defaults); greedy=True forces argmax
    for the talker and the code predictor; max_new_tokens overrides sampling.max_new_tokens.
    Like transformers, a talker that hits max_new_tokens yields max_new_tokens - 1 frames (the
    last picked code is never fed back, so its residual codes are never predicted).
    generator: None draws from torch's global RNG in the reference's order (talker code, then 15
    predictor codes, per frame).
    """
    sampling = sampling or TalkerSampling()
    if greedy:
        sampling = TalkerSampling(**{**vars(sampling), "do_sample": False})
    limit = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
    tcfg = cfg.talker_config
    speaker_id(cfg, speaker)  # an unknown voice is an error even when there is nothing to say
    device = talker.codec_head.weight.device
    ids = input_ids.flatten()
    if thinker_embeds.shape[0] - _assistant_start(ids[: prompt_len or ids.shape[0]].to(device), cfg) < 4:
        # only the stop token was generated: nothing to speak (transformers fails on this case)
        return torch.empty(talker.num_code_groups, 0, dtype=torch.long, device=device)
    prompt = build_talker_inputs(
        talker, thinker_embeds, thinker_hidden, input_ids, speaker, cfg, embed_tokens=embed_tokens,
        prompt_len=prompt_len, eos_token_ids=eos_token_ids, mm=mm,
    )
    suppress = torch.zeros(tcfg.text_config.vocab_size, dtype=torch.bool, device=device)
    suppress[suppressed_codec_ids(cfg)] = True
    pick_residual = residual_picker(sampling, generator)

    cache = SequenceKV()
    n = prompt.embeds.shape[0]
    hidden, logits = talker_step(talker, prompt.embeds, prompt.positions, ContiguousKV([cache], [n]), [n])
    generated: list[int] = []
    frames: list[torch.Tensor] = []
    for step in range(limit):
        code = pick_first_code(logits[0], generated, sampling, suppress, generator)
        generated.append(code)
        if code == tcfg.codec_eos_token_id or len(generated) >= limit:
            break
        codes, embeds = talker.predict_residual_codes(hidden, torch.tensor([code], device=device), pick_residual)
        frames.append(codes[0])
        text = prompt.trailing[step] if step < prompt.trailing.shape[0] else prompt.tts_pad
        embeds = embeds + text
        pos = torch.full((3, 1), n + step + prompt.rope_delta, device=device)
        hidden, logits = talker_step(talker, embeds, pos, ContiguousKV([cache], [1]), [1])
    if not frames:
        return torch.empty(talker.num_code_groups, 0, dtype=torch.long, device=device)
    return torch.stack(frames, dim=1)
