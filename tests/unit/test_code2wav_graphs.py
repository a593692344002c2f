"""code2wav's conv stack and transformer through static per-(bucket, shape) buffers
(thinktalk/code2wav_graphs.py), CPU.

On CUDA those buffers are replayed as CUDA graphs; off CUDA the same path runs eagerly over them,
so these tests check everything but the replay itself. The conv stack:

* a batch that is a bucket gives exactly `wav_from_hidden`'s bits; one that is not is padded to the
  next bucket (its rows are exactly those of the stack over the zero-padded batch, equal to the
  unpadded stack up to rounding, and independent of the padding rows' content); one larger than
  the largest bucket runs as several pieces; frame counts never captured run eagerly (counted);
* a `Code2WavStream` (one, or several decoded together) with the runner gives the PCM it gives
  without;
* `stream_conv_frames` is exactly the set of conv-stack lengths streams of 1..125 frames use with
  the speech stage's padded last chunk, so what warmup captures covers them (no eager call).

The transformer (`Code2WavTransformerGraphs`: a fixed window of transformer_context_frames + n
frames, the history left-padded with masked dummy frames):

* the masked padded window gives the real frames' outputs of `hidden_from_codes` over the real
  frames alone, to float32 rounding (< 2e-6 for values of ~3), for no history, a little, and a
  saturated one (bit-equal then: nothing is padded); the dummy frames are invisible (other dummy
  codes: the same bits) and every row stays finite (the layer mask leaves no softmax row
  all-masked: each dummy query sees itself);
* the runner equals `hidden_from_codes(window, offset)[:, kept:]` for batches that are a bucket,
  padded to one, and split; clears the rows and dummy frames an earlier call left; runs
  uncaptured chunk sizes, longer histories and full-attention models eagerly (counted);
* whole streams through both runners (125 frames; 200, where the history saturates; with their
  padded last chunks and flush), alone and decoded together, give the PCM of the plain stream and
  of the one-shot decode, to rounding (float32, amplified by the random decoder: < 1e-4; float64:
  < 1e-9).
"""

from __future__ import annotations

import copy

import pytest
import torch

from thinktalk.code2wav_graphs import DEFAULT_MAX_BATCH as DEFAULT_MAX_ROWS
from thinktalk.code2wav_graphs import Code2WavGraphs, Code2WavTransformerGraphs, stream_conv_frames
from thinktalk.config import config_from_dict
from thinktalk.models.code2wav import Code2Wav, Code2WavStream, TransformerModel
from thinktalk.speech_stage import DEFAULT_SCHEDULE, final_chunk_frames
from thinktalk.weights.tiny import randomize_
from thinktalk.weights.tiny_config import tiny_config_dict


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a shared box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> Code2Wav:
    """The tiny checkpoint's code2wav (real upsampling geometry), random weights, its output conv
    scaled so the waveform is rarely clamped (a clamp would hide differences)."""
    m = randomize_(Code2Wav(config_from_dict(tiny_config_dict()).code2wav_config).eval(), 0)
    hidden = torch.randn(1, 12, m.code_embedding.weight.shape[1], generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = m.decoder[-1].register_forward_hook(lambda mod, i, o: seen.setdefault("out", o))
    with torch.inference_mode():
        m.wav_from_hidden(hidden)
    hook.remove()
    with torch.no_grad():
        scale = 0.3 / seen["out"].std()
        m.decoder[-1].conv.weight.mul_(scale)
        m.decoder[-1].conv.bias.mul_(scale)
    return m


def _hidden(model, rows: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, frames, model.code_embedding.weight.shape[1], generator=g)


def _pieces(rows: int, buckets: list[int]) -> list[tuple[int, int]]:
    """The split the runner promises: the largest bucket while more rows remain, then the rest
    padded to the smallest bucket that holds it; (rows, bucket) per piece."""
    out = []
    while rows:
        n = min(rows, buckets[-1])
        out.append((n, next(b for b in buckets if b >= n)))
        rows -= n
    return out


@pytest.mark.parametrize("frames", [4, 12])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 11])
def test_static_path_equals_the_stack(model, rows, frames):
    runner = Code2WavGraphs(model, buckets=(1, 2), max_batch=4)  # buckets 1, 2, 4
    assert runner.buckets == (1, 2, 4)
    runner.capture(runner.shapes([frames], max_rows=rows))
    hidden = _hidden(model, rows, frames, seed=rows * 100 + frames)
    with torch.inference_mode():
        got = runner(hidden)
        direct = model.wav_from_hidden(hidden)
        # what each piece's bucket computes: the stack over its rows, zero-padded to the bucket
        expected, start = [], 0
        for n, bucket in _pieces(rows, list(runner.buckets)):
            padded = torch.zeros(bucket, *hidden.shape[1:])
            padded[:n] = hidden[start : start + n]
            expected.append(model.wav_from_hidden(padded)[:n])
            start += n
        expected = torch.cat(expected)
    assert got.shape == direct.shape == (rows, 1, frames * model.total_upsample - model.lookahead_samples)
    assert torch.equal(got, expected)
    if rows in runner.buckets:
        assert torch.equal(got, direct)  # nothing padded, nothing split: the very same computation
    # padding and splitting change nothing but rounding (every op of the stack is per batch row)
    assert (got - direct).abs().max().item() < 1e-4  # ~1e-5: batch-size-dependent conv rounding, amplified
    assert (got.abs() < 1).float().mean() > 0.9  # the waveform is not clamped flat: the comparison means something
    assert runner.counts == {"replays": len(_pieces(rows, list(runner.buckets))), "eager": 0}


