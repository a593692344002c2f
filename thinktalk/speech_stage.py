"""The streaming speech stage: talker + code predictor + code2wav, fed while the thinker runs.

The stage is driven by the same loop as the thinker engine, one call after each engine step:

    engine.add_request(req); stage.add(req, on_chunk=...)       # a spoken request
    while engine.has_work() or stage.has_work():
        engine.step()
        for chunk in stage.step(): ...                          # float32 24 kHz PCM per request

It reads only the engine's `Request` objects (`prompt_ids`, `output_ids`, `finish_reason`, and
`capture`: the thinker's layer-0 embeddings and layer-`accept_hidden_layer` hidden states), so the
engine needs no change beyond capturing those for requests with a speaker (it already does).

When the talker may run (what makes it equal to the reference)
----------------------------------------------------------------
`speech.build_talker_inputs` (the reference, after the thinker has finished) reads, of the answer,
the assistant segment `a_0, a_1, ...` (from the prompt's last `<|im_start|>assistant`, then the
generated tokens the thinker was *fed*: all but the last). The talker's prefill needs a_0..a_3;
decode step k (the input after frame k) adds trailing text k = a_{4+k}, then tts_eos, then tts_pad.
A generated token is known to be fed as soon as it is sampled and the request is still running
(only the token that finishes a request is never fed). So, with F the number of generated tokens
seen so far:

* the prefill runs once the prompt is captured and A + F >= 4 (A = assistant tokens in the prompt,
  3 with the chat template: the first answer token completes it);
* step k runs once a_{4+k} is known fed (4 + k < A + F, and k < F: a first thinker eos at
  generated index e >= F would put tts_eos at trailing index e, the reference's rule);
* otherwise the request waits (feeds nothing) until the next thinker token, unless the thinker has
  finished: then trailing text is exactly the reference's (tts_eos after the last fed token, or at
  the first eos index, then tts_pad).

The talker's input at step k therefore never depends on timing, and greedy codes equal
`speech.generate_codes` on the finished answer. Text embeddings of generated tokens are the
thinker's token embeddings (what the thinker's layer 0 captures for text), projected when the token
arrives, so the talker never waits for the thinker to *feed* a token, only to sample it.

Batching
--------
Every step packs the talker work of all ready requests into one forward: prefills of newly ready
requests (packed) and one decode token per running request. First codes are picked together (the
reference's logits processors, vectorised: repetition penalty over each request's first codes,
special codec ids suppressed, then argmax or temperature/top-k/top-p and a draw), then the code
predictor fills the 15 residual codebooks of every frame of the batch at once. One [B, 16] copy to
the host per step tells which requests hit codec_eos; everything else stays on the device.

Backends: on CPU the talker uses the reference `ContiguousKV` (a SequenceKV per request) and the
predictor the plain loop (`predict_residual_codes`). On CUDA (`speech_graphs.py`, backend "graphs")
the talker's KV is paged like the thinker's (a `PagedPool` of blocks, taken as a request grows and
freed when it ends), its decode step is one CUDA graph per batch-size bucket replayed over static
buffers, and each frame's 15-step predictor loop is one CUDA graph per batch-size bucket. Backend
"paged" is the same pool with eager steps.

Talker KV blocks (paged backends): a request is admitted (starts holding KV) when the pool has
blocks for its talker prompt, with a block to spare per request already holding KV, and while no
request waits for a block. A prefill or decode token that needs a block when none is free waits
(the request skips the step, older requests take free blocks first). Only when nothing at all can
run, every request able to run waiting for a block, is the most recently admitted request
preempted: its blocks are freed and it goes back to the head of the queue; when readmitted, its
prompt and the decode inputs it was fed (rebuilt from its frames' codes and its trailing text) are
recomputed in one prefill, then it goes on from its next frame. Its earlier audio is unchanged;
the recomputed keys come from a prefill instead of decode steps, so its later codes may differ
from the reference by float rounding. A request that alone outgrows the whole pool (or the
talker's positions, 65,536 for the full model) ends with finish_reason "length".

Sampling: greedy requests (the thinker's own sampling is greedy) take argmax everywhere. Sampled
requests draw with exponential noise (argmax of probs / E, E ~ Exp(1): the same distribution as a
multinomial draw) from the request's own generator (seeded from its seed) or torch's global RNG,
so a seeded request gives the same speech alone or in any batch (but not the same draws as the
reference loop's multinomial calls).

Code2wav: each request streams through `Code2WavStream(exact=True)` with a small first chunk
(default 4 frames = 320 ms) then doubling ones (8, 16, 32, 50: each arrives before the audio before
it has played out once the stage runs faster than real time); the concatenated PCM equals the
one-shot decode of the same codes to float rounding. Every new conv shape costs ~1 s of set-up once
on the GPU, so `warmup()` decodes each chunk shape at start-up and a request's last chunk is padded
to a schedule size (then cut: exact). Chunks go to the request's `on_chunk` callback and come back
from `step()`.

Launched op by op, a decode is host bound on the GPU: ~3,400 aten calls, ~46 ms on an H100 whatever
the chunk's length (0.28 s of a 10 s answer at one request). About half of them are the conv stack
(upsampling ConvNeXt blocks and the decoder: 507 of 936 top-level ops for a 50-frame chunk), so
with backend "graphs" the stack replays a CUDA graph per (batch bucket, frames)
(`code2wav_graphs.Code2WavGraphs`: buckets 1, 2, 4 by default, `code2wav_graph_batch`; a larger
group of requests at the same point takes several replays). Its lengths are few and known: chunk plus cached history (growing to
conv_context_frames, 10) and the padded last chunk, 4, 8, 12, 14, 18, 26, 42 and 60 frames for the
default schedule (`code2wav_graphs.stream_conv_frames`), and `warmup()` captures them for the batch
sizes it is given (one memory pool, as large as the largest graph: ~0.25 GiB per row at 60 frames).
The transformer before the stack (the other 429 top-level ops) sees a window that grows with the
history (kept frames, up to transformer_context_frames = 568, + chunk) at rotary positions that
move with the stream, so it runs over a fixed window instead (`code2wav_graphs.
Code2WavTransformerGraphs`): 568 + chunk frames, the missing history left-padded with dummy
frames that the attention mask hides, the first position and the pad count device scalars the
graph reads. One graph per (batch bucket, chunk size) then serves every history length: 4, 8,
16, 32 and 50 frames for the default schedule (a padded last chunk is one of them), captured by
`warmup()` after the conv stack into the same memory pool. Its real frames' outputs equal the
unpadded window's to float rounding (bit-equal once the history is full). A decode is then two
replays and a few copies; requests decoded together share both. A shape warmup did not capture
(e.g. an unpadded short last chunk) runs eagerly.

Measured on an H200 (benchmarks/bench_speech.py, full-size random weights, bf16), with the talker's
KV still in static per-request slots (before it was paged): per frame at one request, talker
decode 5.5 ms, code predictor 11.6 ms (5.2 ms with compile_predictor), code2wav 3 ms;
transformers' generate takes 111 + 130 ms for the same two.

Cancel: `cancel(request_id)`, or the engine aborting the request (`finish_reason == "abort"`),
stops the request at the start of the next step and frees its talker KV (on the paged backends
every block it held goes back to the pool then); its last chunk event is empty with finish_reason
"abort".
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from .errors import InputError
from .layers.attention import ContiguousKV, SequenceKV
from .models.code2wav import Code2WavStream
from .models.talker import talker_step
from .request import Request
from .sampler import filter_logits
from .speech import TalkerSampling, _assistant_start, _user_mask, build_talker_inputs, speaker_id, suppressed_codec_ids

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
MAX_FINISHED = 1024  # finished jobs kept for `pop`
DEFAULT_SCHEDULE = (4, 8, 16, 32, 50)  # frames per code2wav chunk: first small, then doubling
ASSISTANT_PART = 9  # talker prompt positions after the user part (speech.build_talker_inputs)


def to_device(values, dtype, device) -> torch.Tensor:
    """A small host list on `device`; on CUDA through pinned memory, so the copy does not synchronise."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def final_chunk_frames(pending: int, schedule: Sequence[int]) -> int:
    """What a request's last chunk of `pending` frames is padded to (pad_final_chunk): the smallest
    schedule size >= pending, so the GPU sees only the conv shapes `warmup` prepared."""
    return next((n for n in sorted(set(schedule)) if n >= pending), pending)


