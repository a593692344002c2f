"""code2wav's conv stack and transformer as CUDA graphs, one per (batch bucket, frames / chunk frames).

Why: a streaming code2wav decode (`Code2WavStream._decode`) runs the sliding-window transformer
over the chunk and its history, then the conv stack over [<= conv_context_frames cached
transformer outputs + chunk] frames: two trans-convs with ConvNeXt blocks, then four decoder
blocks of SnakeBeta + trans-conv + three residual units. On the GPU a decode's ~3,400 aten calls
are launched one by one from Python and the decode is host bound: ~46 ms on an H100 whatever the
chunk's length, 0.28 s of a 1.18 s spoken answer at one request. The conv stack is about half of
those calls (507 of 936 top-level ops for a 50-frame chunk with the real config, counted on the
CPU; the transformer is the rest) and has few shapes, so it is graphed: replaying a captured graph
launches its kernels all at once. The transformer is graphed too (`Code2WavTransformerGraphs`,
below): its window is made fixed-length by masked left padding.

A graph replays fixed shapes over fixed memory, so each (bucket, T) has a static input
[bucket, T, hidden] and a static output [bucket, 1, T*U - lookahead]. A call with B rows of T
frames copies them into the input (rows B..bucket-1 zero: every conv, norm and activation of the
stack works per batch row, so padding rows never change the real ones), replays, and returns a
copy of the first B rows (the next replay overwrites the output). Groups larger than the largest
bucket run as several replays of it (and one of a smaller bucket for the rest), which also bounds
the memory the graphs hold: their intermediates live in one memory pool shared by all graphs
(captured largest first, so the smaller ones reuse its blocks), sized by the largest graph alone,
~0.25 GiB per batch row for a 60-frame window of the full model in bf16 (measured on an H100
with benchmarks/check_code2wav_graphs.py: 2.0 GiB for a bucket of 8, 1.13 GiB for the default
largest bucket of 4; api.SPEECH_WORKING_SET keeps room for it).

Which shapes: a stream's conv-stack lengths are few and known in advance (`stream_conv_frames`:
chunk sizes plus a history that grows to conv_context_frames, and the padded final chunk), so the
speech stage captures them all at start-up (`SpeechStage.warmup` -> `capture`). A shape never
captured runs eagerly (`counts["eager"]`): capturing on a live request would stall it for the
warm-up and capture runs.

The stack is capturable as it is: causal convs pad with constants, trans-convs trim by
Python-constant amounts, SnakeBeta and the ConvNeXt block are elementwise / norm / linear ops;
nothing reads a tensor's value on the host or has a data-dependent shape.

Off CUDA the same static-buffer path runs eagerly (the stack over the padded input buffer), which
is what the CPU tests compare with `wav_from_hidden`. A capture failure on CUDA logs a warning and
drops every graph of that runner: all its shapes then run eagerly.

The transformer (`Code2Wav.hidden_from_codes`, 8 sliding-window layers) runs over history + chunk
codes at rotary positions that move with the stream, and the history grows from 0 to
transformer_context_frames (C = 568): as written, a new shape and new positions every chunk until
the history is full. `Code2WavTransformerGraphs` always runs C + n frames for a chunk of n,
left-padding the missing history with dummy frames that the attention mask hides as keys, and
takes the first rotary position and the pad count as device scalars: one graph per (bucket, n)
serves every history length and stream position. Both runners share one memory pool.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .decode_graphs import warm_and_capture
from .models.code2wav import Code2Wav

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8)
DEFAULT_MAX_BATCH = 4  # largest graphed batch; ~0.25 GiB of graph pool per row at 60 frames (full model, bf16)


def stream_conv_frames(schedule: Sequence[int], conv_context_frames: int, pad_final: bool = True) -> list[int]:
    """Every frame count T the conv stack sees in an exact `Code2WavStream` with this schedule.

    Chunk k of n_k frames (n_k = schedule[k], the last entry repeating) runs the stack over
    hist_k + n_k frames, hist_k = min(conv_context_frames, frames decoded before it) (the cached
    transformer outputs, `Code2WavStream._decode`). With pad_final (`SpeechStage._flush`), a
    request's last chunk is padded to the smallest schedule size >= its frames: some schedule size
    <= n_k, over the same hist_k. Without it a last chunk can be any length below n_k: those are
    left out (they run eagerly). Once the schedule repeats and the history is full, the shapes
    repeat too, which is where the walk stops."""
    if not schedule or any(int(n) < 1 for n in schedule):
        raise ValueError(f"schedule must be a non-empty list of positive frame counts, got {schedule!r}")
    sizes = sorted({int(n) for n in schedule})
    frames: set[int] = set()
    decoded, k = 0, 0
    while True:
        n = int(schedule[min(k, len(schedule) - 1)])
        hist = min(conv_context_frames, decoded)
        frames.add(hist + n)
        if pad_final:
            frames.update(hist + s for s in sizes if s <= n)
        if k >= len(schedule) - 1 and hist == conv_context_frames:
            return sorted(frames)
        decoded += n
        k += 1


@dataclass
class _Entry:
    """One (bucket, key) shape: static inputs (batch first), and on CUDA its graph and static output."""

    inputs: tuple[torch.Tensor, ...]  # each [bucket, ...]
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None  # [bucket, ...]
    filled: int = 0  # rows of the inputs holding real data since the last call (the rest are zero)


class _BucketedGraphs:
    """What both code2wav runners share: static buffers per (batch bucket, key) (key: the conv
    stack's frames, the transformer's chunk frames), captured largest first into one memory pool
    (which several runners may share), calls of B rows padded to the next bucket with zero rows or
    split into replays of the largest bucket, and a capture failure dropping every graph of the
    runner (all its shapes then run eagerly). Off CUDA the same buffers run `_body` eagerly.

    A subclass says how to allocate an entry's inputs (`_new_entry`), what runs over them
    (`_body`) and how large a shape is (`_size`: the capture order), and loads each piece's rows
    through `_through_graphs`."""

    def __init__(self, model: Code2Wav, buckets: Sequence[int] = BUCKETS, max_batch: int = DEFAULT_MAX_BATCH,
                 mempool=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.buckets = tuple(sorted({b for b in buckets if 0 < b < max_batch} | {max_batch}))
        self.max_batch = max_batch
        weight = model.code_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.hidden_size = weight.shape[1]
        self.use_graphs = self.device.type == "cuda"
        # one pool for every graph of this runner (and of the runners handed it): graphs replay one
        # at a time and each keeps its static output alive, so their intermediates can share blocks
        self.mempool = mempool if mempool is not None or not self.use_graphs else torch.cuda.graph_pool_handle()
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._buckets_of: dict[int, list[int]] = {}  # key -> captured buckets, ascending
        self.counts = {"replays": 0, "eager": 0}

    # -- what a subclass provides -------------------------------------------------------------------
    def _new_entry(self, bucket: int, key: int) -> _Entry:
        raise NotImplementedError

    def _body(self, entry: _Entry) -> torch.Tensor:
        raise NotImplementedError

    def _size(self, bucket: int, key: int) -> int:
        raise NotImplementedError

    # -- shapes -----------------------------------------------------------------------------------
    def bucket(self, rows: int) -> int:
        """The bucket `rows` rows run in (the largest one when they need several replays)."""
        i = bisect.bisect_left(self.buckets, rows)
        return self.buckets[min(i, len(self.buckets) - 1)]

    def shapes(self, keys: Iterable[int], max_rows: int = 1) -> list[tuple[int, int]]:
        """(bucket, key) for each key and each bucket up to the one `max_rows` rows use."""
        top = self.bucket(max(1, max_rows))
        return [(b, int(k)) for k in sorted(set(keys)) for b in self.buckets if b <= top]

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._entries)

    # -- capture ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, shapes: Iterable[tuple[int, int]]) -> None:
        """Graph these (bucket, key) shapes (off CUDA: make their static buffers), largest first so
        the smaller graphs reuse the pool's blocks. Call at start-up: each costs a few runs."""
        if self.device.type == "cuda" and not self.use_graphs:
            return  # a capture failed: everything runs eagerly, unpadded
        todo = sorted({(int(b), int(k)) for b, k in shapes} - set(self._entries),
                      key=lambda s: (self._size(*s), s), reverse=True)
        for bucket, key in todo:
            if bucket < 1 or key < 1:
                raise ValueError(f"code2wav graph shape must be positive, got ({bucket}, {key})")
            entry = self._new_entry(bucket, key)
            if self.use_graphs and not self._capture(entry, (bucket, key)):
                return
            self._entries[(bucket, key)] = entry
            bisect.insort(self._buckets_of.setdefault(key, []), bucket)

    def _capture(self, entry: _Entry, shape: tuple[int, int]) -> bool:
        try:
            entry.graph, entry.output = warm_and_capture(lambda: self._body(entry), self.mempool, self.device)
            return True
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured (or out of memory)
            log.warning("%s CUDA graph %s not captured (%r); it runs eagerly", type(self).__name__, shape, exc)
            self.use_graphs = False
            self._entries.clear()
            self._buckets_of.clear()
            torch.cuda.synchronize(self.device)
            return False

    # -- the call ---------------------------------------------------------------------------------
    def _through_graphs(self, key: int, rows: int, load: Callable[[_Entry, int, int], None]) -> torch.Tensor | None:
        """Run `rows` rows through the captured shapes of `key`, None if there are none.

        load(entry, start, n) writes rows start..start+n-1 of the call into the first n rows of the
        entry's inputs (the rows after them are zeroed here). The result is a copy: the next replay
        overwrites the static output."""
        buckets = self._buckets_of.get(key)
        if not buckets or rows == 0:
            return None
        out = None
        start = 0
        while start < rows:
            n = min(rows - start, buckets[-1])
            entry = self._entries[(buckets[bisect.bisect_left(buckets, n)], key)]
            load(entry, start, n)
            if entry.filled > n:
                for buf in entry.inputs:
                    buf[n : entry.filled].zero_()
            entry.filled = n
            self.counts["replays"] += 1
            if entry.graph is None:
                result = self._body(entry)
            else:
                entry.graph.replay()
                result = entry.output
            if n == rows:
                return result[:n].clone()
            if out is None:
                out = result.new_empty((rows, *result.shape[1:]))
            out[start : start + n].copy_(result[:n])  # before the next replay overwrites it
            start += n
        return out