def test_padding_rows_are_zero_and_do_not_reach_the_real_rows(model):
    runner = Code2WavGraphs(model, buckets=(1, 4), max_batch=4)
    runner.capture([(4, 12)])
    entry = runner._entries[(4, 12)]
    full = _hidden(model, 4, 12, seed=7)
    with torch.inference_mode():
        runner(full * 1e3)  # fills all four rows of the bucket with large values
        one = runner(full[:1])
        assert torch.count_nonzero(entry.inputs[0][1:]) == 0  # the earlier batch's rows were cleared
        # the stack over the same row with other (large) rows beside it: the same bits
        beside = model.wav_from_hidden(torch.cat([full[:1], full[1:] * 1e3]))[:1]
    assert torch.equal(one, beside)
    assert runner.counts == {"replays": 2, "eager": 0}


def test_uncaptured_frames_run_eagerly_and_are_counted(model):
    runner = Code2WavGraphs(model, max_batch=2)
    runner.capture(runner.shapes([4], max_rows=2))
    assert runner.captured == [(1, 4), (2, 4)]
    hidden = _hidden(model, 3, 5, seed=3)
    with torch.inference_mode():
        got = runner(hidden)
        assert torch.equal(got, model.wav_from_hidden(hidden))
    assert runner.counts == {"replays": 0, "eager": 1}


def test_shapes_and_buckets(model):
    assert Code2WavGraphs(model).buckets == (1, 2, 4)  # default max_batch 4
    runner = Code2WavGraphs(model, max_batch=8)
    assert runner.buckets == (1, 2, 4, 8)
    assert [runner.bucket(n) for n in (1, 2, 3, 5, 8, 9, 40)] == [1, 2, 4, 8, 8, 8, 8]
    assert runner.shapes([12, 4, 12], max_rows=3) == [(1, 4), (2, 4), (4, 4), (1, 12), (2, 12), (4, 12)]
    assert Code2WavGraphs(model, max_batch=6).buckets == (1, 2, 4, 6)
    assert Code2WavGraphs(model, max_batch=1).buckets == (1,)
    with pytest.raises(ValueError):
        Code2WavGraphs(model, max_batch=0)


def _push_frames(stream: Code2WavStream, codes: torch.Tensor) -> list[torch.Tensor]:
    """What the speech stage does: one frame per step, then the padded last chunk (SpeechStage._flush)."""
    out = []
    for i in range(codes.shape[-1]):
        pcm = stream.push(codes[:, i : i + 1])
        if pcm is not None:
            out.append(pcm)
    pending = stream.frames_pending
    if pending:
        target = final_chunk_frames(pending, stream.schedule)
        pcm = stream.push(torch.zeros(codes.shape[0], target - pending, dtype=torch.long))
        if pcm is not None:
            out.append(pcm)
    out.append(stream.flush())
    return out


def _codes(model, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.codebook_size, (model.num_quantizers, frames), generator=g)