# -- events -------------------------------------------------------------------------------------
@dataclass
class SpeechChunk:
    """New PCM of one request: float32 mono at 24 kHz (empty on a final event with nothing left)."""

    request_id: str
    pcm: np.ndarray
    index: int  # 0, 1, ... per request
    frames: int  # codec frames decoded so far for this request
    finished: bool = False  # the request's last chunk
    finish_reason: str | None = None  # "stop" (codec eos) | "length" | "abort" | "empty" (nothing to say)


class SpeechEvent(NamedTuple):
    """What `Omni.stream_speech` yields: new answer text and/or new PCM (float32, 24 kHz)."""

    text: str = ""
    pcm: np.ndarray | None = None
    finished: bool = False  # the last event of the answer
    finish_reason: str | None = None  # the thinker's, on the last event
    speech_finish_reason: str | None = None  # the talker's ("stop", "length", "empty", "abort"), on the last event


# -- vectorised picking -------------------------------------------------------------------------
def draw(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw per row from softmax(logits) [B, V], given Exp(1) noise [B, V]: argmax(p / E)."""
    return torch.argmax(logits.softmax(-1) / noise, dim=-1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty over the ids marked in `seen` [B, V] (bool)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


class ResidualPick:
    """The code predictor's `pick(logits [B, V], group) -> codes [B]` for a batch of frames.

    greedy: bool [B] (True: argmax) or None (all greedy); noise: Exp(1) [G-1, B, V] or None.
    Graph-safe: no host synchronisation, fixed shapes.
    """

    def __init__(self, sampling: TalkerSampling, greedy: torch.Tensor | None, noise: torch.Tensor | None):
        self.sampling, self.greedy, self.noise = sampling, greedy, noise

    def __call__(self, logits: torch.Tensor, group: int) -> torch.Tensor:
        best = torch.argmax(logits, dim=-1)
        if self.noise is None:
            return best
        s = self.sampling
        drawn = draw(filter_logits(logits, 1.0, s.predictor_top_k, s.predictor_top_p), self.noise[group - 1])
        return torch.where(self.greedy, best, drawn) if self.greedy is not None else drawn


# -- the code predictor with a static per-frame cache (the body of the CUDA graph) ---------------
class StaticFrameKV:
    """Attention backend of the code predictor for B frames: per layer K/V [B, Hkv, G, D].

    The caller sets `pos` (first position written) and `t` (tokens per frame: 2 on the first step,
    then 1) before each forward; positions < pos + t were written in this frame, so the cache never
    needs clearing. Fixed shapes and Python-constant slices: safe to capture in a CUDA graph."""

    def __init__(self, num_layers: int, batch: int, groups: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, groups, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.pos, self.t = batch, 0, 2

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, t, p = self.batch, self.t, self.pos
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        self.k[layer][:, :, p : p + t] = k.view(b, t, hkv, d).transpose(1, 2)
        self.v[layer][:, :, p : p + t] = v.view(b, t, hkv, d).transpose(1, 2)
        keys, values = self.k[layer][:, :, : p + t], self.v[layer][:, :, : p + t]
        qh = q.view(b, t, hq, d).transpose(1, 2)  # [B, Hq, t, D]
        # t == 2 only at p == 0 (the frame's first two tokens): plain causal; t == 1 sees everything
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, keys, values, is_causal=t > 1, scale=scale, enable_gqa=hq != hkv)
        return out.transpose(1, 2).reshape(b * t, hq, d)


def predictor_positions(batch: int, groups: int, device) -> list[torch.Tensor]:
    """Position tensors of the static predictor loop: [0, 1] per frame, then [g] for g = 2 .. G-1."""
    first = torch.arange(2, device=device).repeat(batch)
    return [first] + [torch.full((batch,), g, dtype=torch.long, device=device) for g in range(2, groups)]


def predict_frame_static(talker, hidden: torch.Tensor, first_code: torch.Tensor, pick, kv: StaticFrameKV,
                         positions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`Talker.predict_residual_codes` on a static cache: (codes [B, G], summed codec embedding [B, H]).

    Same operations in the same order as the reference loop; no host synchronisation."""
    predictor = talker.code_predictor
    b = hidden.shape[0]
    first_embeds = talker.embed_codes(first_code)
    embeds = torch.stack([hidden, first_embeds.to(hidden.dtype)], dim=1).reshape(2 * b, -1)
    codes, code_embeds = [], []
    for group in range(1, predictor.num_code_groups):
        kv.pos, kv.t = (0, 2) if group == 1 else (group, 1)
        h = predictor(embeds, positions[group - 1], kv)
        if group == 1:
            h = h.view(b, 2, -1)[:, 1]
        code = pick(predictor.logits(h, group).float(), group)
        codes.append(code)
        embeds = predictor.embed(code, group)
        code_embeds.append(embeds)
    residual, residual_embeds = torch.stack(codes, dim=1), torch.stack(code_embeds, dim=1)
    all_codes = torch.cat([first_code[:, None], residual], dim=1)
    summed = torch.cat([first_embeds[:, None], residual_embeds.to(first_embeds.dtype)], dim=1).sum(1)
    return all_codes, summed


# -- talker backends ----------------------------------------------------------------------------
class ContiguousTalker:
    """Reference talker backend: a growing SequenceKV per request, one packed eager forward; never full.

    The interface every talker backend has (speech_graphs.PagedTalker is the other): `fits`, `open`
    and `reserve` say whether there is room (here always), `close` frees, `forward` computes."""

    preemptible = False

    def __init__(self, talker):
        self.talker = talker
        self.device = talker.codec_head.weight.device

    def fits(self, num_tokens: int) -> bool:
        return True

    def open(self, job: "SpeechJob", num_tokens: int, keep_free: int = 0) -> bool:
        job.kv = SequenceKV()
        return True

    def reserve(self, job: "SpeechJob", num_tokens: int) -> bool:
        return True

    def close(self, job: "SpeechJob") -> None:
        job.kv = None

    def kv_tokens(self, job: "SpeechJob") -> int:
        return job.kv.length if job.kv is not None else 0

    def forward(self, prefills, decode: list["SpeechJob"], dec_embeds, dec_positions):
        """prefills: (job, embeds [L, H], positions [3, L]) each, from position 0; decode: one token
        per job (dec_embeds [D, H], dec_positions: D floats) -> (hidden [B, H], logits [B, V])."""
        embeds = [e for _, e, _ in prefills]
        positions = [p.to(torch.float32) for _, _, p in prefills]
        if decode:
            embeds.append(dec_embeds)
            positions.append(to_device(dec_positions, torch.float32, self.device)[None].expand(3, -1))
        new_lens = [e.shape[0] for _, e, _ in prefills] + [1] * len(decode)
        kv = ContiguousKV([j.kv for j, _, _ in prefills] + [j.kv for j in decode], new_lens)
        return talker_step(self.talker, torch.cat(embeds), torch.cat(positions, dim=1), kv, new_lens)


class EagerPredictor:
    """The plain 15-step loop (reference `predict_residual_codes`) over the batch's frames."""

    def __init__(self, talker):
        self.talker = talker

    def __call__(self, hidden, first_code, pick: ResidualPick):
        return self.talker.predict_residual_codes(hidden, first_code, pick)


# -- per-request state --------------------------------------------------------------------------
WAITING, RUNNING, DONE = "waiting", "running", "done"


@dataclass
class SpeechJob:
    req: Request
    speaker: int
    greedy: bool
    limit: int  # talker steps (first codes picked) at most; frames <= limit - 1, as the reference
    ignore_eos: bool
    generator: torch.Generator | None
    on_chunk: Callable[[SpeechChunk], None] | None
    assistant_start: int
    groups: int = 16  # codebooks per frame
    talker_len: int = 0  # length of the talker prompt (known from the thinker prompt's ids)
    state: str = WAITING
    kv: object = None  # backend state (SequenceKV, or block_manager.SeqBlocks); None: holds no KV
    order: int = 0  # admission order (the most recent is preempted first)
    replay: bool = False  # preempted after its prefill: recompute its KV when readmitted
    prompt: object = None  # speech.TalkerPrompt of the prefill
    prefill_len: int = 0
    trail: list = field(default_factory=list)  # projected text rows a_4, a_5, ... known fed
    projected: int = 0  # generated tokens whose text row is in `trail` (or in the prefill)
    fed: int = 0  # decode steps fed (the next one reads trailing text `fed`)
    picked: int = 0  # first codes picked
    pending: torch.Tensor | None = None  # summed codec embedding of the last frame, awaiting its text
    seen: torch.Tensor | None = None  # bool [V]: first codes picked so far (repetition penalty)
    frames: list = field(default_factory=list)  # [G] code rows on the device
    host_codes: list = field(default_factory=list)
    stream: Code2WavStream | None = None
    chunks: int = 0
    samples: int = 0  # PCM samples emitted
    cancelled: bool = False
    finish_reason: str | None = None
    audio: list = field(default_factory=list)  # kept PCM chunks (keep_audio=True)
    t_added: float = 0.0
    t_first_chunk: float | None = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def done(self) -> bool:
        return self.state == DONE

    def codes(self) -> torch.Tensor:
        """Codec codes so far, [G, T] (on the talker's device)."""
        if not self.frames:
            return torch.empty(self.groups, 0, dtype=torch.long, device=self.seen.device)
        return torch.stack(self.frames, dim=1)

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)