class Code2WavGraphs(_BucketedGraphs):
    """`wav_from_hidden(hidden [B, T, H]) -> wav [B, 1, T*U - lookahead]` through captured shapes.

    A `Code2WavStream`'s `conv_runner`. buckets: graphed batch sizes, capped at max_batch (which
    is always one); `capture(shapes)` graphs (bucket, T) shapes; a call whose T was captured runs
    through them (B above the largest captured bucket for T in several replays), any other eagerly.
    counts: "replays" (static-path runs, graphed or, off CUDA, eager) and "eager" (calls that
    found no captured shape). mempool: the CUDA graph pool to capture into (default: a new one)."""

    def _new_entry(self, bucket: int, frames: int) -> _Entry:
        return _Entry((torch.zeros(bucket, frames, self.hidden_size, dtype=self.dtype, device=self.device),))

    def _body(self, entry: _Entry) -> torch.Tensor:
        return self.model.wav_from_hidden(entry.inputs[0])

    def _size(self, bucket: int, frames: int) -> int:
        return bucket * frames

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        def load(entry: _Entry, start: int, n: int) -> None:
            entry.inputs[0][:n].copy_(hidden[start : start + n])

        wav = self._through_graphs(hidden.shape[1], hidden.shape[0], load)
        if wav is None:
            self.counts["eager"] += 1
            return self.model.wav_from_hidden(hidden)
        return wav