def test_conv_frames_cover_every_stream_length(model):
    """Streams of 1..125 frames with the default schedule and the stage's padded last chunk: the
    conv stack sees exactly the lengths `stream_conv_frames` lists (so warmup misses none)."""
    listed = stream_conv_frames(DEFAULT_SCHEDULE, model.conv_context_frames)
    assert listed == [4, 8, 12, 14, 18, 26, 42, 60]  # conv_context_frames = 10: the real config's too
    seen: set[int] = set()
    u, hold = model.total_upsample, model.lookahead_samples

    def record(hidden):  # stands in for the stack: only its input's length matters here
        seen.add(hidden.shape[1])
        return torch.zeros(hidden.shape[0], 1, hidden.shape[1] * u - hold)

    codes = _codes(model, 125, seed=11)
    for total in range(1, 126):
        stream = Code2WavStream(model, DEFAULT_SCHEDULE, conv_runner=record)
        pcm = torch.cat(_push_frames(stream, codes[:, :total]))
        assert pcm.shape[-1] >= total * u - hold
    assert sorted(seen) == listed


def test_conv_frames_of_other_schedules():
    assert stream_conv_frames((4, 25, 50), 10) == [4, 8, 14, 29, 35, 60]
    assert stream_conv_frames((4, 8, 16, 32, 50), 10, pad_final=False) == [4, 12, 26, 42, 60]
    assert stream_conv_frames((5,), 0) == [5]
    assert stream_conv_frames((3, 3), 7) == [3, 6, 9, 10]  # history 0, 3, 6, then 7 (full)
    with pytest.raises(ValueError):
        stream_conv_frames((), 10)


def test_stream_with_runner_equals_stream_without(model):
    """A 125-frame stream through a runner holding what warmup captures: no eager conv stack, and
    the very same PCM as the stream calling `wav_from_hidden` (B = 1: nothing padded)."""
    runner = Code2WavGraphs(model)
    runner.capture(runner.shapes(stream_conv_frames(DEFAULT_SCHEDULE, model.conv_context_frames)))
    codes = _codes(model, 125, seed=5)
    plain = torch.cat(_push_frames(Code2WavStream(model, DEFAULT_SCHEDULE), codes))
    graphed = torch.cat(_push_frames(Code2WavStream(model, DEFAULT_SCHEDULE, conv_runner=runner), codes))
    assert torch.equal(graphed, plain)
    # chunks of 4, 8, 16, 32, 50 frames, then the last 15 padded to 16
    assert runner.counts == {"replays": 6, "eager": 0}


# -- the transformer --------------------------------------------------------------------------------
TF_CTX = 142  # the tiny config's transformer_context_frames: 2 layers, sliding window 72
HIDDEN_ATOL = 2e-6  # float32 rounding of attention / matmuls over other lengths (~5e-7 measured)
PCM_ATOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # rounding, amplified by the random decoder


def _windows(model, rows: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.codebook_size, (rows, model.num_quantizers, frames), generator=g)


@pytest.mark.parametrize("kept", [0, 1, 9, TF_CTX - 1, TF_CTX])
def test_masked_padded_window_equals_the_transformer(model, kept):
    """`hidden_from_codes` over TF_CTX + n frames, the first TF_CTX - kept of them dummy frames
    hidden by the key mask, at positions continuing backwards from the real ones: the real frames'
    outputs are those of the real frames alone (all of them, not only the chunk's)."""
    assert model.transformer_context_frames == TF_CTX
    n, start = 8, 500
    window = _windows(model, 2, kept + n, seed=kept)
    pad = TF_CTX - kept
    padded = torch.cat([torch.zeros(2, model.num_quantizers, pad, dtype=torch.long), window], dim=-1)
    i = torch.arange(TF_CTX + n)
    positions, key_mask = start - kept - pad + i, i >= pad
    with torch.inference_mode():
        ref = model.hidden_from_codes(window, position_offset=start - kept)
        got = model.hidden_from_codes(padded, positions=positions, key_mask=key_mask)
        other = padded.clone()
        other[..., :pad] = _windows(model, 2, pad, seed=99)  # other dummy codes
        got_other = model.hidden_from_codes(other, positions=positions, key_mask=key_mask)
    assert torch.isfinite(got).all()  # the dummy rows too: each attends to itself
    assert (got[:, pad:] - ref).abs().max().item() < HIDDEN_ATOL
    assert ref.abs().max().item() > 1  # outputs of unit scale: the tolerance is relative to them
    if pad == 0:
        assert torch.equal(got, ref)  # the very same computation
    assert torch.equal(got_other[:, pad:], got[:, pad:])  # the dummy frames are invisible, not small


