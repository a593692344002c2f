"""code2wav's conv stack through static per-(bucket, frames) buffers (thinktalk/code2wav_graphs.py), CPU.

On CUDA those buffers are replayed as CUDA graphs; off CUDA the same path runs the stack eagerly
over them, so these tests check everything but the replay itself:

* a batch that is a bucket gives exactly `wav_from_hidden`'s bits; one that is not is padded to the
  next bucket (its rows are exactly those of the stack over the zero-padded batch, equal to the
  unpadded stack up to rounding, and independent of the padding rows' content); one larger than
  the largest bucket runs as several pieces; frame counts never captured run eagerly (counted);
* a `Code2WavStream` (one, or several decoded together) with the runner gives the PCM it gives
  without;
* `stream_conv_frames` is exactly the set of conv-stack lengths streams of 1..125 frames use with
  the speech stage's padded last chunk, so what warmup captures covers them (no eager call).
"""

from __future__ import annotations

import pytest
import torch

from thinktalk.code2wav_graphs import Code2WavGraphs, stream_conv_frames
from thinktalk.config import config_from_dict
from thinktalk.models.code2wav import Code2Wav, Code2WavStream
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
    runner = Code2WavGraphs(model)  # defaults: buckets 1, 2, 4, 8
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


def test_streams_decoded_together_with_runner(model):
    """Three streams at the same point decoded in one batch (`decode_due_together`) through a runner
    whose largest bucket is 2 (so 2 + 1 rows): each stream's PCM equals it decoded alone, to rounding."""
    runner = Code2WavGraphs(model, max_batch=2)
    runner.capture(runner.shapes(stream_conv_frames((4, 8), model.conv_context_frames), max_rows=3))
    codes = [_codes(model, 20, seed=30 + i) for i in range(3)]
    alone = [torch.cat(_push_frames(Code2WavStream(model, (4, 8)), c)) for c in codes]
    streams = [Code2WavStream(model, (4, 8), conv_runner=runner) for _ in codes]
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
        assert (got - ref).abs().max().item() < 1e-4
    # decodes of 4, 8, 8 frames, each as a piece of 2 rows and one of 1
    assert runner.counts == {"replays": 6, "eager": 0}