class Code2WavTransformerGraphs(_BucketedGraphs):
    """An exact stream decode's transformer, `hidden_from_codes(window, position_offset)[:, kept:]`
    for window = codes [B, Q, kept + n], through one captured shape per (bucket, n).

    A `Code2WavStream`'s `transformer_runner`. The stream's window holds kept history frames
    (0 at the start, growing chunk by chunk to C = transformer_context_frames) and the n new ones,
    at rotary positions position_offset + 0.., so its length and positions change from decode to
    decode. Here the window is always C + n frames: P = C - kept dummy frames (code 0) before the
    real ones, hidden as keys (`TransformerModel.forward`'s key_mask; each dummy query attends to
    itself only, so nothing is NaN), at positions position_offset - P + 0... P and the first
    position are device scalars the graph reads (`pad`, `offset`), set by `fill_` before a replay:
    no host sync, and one graph serves every kept. The real frames' outputs are the same math as
    the stream's own (a hidden key's probability is exactly 0), so they differ by float rounding
    only (~5e-7 in float32 on the CPU for values of ~3) and are bit-equal once kept = C (nothing
    padded: the key mask is all true). The last n outputs are the graph's output.

    Streams decoded together share kept and positions (`Code2WavStream.decode_due_together`), so
    their stacked rows take one replay per bucket piece, as in the conv runner. Calls that cannot
    use a captured shape run `hidden_from_codes` eagerly (counted): n never captured, kept > C
    (a stream told to keep more history), or a model with a full-attention layer (C is None: a
    window that grows without end, nothing is captured)."""

    def __init__(self, model: Code2Wav, buckets: Sequence[int] = BUCKETS, max_batch: int = DEFAULT_MAX_BATCH,
                 mempool=None):
        super().__init__(model, buckets, max_batch, mempool)
        self.context = model.transformer_context_frames
        self.offset = torch.zeros((), dtype=torch.long, device=self.device)  # rotary position of the window's frame 0
        self.pad = torch.zeros((), dtype=torch.long, device=self.device)  # dummy frames at the window's start

    def _new_entry(self, bucket: int, n: int) -> _Entry:
        m = self.model
        return _Entry((torch.zeros(bucket, m.num_quantizers, self.context + n, dtype=torch.long, device=self.device),))

    def _body(self, entry: _Entry) -> torch.Tensor:
        codes = entry.inputs[0]
        frames = codes.shape[-1]
        i = torch.arange(frames, device=self.device)
        h = self.model.hidden_from_codes(codes, positions=self.offset + i, key_mask=i >= self.pad)
        # a copy, so that the static output is the chunk's n frames and the whole window's
        # outputs are an intermediate the pool reuses (~1.2 MiB per row of each graph otherwise)
        return h[:, self.context :].clone()

    def _size(self, bucket: int, n: int) -> int:
        return bucket * (self.context + n)

    @torch.inference_mode()
    def capture(self, shapes: Iterable[tuple[int, int]]) -> None:
        if self.context is not None:
            super().capture(shapes)

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor, kept: int, position_offset: int) -> torch.Tensor:
        rows, n = window.shape[0], window.shape[-1] - kept
        pad = -1 if self.context is None else self.context - kept
        out = None
        if pad >= 0 and n in self._buckets_of:
            self.offset.fill_(position_offset - pad)
            self.pad.fill_(pad)

            def load(entry: _Entry, start: int, count: int) -> None:
                codes = entry.inputs[0]
                codes[:count, :, pad:].copy_(window[start : start + count])
                if pad:
                    codes[:count, :, :pad].zero_()

            out = self._through_graphs(n, rows, load)
        if out is None:
            self.counts["eager"] += 1
            return self.model.hidden_from_codes(window, position_offset=position_offset)[:, kept:]
        return out