def test_key_mask_hides_keys_and_leaves_no_row_empty():
    """The layer mask with a key mask: causal window AND key visible, OR the query itself, so a
    hidden query's softmax row is never all-masked (NaN in a plain softmax, whatever the SDPA
    backend does with one)."""
    key_mask = torch.arange(6) >= 2
    got = TransformerModel._mask(6, 3, "cpu", key_mask)
    plain = TransformerModel._mask(6, 3, "cpu")
    assert torch.equal(got[2:, 2:], plain[2:, 2:])  # real queries: their window over the real keys
    assert not got[2:, :2].any()  # never a hidden key
    assert torch.equal(got[:2], torch.eye(6, dtype=torch.bool)[:2])  # hidden queries: themselves
    assert got.any(dim=-1).all()


@pytest.mark.parametrize("kept", [0, 5, TF_CTX])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_transformer_runner_equals_hidden_from_codes(model, rows, kept):
    runner = Code2WavTransformerGraphs(model, buckets=(1, 2), max_batch=4)  # buckets 1, 2, 4
    runner.capture(runner.shapes([4, 8], max_rows=rows))
    pieces = _pieces(rows, list(runner.buckets))
    for n in (4, 8):
        window = _windows(model, rows, kept + n, seed=rows * 1000 + kept * 10 + n)
        offset = 300 + n - kept  # the stream's start - kept
        with torch.inference_mode():
            got = runner(window, kept, offset)
            ref = model.hidden_from_codes(window, position_offset=offset)[:, kept:]
        assert got.shape == ref.shape == (rows, n, runner.hidden_size)
        assert (got - ref).abs().max().item() < HIDDEN_ATOL
        if kept == TF_CTX and len(pieces) == 1 and pieces[0][0] == pieces[0][1]:
            assert torch.equal(got, ref)  # nothing padded, nothing split
    assert runner.counts == {"replays": 2 * len(pieces), "eager": 0}


def test_transformer_runner_clears_what_an_earlier_call_left(model):
    runner = Code2WavTransformerGraphs(model, buckets=(4,), max_batch=4)
    runner.capture([(4, 8)])
    codes = runner._entries[(4, 8)].inputs[0]
    assert codes.shape == (4, model.num_quantizers, TF_CTX + 8)
    with torch.inference_mode():
        runner(_windows(model, 4, 8, seed=1) + 1, 0, 0)  # four rows, no history: all non-zero codes
        window = _windows(model, 1, 140 + 8, seed=2)
        got = runner(window, 140, 60)
        ref = model.hidden_from_codes(window, position_offset=60)[:, 140:]
    assert torch.count_nonzero(codes[1:]) == 0  # the earlier call's rows
    assert torch.count_nonzero(codes[0, :, :2]) == 0  # its frames where now the dummy ones are
    assert torch.equal(codes[0, :, 2:], window[0])
    assert (got - ref).abs().max().item() < HIDDEN_ATOL
    assert runner.counts == {"replays": 2, "eager": 0}


def test_transformer_runner_eager_cases(model):
    """Uncaptured chunk sizes, a history longer than the padded window holds: hidden_from_codes,
    counted. A full-attention layer (no bounded history): nothing is captured."""
    runner = Code2WavTransformerGraphs(model, max_batch=2)
    runner.capture(runner.shapes([4], max_rows=2))
    assert runner.captured == [(1, 4), (2, 4)]
    with torch.inference_mode():
        for kept, n in ((3, 5), (TF_CTX + 1, 4)):
            window = _windows(model, 2, kept + n, seed=kept)
            ref = model.hidden_from_codes(window, position_offset=7)[:, kept:]
            assert torch.equal(runner(window, kept, 7), ref)
    assert runner.counts == {"replays": 0, "eager": 2}

    cfg = tiny_config_dict()
    cfg["code2wav_config"]["sliding_window"] = None
    full = Code2Wav(config_from_dict(cfg).code2wav_config).eval()
    assert full.transformer_context_frames is None
    runner = Code2WavTransformerGraphs(full)
    runner.capture(runner.shapes([4]))
    assert runner.captured == []
    window = _windows(full, 1, 9, seed=4)
    with torch.inference_mode():
        assert torch.equal(runner(window, 5, 0), full.hidden_from_codes(window)[:, 5:])
    assert runner.counts == {"replays": 0, "eager": 1}