# -- the stage ----------------------------------------------------------------------------------
class SpeechStage:
    """Talker + code predictor + streaming code2wav over every speaking request, step by step.

    model: `models.omni.OmniModel` with a talker (thinker for embeddings, talker, code2wav).
    eos_token_ids: the thinker's stop ids (the engine's), for the reference's tts_eos rule.
    sampling: talker / predictor sampling settings (greedy per request from its own sampling).
    schedule: code2wav frames per chunk (first, second, then repeating).
    backend: "auto" (CUDA: "graphs"; else "contiguous"), "contiguous" (the reference: a growing
    KV per request), "paged" (talker KV in blocks, eager) or "graphs" (paged, decode and predictor
    as CUDA graphs on CUDA; run eagerly through the same static buffers elsewhere).
    max_active: requests holding talker KV at once (others wait for a place); None: no limit but
    the pool's blocks. Also the largest graphed decode batch (default 64).
    talker_kv_blocks / talker_kv_gib: size of the paged talker pool, in blocks of kv_block_size
    tokens or in GiB; default: 2,048 tokens per request of max_active (or of 64), i.e. 40 MiB
    each for the full talker in bf16, at least 8,192 tokens (speech_graphs.plan_talker_blocks).
    pad_final_chunk: decode a request's last chunk padded to a schedule size (default on CUDA).
    code2wav_graph_batch: backend "graphs": the largest batch of code2wav decodes (conv stack,
    transformer) replayed as one CUDA graph each (larger groups take several replays); default 4
    (~0.25 GiB of graph memory per row, measured at 60 frames).
    compile_predictor: torch.compile the code predictor's frame loop before graphing it (GPU).
    keep_audio: keep each request's PCM on its job (job.pcm()); profile: time the phases.
    """

    def __init__(
        self,
        model,
        cfg,
        eos_token_ids: Sequence[int],
        *,
        sampling: TalkerSampling | None = None,
        schedule: Sequence[int] = DEFAULT_SCHEDULE,
        backend: str = "auto",
        max_active: int | None = None,
        talker_kv_blocks: int | None = None,
        talker_kv_gib: float | None = None,
        kv_block_size: int = 16,
        keep_audio: bool = False,
        pad_final_chunk: bool | None = None,
        batch_code2wav: bool | None = None,
        compile_predictor: bool = False,
        code2wav_graph_batch: int | None = None,
        profile: bool = False,
    ):
        if model.talker is None:
            raise InputError("this model has no talker: speech output is not available", param="speaker")
        self.model, self.cfg = model, cfg
        self.talker, self.code2wav = model.talker, model.code2wav
        self.embed_tokens = model.thinker.model.embed_tokens
        self.tcfg = cfg.talker_config
        self.eos_token_ids = set(eos_token_ids)
        self.sampling = sampling or TalkerSampling()
        self.schedule = tuple(schedule)
        self.keep_audio = keep_audio
        self.device = self.talker.codec_head.weight.device
        self.dtype = self.talker.codec_head.weight.dtype
        self.pad_final_chunk = self.device.type == "cuda" if pad_final_chunk is None else pad_final_chunk
        # requests at the same point of their streams share one code2wav forward (on the GPU each
        # call costs ~20 ms whatever its batch, so 32 requests were 32 calls per chunk). Batched
        # convolutions round differently from single ones, so off on the CPU, where the tests
        # compare PCM bit for bit with each request alone.
        self.batch_code2wav = self.device.type == "cuda" if batch_code2wav is None else batch_code2wav
        vocab = self.tcfg.text_config.vocab_size
        self.vocab = vocab
        self.codec_eos = self.tcfg.codec_eos_token_id
        self.suppress = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppress[suppressed_codec_ids(cfg)] = True
        self.suppress_all = self.suppress.clone()
        self.suppress_all[self.codec_eos] = True  # ignore_eos: never stop on codec_eos
        self.pred_vocab = self.talker.code_predictor.cfg.vocab_size
        self.groups = self.talker.num_code_groups
        with torch.inference_mode():
            special = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=self.device)
            # the same call as build_talker_inputs makes, so the rows are bit-identical
            _, self.tts_eos, self.tts_pad = self.talker.text_projection(self.embed_tokens(special).to(self.dtype)).unbind(0)
        if backend == "auto":
            backend = "graphs" if self.device.type == "cuda" else "contiguous"
        self.backend_name = backend
        if backend == "contiguous":
            self.runner = ContiguousTalker(self.talker)
            self.predictor = EagerPredictor(self.talker)
        elif backend in ("paged", "graphs"):
            from .speech_graphs import DEFAULT_MAX_BATCH, GraphPredictor, PagedTalker, plan_talker_blocks

            graphs = backend == "graphs"
            blocks = plan_talker_blocks(self.tcfg, self.dtype, block_size=kv_block_size, num_blocks=talker_kv_blocks,
                                        gib=talker_kv_gib, max_active=max_active)
            self.runner = PagedTalker(self.talker, blocks, kv_block_size, max_batch=max_active or DEFAULT_MAX_BATCH,
                                      graphs=graphs)
            self.predictor = GraphPredictor(self.talker, graphs=graphs, compile=compile_predictor)
        else:
            raise ValueError(f"speech backend must be auto, contiguous, paged or graphs, not {backend!r}")
        # code2wav's conv stack and transformer through static buffers, graphed on CUDA once `warmup`
        # captured their shapes (eager until then; off CUDA the static buffers run eagerly)
        self.code2wav_graphs = self.code2wav_tf_graphs = None
        if backend == "graphs":
            from .code2wav_graphs import DEFAULT_MAX_BATCH as C2W_MAX_BATCH
            from .code2wav_graphs import Code2WavGraphs, Code2WavTransformerGraphs

            c2w_batch = code2wav_graph_batch or C2W_MAX_BATCH
            self.code2wav_graphs = Code2WavGraphs(self.code2wav, max_batch=c2w_batch)
            self.code2wav_tf_graphs = Code2WavTransformerGraphs(self.code2wav, max_batch=c2w_batch,
                                                                mempool=self.code2wav_graphs.mempool)
        self.max_active = max_active
        self.jobs: dict[str, SpeechJob] = {}
        self.queue: deque[SpeechJob] = deque()  # waiting for a place (max_active, free KV blocks)
        self._admitted = 0  # admissions so far (SpeechJob.order)
        self._kv_blocked = False  # a request waited for a KV block in the last step
        self.finished: dict[str, SpeechJob] = {}  # done jobs not yet collected with `pop`
        self.profile = profile
        self.times: dict[str, float] = {"talker": 0.0, "predictor": 0.0, "code2wav": 0.0, "other": 0.0}
        # kv_waits: request-steps that waited for a talker KV block; preemptions: requests whose
        # blocks were freed to let older ones go on (recomputed later)
        self.counts: dict[str, int] = {"steps": 0, "frames": 0, "talker_tokens": 0, "kv_waits": 0, "preemptions": 0}
        self._events: list = []
        self._marks: list = []  # (phase, start event, end event) not yet read (CUDA)

    # -- public API -------------------------------------------------------------------------------
    def add(
        self,
        req: Request,
        *,
        on_chunk: Callable[[SpeechChunk], None] | None = None,
        max_frames: int | None = None,
        greedy: bool | None = None,
        ignore_eos: bool = False,
        decode_audio: bool = True,
    ) -> SpeechJob:
        """Speak `req`'s answer with `req.speaker` as the thinker produces it.

        max_frames: at most this many codec frames (default `req.speech_max_frames`, else the talker's
        limit); greedy: argmax talker and predictor (default: when the thinker samples greedily);
        ignore_eos: never stop on codec_eos (benchmarks: fixed-length speech).
        decode_audio=False: codes only (no code2wav; the only chunk event is the empty last one).
        Raises InputError for an unknown voice or a prompt without an assistant turn.
        """
        if req.speaker is None:
            raise InputError("the request has no speaker", param="speaker")
        if req.request_id in self.jobs:
            raise InputError(f"request {req.request_id} is already speaking", param="request_id")
        spk = speaker_id(self.cfg, req.speaker)
        start = _assistant_start(torch.tensor(req.prompt_ids), self.cfg)
        max_frames = req.speech_max_frames if max_frames is None else max_frames
        limit = self.sampling.max_new_tokens if max_frames is None else max_frames + 1
        greedy = req.sampling.greedy if greedy is None else greedy
        generator = None
        if not greedy and req.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        talker_len = int(_user_mask(torch.tensor(req.prompt_ids), self.cfg).sum()) + ASSISTANT_PART
        job = SpeechJob(req=req, speaker=spk, greedy=greedy or not self.sampling.do_sample, limit=limit,
                        ignore_eos=ignore_eos, generator=generator, on_chunk=on_chunk, assistant_start=start,
                        groups=self.groups, talker_len=talker_len, t_added=time.perf_counter())
        job.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        job.stream = self._code2wav_stream() if decode_audio else None
        self.jobs[req.request_id] = job
        self.queue.append(job)
        return job

    def cancel(self, request_id: str) -> bool:
        """Stop speaking a request: at the start of the next step it is dropped, its talker KV freed
        and its last (empty, "abort") chunk event sent. True if it was speaking."""
        job = self.jobs.get(request_id)
        if job is None:
            return False
        job.cancelled = True
        return True

    def has_work(self) -> bool:
        return bool(self.jobs)

    def pop(self, request_id: str) -> SpeechJob | None:
        """The finished job of a request (codes, kept audio), forgotten by the stage."""
        return self.finished.pop(request_id, None)

    @property
    def active(self) -> list[SpeechJob]:
        return [j for j in self.jobs.values() if j.state == RUNNING]

    def kv_tokens(self) -> int:
        """Talker KV tokens held, over all requests."""
        return sum(self.runner.kv_tokens(j) for j in self.jobs.values() if j.kv is not None)

    def _code2wav_stream(self) -> Code2WavStream:
        return Code2WavStream(self.code2wav, self.schedule, conv_runner=self.code2wav_graphs,
                              transformer_runner=self.code2wav_tf_graphs)

    @torch.inference_mode()
    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Pay one-time costs before the first request: CUDA graphs for these numbers of speaking
        requests (talker, predictor, and code2wav's conv stack and transformer for every shape the
        schedule makes), and one decode of every chunk shape (conv set-up of shapes run eagerly).
        Call at start-up, from the thread that steps the stage, with no request speaking."""
        if self.code2wav_graphs is not None:
            from .code2wav_graphs import stream_conv_frames

            # batched: requests at the same point share one decode (up to the graph batch)
            rows = max(batch_sizes) if self.batch_code2wav else 1
            frames = stream_conv_frames(self.schedule, self.code2wav.conv_context_frames, self.pad_final_chunk)
            self.code2wav_graphs.capture(self.code2wav_graphs.shapes(frames, rows))
            # the transformer's window is history + chunk, one shape per chunk size: the schedule's
            # (a padded last chunk is one of them; an unpadded shorter one runs eagerly). Captured
            # after the conv stack, whose larger graphs made the shared pool's blocks.
            self.code2wav_tf_graphs.capture(self.code2wav_tf_graphs.shapes(self.schedule, rows))
        sizes = sorted(set(self.schedule))
        first = self.schedule[0]
        second = self.schedule[1] if len(self.schedule) > 1 else first
        plans = [[first, n] for n in sizes if n <= second] + [[first, second, n] for n in sizes]
        for plan in plans:
            stream = self._code2wav_stream()
            for n in plan:
                stream.push(torch.zeros(self.groups, n, dtype=torch.long, device=self.device))
            stream.flush()
        if self.backend_name != "graphs":
            return
        hidden = torch.zeros(1, self.talker.cfg.text_config.hidden_size, dtype=self.dtype, device=self.device)
        for b in batch_sizes:
            code = torch.zeros(b, dtype=torch.long, device=self.device)
            # both predictor graphs of the bucket: greedy, and sampled (the server's default speech
            # samples; capturing that one on a live request cost seconds of first-audio latency)
            self.predictor(hidden.expand(b, -1), code, ResidualPick(self.sampling, None, None))
            noise = torch.ones(self.groups - 1, b, self.pred_vocab, device=self.device)
            greedy = torch.zeros(b, dtype=torch.bool, device=self.device)
            self.predictor(hidden.expand(b, -1), code, ResidualPick(self.sampling, greedy, noise))
            self.runner.warm(b)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[SpeechChunk]:
        """One talker step for every request that can take one; returns the PCM chunks it produced."""
        self._events = []
        t0 = self._now()
        for job in list(self.jobs.values()):
            if job.cancelled or job.req.finish_reason == "abort":
                self._end(job, "abort")
        self._admit()
        replayed = self._replay()
        prefill, decode = [], []
        for job in list(self.jobs.values()):
            if job.state == WAITING and job.kv is not None:
                ready = self._prefill_ready(job)
                if ready is None:
                    self._end(job, "empty")
                elif ready:
                    prefill.append(job)
        for job in prefill:
            if job.prompt is None:
                self._build_prefill(job)
        self._project_text([j for j in self.jobs.values() if j.state == RUNNING] + prefill)
        for job in self.jobs.values():
            if (job.state == RUNNING and job.kv is not None and job.pending is not None
                    and self._text(job, job.fed) is not None):
                decode.append(job)
        prefill, decode, blocked = self._reserve(prefill, decode)
        if blocked and not prefill and not decode and not replayed:
            self._preempt()  # every request that could run waits for a block: free the youngest's
        if not prefill and not decode:
            self._tick("other", t0)
            return self._events
        dec_embeds = dec_pos = None
        if decode:
            dec_embeds = torch.stack([j.pending + self._text(j, j.fed) for j in decode])
            dec_pos = [j.prefill_len + j.fed + j.prompt.rope_delta for j in decode]
        t1 = self._tick("other", t0)
        prefills = [(j, j.prompt.embeds, j.prompt.positions) for j in prefill]
        hidden, logits = self.runner.forward(prefills, decode, dec_embeds, dec_pos)
        for job in prefill:
            job.state = RUNNING
        for job in decode:
            job.fed += 1
            job.pending = None
        batch = prefill + decode
        self.counts["talker_tokens"] += sum(j.prefill_len for j in prefill) + len(decode)
        t2 = self._tick("talker", t1)
        first = self._pick_first(logits, batch)
        pick = self._residual_pick(batch)
        codes, summed = self.predictor(hidden, first, pick)
        host = codes.cpu()  # the step's one copy to the host: which requests stopped
        t3 = self._tick("predictor", t2)
        self.counts["steps"] += 1
        decoding: list[SpeechJob] = []
        for i, job in enumerate(batch):
            job.picked += 1
            code = int(host[i, 0])
            if (code == self.codec_eos and not job.ignore_eos) or job.picked >= job.limit:
                self._end(job, "stop" if code == self.codec_eos and not job.ignore_eos else "length")
                continue
            job.frames.append(codes[i])
            job.host_codes.append(host[i])
            job.pending = summed[i]
            self.counts["frames"] += 1
            if job.stream is not None:
                if self.batch_code2wav:
                    job.stream.append(codes[i][:, None])
                    decoding.append(job)
                else:
                    pcm = job.stream.push(codes[i][:, None])
                    if pcm is not None:
                        self._emit(job, pcm, finished=False)
        for job, pcm in zip(decoding, Code2WavStream.decode_due_together([j.stream for j in decoding])):
            if pcm is not None:
                self._emit(job, pcm, finished=False)
        self._tick("code2wav", t3)
        return self._events

    # -- admission, KV blocks and preemption -------------------------------------------------------
    def _admit(self) -> None:
        """Give waiting requests KV, first come first served (a preempted one first). While a request
        waits for a block, none is admitted: it would take the blocks the waiting one needs."""
        while self.queue and not self._kv_blocked:
            holders = sum(1 for j in self.jobs.values() if j.kv is not None)
            if self.max_active is not None and holders >= self.max_active:
                return
            job = self.queue[0]
            if job.done:
                self.queue.popleft()
                continue
            # a preempted request recomputes the decode inputs it was fed too
            need = (job.prefill_len or job.talker_len) + job.fed
            if not self.runner.fits(need + 1):
                self.queue.popleft()
                log.warning("request %s needs %d talker KV tokens, more than the pool holds: not spoken",
                            job.request_id, need + 1)
                self._end(job, "length")
                continue
            # a block to spare per request holding KV, so admitting this one does not stall them
            if not self.runner.open(job, need, keep_free=holders):
                return
            self.queue.popleft()
            self._admitted += 1
            job.order = self._admitted

    def _reserve(self, prefill: list[SpeechJob], decode: list[SpeechJob]):
        """KV for this step's new tokens, oldest request first -> (prefill, decode, waiting) jobs;
        a request that gets no block waits (skips the step), one that could never hold its tokens ends."""
        wanted = sorted([(j, j.prefill_len) for j in prefill] + [(j, self.runner.kv_tokens(j) + 1) for j in decode],
                        key=lambda item: item[0].order)
        ok, blocked = set(), []
        for job, tokens in wanted:
            if not self.runner.fits(tokens):
                log.warning("request %s outgrew the talker KV (%d tokens): speech cut short", job.request_id, tokens)
                self._end(job, "length")
            elif self.runner.reserve(job, tokens):
                ok.add(id(job))
            else:
                blocked.append(job)
        self._kv_blocked = bool(blocked)
        self.counts["kv_waits"] += len(blocked)
        return [j for j in prefill if id(j) in ok], [j for j in decode if id(j) in ok], blocked

    def _preempt(self) -> None:
        """Free the KV of the most recently admitted request holding some and queue it first; if it
        is the only one, the pool cannot hold it at all: it ends ("length")."""
        holders = sorted((j for j in self.jobs.values() if j.kv is not None), key=lambda j: j.order)
        if not holders:
            return
        victim = holders[-1]
        if len(holders) == 1:
            log.warning("request %s outgrew the talker KV pool (%d tokens): speech cut short",
                        victim.request_id, self.runner.kv_tokens(victim))
            self._end(victim, "length")
            self._kv_blocked = False
            return
        self.runner.close(victim)
        victim.replay = victim.state == RUNNING  # its prompt (and decode inputs) are recomputed
        self.queue.appendleft(victim)
        self.counts["preemptions"] += 1
        # _kv_blocked stays set: the freed blocks go to the waiting requests next step, not to admission

    def _replay(self) -> bool:
        """Recompute the KV of readmitted preempted requests: the talker prompt and the decode inputs
        fed so far (each frame's summed codec embedding + its trailing text), in one prefill whose
        outputs are dropped (the next frame's input is still `pending`). True if any ran."""
        jobs = [j for j in self.jobs.values() if j.replay and j.kv is not None]
        if not jobs:
            return False
        items = []
        for job in jobs:
            embeds, positions = job.prompt.embeds, job.prompt.positions.to(torch.float32)
            n = job.fed
            if n:
                codes = torch.stack(job.frames[:n])  # [n, G]
                fed = torch.cat([self.talker.embed_codes(codes[:, 0])[:, None]]
                                + [self.talker.code_predictor.embed(codes[:, g], g)[:, None].to(embeds.dtype)
                                   for g in range(1, self.groups)], dim=1).sum(1)
                fed = fed + torch.stack([self._text(job, k) for k in range(n)])
                pos = torch.arange(n, dtype=torch.float32, device=self.device) + job.prefill_len + job.prompt.rope_delta
                embeds = torch.cat([embeds, fed.to(embeds.dtype)])
                positions = torch.cat([positions, pos[None].expand(3, -1)], dim=1)
            if not self.runner.reserve(job, embeds.shape[0]):  # admission gave it these blocks
                raise RuntimeError(f"no talker KV for the recompute of request {job.request_id}")
            items.append((job, embeds, positions))
        self.runner.forward(items, [], None, None)
        self.counts["talker_tokens"] += sum(e.shape[0] for _, e, _ in items)
        for job in jobs:
            job.replay = False
        return True

    # -- readiness --------------------------------------------------------------------------------
    def _fed_generated(self, req: Request) -> int:
        """Generated tokens known to be fed to the thinker: all but the one that finished it."""
        n = len(req.output_ids)
        return n if req.finish_reason is None else max(n - 1, 0)

    def _prefill_ready(self, job: SpeechJob) -> bool | None:
        """True: the talker prompt is known; False: wait; None: the answer is empty (nothing to say)."""
        req = job.req
        a = len(req.prompt_ids) - job.assistant_start
        if req.capture is None or _captured(req) < len(req.prompt_ids):
            return None if req.finish_reason is not None else False
        if a + self._fed_generated(req) >= 4:
            return True
        return None if req.finish_reason is not None else False

    def _build_prefill(self, job: SpeechJob) -> None:
        req = job.req
        layer = self.tcfg.accept_hidden_layer
        n_prompt = len(req.prompt_ids)
        a = n_prompt - job.assistant_start
        need = max(0, 4 - a)
        embeds = torch.cat(req.capture[0])[:n_prompt]
        hidden = torch.cat(req.capture[layer])[:n_prompt]
        gen = req.output_ids[:need]
        if need:
            embeds = torch.cat([embeds, self.embed_tokens(torch.tensor(gen, device=embeds.device)).to(embeds.dtype)])
        prompt = build_talker_inputs(
            self.talker, embeds, hidden, torch.tensor(req.prompt_ids + gen), job.speaker, self.cfg,
            embed_tokens=self.embed_tokens, prompt_len=n_prompt, eos_token_ids=[], mm=getattr(req, "mm_inputs", None),
        )
        job.prompt = prompt
        job.prefill_len = prompt.embeds.shape[0]
        if a > 4:  # assistant tokens of the prompt beyond a_3 are trailing text too
            rows = embeds[job.assistant_start + 4 : n_prompt].to(device=self.device, dtype=self.dtype)
            job.trail = list(self.talker.text_projection(rows).unbind(0))

    def _project_text(self, jobs: list[SpeechJob]) -> None:
        """Project the newly fed generated tokens of `jobs` (one embedding + projection call)."""
        ids, owners = [], []
        for job in jobs:
            req = job.req
            a = len(req.prompt_ids) - job.assistant_start
            start = max(job.projected, 4 - a, 0)
            fed = self._fed_generated(req)
            if fed > start:
                ids.extend(req.output_ids[start:fed])
                owners.append((job, fed - start))
                job.projected = fed
        if not ids:
            return
        rows = self.talker.text_projection(
            self.embed_tokens(to_device(ids, torch.long, self.device)).to(self.dtype)
        ).unbind(0)
        offset = 0
        for job, n in owners:
            job.trail.extend(rows[offset : offset + n])
            offset += n

    def _text(self, job: SpeechJob, k: int) -> torch.Tensor | None:
        """Trailing text embedding of decode step k, or None while the thinker has not produced it."""
        req = job.req
        if req.finish_reason is None:
            return job.trail[k] if k < len(job.trail) and k < len(req.output_ids) else None
        n_trail = len(job.trail)  # all fed tokens are projected by now
        first_eos = next((i for i, t in enumerate(req.output_ids) if t in self.eos_token_ids), len(req.output_ids))
        end = first_eos if first_eos < n_trail + 1 else n_trail
        if k < end:
            return job.trail[k]
        return self.tts_eos if k == end else self.tts_pad

    # -- picking ----------------------------------------------------------------------------------
    def _pick_first(self, logits: torch.Tensor, batch: list[SpeechJob]) -> torch.Tensor:
        s = self.sampling
        seen = torch.stack([j.seen for j in batch])
        logits = penalize_repeats(logits.float(), seen, s.repetition_penalty)
        suppress = torch.stack([self.suppress_all if j.ignore_eos else self.suppress for j in batch])
        logits = logits.masked_fill(suppress, float("-inf"))
        code = torch.argmax(logits, dim=-1)
        sampled = [i for i, j in enumerate(batch) if not j.greedy]
        if sampled:
            noise = self._noise(batch, self.vocab, None)
            drawn = draw(filter_logits(logits, s.temperature, s.top_k, s.top_p), noise)
            greedy = to_device([j.greedy for j in batch], torch.bool, self.device)
            code = torch.where(greedy, code, drawn)
        seen.scatter_(1, code[:, None], True)
        for i, job in enumerate(batch):
            job.seen = seen[i]
        return code

    def _residual_pick(self, batch: list[SpeechJob]) -> ResidualPick:
        if all(j.greedy for j in batch):
            return ResidualPick(self.sampling, None, None)
        noise = self._noise(batch, self.pred_vocab, self.groups - 1).transpose(0, 1)  # [G-1, B, V]
        greedy = to_device([j.greedy for j in batch], torch.bool, self.device)
        return ResidualPick(self.sampling, greedy, noise)

    def _noise(self, batch: list[SpeechJob], vocab: int, groups: int | None) -> torch.Tensor:
        """Exp(1) noise [B, (groups,) V]: per request from its generator, else torch's global RNG."""
        shape = (vocab,) if groups is None else (groups, vocab)
        rows = []
        for job in batch:
            row = torch.empty(shape, device=self.device)
            if not job.greedy:
                row.exponential_(generator=job.generator)
            else:
                row.fill_(1.0)
            rows.append(row)
        return torch.stack(rows).clamp_min_(torch.finfo(torch.float32).tiny)

    # -- endings and events -----------------------------------------------------------------------
    def _end(self, job: SpeechJob, reason: str) -> None:
        if job.done:
            return
        pcm = self._flush(job) if reason != "abort" and job.stream is not None and job.frames else None
        job.state = DONE
        job.finish_reason = reason
        job.pending = None
        if job.kv is not None:
            self.runner.close(job)
        self.jobs.pop(job.request_id, None)
        self.finished[job.request_id] = job
        while len(self.finished) > MAX_FINISHED:  # callers that never `pop` do not grow it forever
            self.finished.pop(next(iter(self.finished)))
        self._emit(job, pcm, finished=True)

    def _flush(self, job: SpeechJob) -> torch.Tensor:
        """The rest of a request's waveform. With pad_final_chunk the pending frames are padded to
        a schedule size (code2wav's conv shapes stay few: no per-length setup on the GPU) and the
        output is cut to the one-shot length: samples before T*U - lookahead never read frame T."""
        stream = job.stream
        pending = stream.frames_pending
        if not self.pad_final_chunk or pending == 0:
            return stream.flush()
        target = final_chunk_frames(pending, self.schedule)
        out = []
        if target > pending:
            pad = torch.zeros(self.groups, target - pending, dtype=torch.long, device=self.device)
            part = stream.push(pad)
            if part is not None:
                out.append(part)
        out.append(stream.flush())
        total = len(job.frames) * self.code2wav.total_upsample - self.code2wav.lookahead_samples
        return torch.cat(out)[: max(0, total - job.samples)]

    def _emit(self, job: SpeechJob, pcm: torch.Tensor | None, finished: bool) -> None:
        samples = np.zeros(0, dtype=np.float32) if pcm is None else pcm.float().flatten().cpu().numpy()
        job.samples += samples.size
        if job.t_first_chunk is None and samples.size:
            job.t_first_chunk = time.perf_counter()
        if self.keep_audio and samples.size:
            job.audio.append(samples)
        chunk = SpeechChunk(job.request_id, samples, job.chunks, len(job.frames), finished,
                            job.finish_reason if finished else None)
        job.chunks += 1
        self._events.append(chunk)
        if job.on_chunk is not None:
            job.on_chunk(chunk)

    # -- timing -----------------------------------------------------------------------------------
    def _now(self):
        if not self.profile:
            return None
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _tick(self, phase: str, since):
        """Charge the time since `since` to `phase`; returns now (CUDA events are read in collect_times)."""
        if not self.profile:
            return None
        now = self._now()
        if self.device.type == "cuda":
            self._marks.append((phase, since, now))
        else:
            self.times[phase] += now - since
        return now

    def collect_times(self) -> dict[str, float]:
        """Seconds spent per phase so far (synchronises the GPU once)."""
        if self._marks:
            torch.cuda.synchronize()
            for phase, a, b in self._marks:
                self.times[phase] += a.elapsed_time(b) / 1000
            self._marks = []
        return dict(self.times)


def _captured(req: Request) -> int:
    return sum(x.shape[0] for x in req.capture[0]) if req.capture else 0