def _runners(model, schedule, max_batch: int = DEFAULT_MAX_ROWS, rows: int = 1):
    """Both runners, holding what `SpeechStage.warmup` captures for this schedule."""
    conv = Code2WavGraphs(model, max_batch=max_batch)
    conv.capture(conv.shapes(stream_conv_frames(schedule, model.conv_context_frames), max_rows=rows))
    tf = Code2WavTransformerGraphs(model, max_batch=max_batch, mempool=conv.mempool)
    tf.capture(tf.shapes(schedule, max_rows=rows))
    return conv, tf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frames, decodes", [(125, 6), (200, 7)])
def test_stream_with_both_runners(model, frames, decodes, dtype):
    """A stream through both runners (the speech stage's GPU path): PCM of the plain stream and
    of the one-shot decode, to rounding. 125 frames: chunks of 4, 8, 16, 32, 50, the last 15
    padded to 16 (history up to 110 frames, always padded); 200 frames: chunks up to 50, 50, then
    40 padded to 50, where the history is saturated (142 frames kept: nothing padded)."""
    m = model if dtype == torch.float32 else copy.deepcopy(model).double()
    conv, tf = _runners(m, DEFAULT_SCHEDULE)
    codes = _codes(m, frames, seed=5)
    with torch.inference_mode():
        plain = torch.cat(_push_frames(Code2WavStream(m, DEFAULT_SCHEDULE), codes))
        stream = Code2WavStream(m, DEFAULT_SCHEDULE, conv_runner=conv, transformer_runner=tf)
        graphed = torch.cat(_push_frames(stream, codes))
        oneshot = m(codes[None])[0, 0]
    assert graphed.shape == plain.shape and graphed.dtype == dtype
    atol = PCM_ATOL[dtype]
    assert (graphed - plain).abs().max().item() < atol
    total = oneshot.shape[-1]  # the padded last chunk's extra samples are cut by the stage
    assert (graphed[:total] - oneshot).abs().max().item() < atol
    assert (oneshot.abs() < 1).float().mean() > 0.9  # not clamped flat: the comparison means something
    assert tf.counts == {"replays": decodes, "eager": 0} and conv.counts == {"replays": decodes, "eager": 0}


@pytest.mark.parametrize("with_transformer", [False, True], ids=["conv-runner", "both-runners"])
def test_streams_decoded_together_with_runners(model, with_transformer):
    """Three streams at the same point decoded in one batch (`decode_due_together`) through the
    conv runner alone and through both runners (largest bucket 2: a piece of 2 rows and one of 1
    per decode): each stream's PCM equals it decoded alone, to rounding."""
    conv, tf = _runners(model, (4, 8), max_batch=2, rows=3)
    runners = {"conv_runner": conv, **({"transformer_runner": tf} if with_transformer else {})}
    codes = [_codes(model, 20, seed=30 + i) for i in range(3)]
    alone = [torch.cat(_push_frames(Code2WavStream(model, (4, 8)), c)) for c in codes]
    streams = [Code2WavStream(model, (4, 8), **runners) for _ in codes]
    together: list[list[torch.Tensor]] = [[] for _ in codes]
    for i in range(20):
        for st, c in zip(streams, codes):
            st.append(c[:, i : i + 1])
        for out, pcm in zip(together, Code2WavStream.decode_due_together(streams)):
            if pcm is not None:
                out.append(pcm)
    for out, st in zip(together, streams):
        out.append(st.flush())  # 20 = 4 + 8 + 8: nothing pending
    for out, ref in zip(together, alone):
        got = torch.cat(out)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < PCM_ATOL[torch.float32]
    # decodes of 4, 8, 8 frames, each as a piece of 2 rows and one of 1
    assert conv.counts == {"replays": 6, "eager": 0}
    assert tf.counts == ({"replays": 6, "eager": 0} if with_transformer else {"replays": 0, "eager": 0})
