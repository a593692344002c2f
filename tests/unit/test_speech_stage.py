"""The streaming speech stage (thinktalk/speech_stage.py) on the tiny checkpoint, CPU.

* greedy codes equal the reference path (`speech.generate_codes` through `Omni.speak`, after the
  thinker finished) while the stage ran beside the thinker, for every voice, both backends (the
  reference contiguous KV, and the GPU's static slot KV + static predictor loop run eagerly), and
  equal transformers' generate(return_audio=True);
* the streamed waveform equals the one-shot code2wav decode of the same codes;
* three concurrent spoken requests of different lengths equal each alone;
* the first PCM chunk comes out while the thinker is still writing a longer answer;
* cancelling (engine abort or stage.cancel) stops the chunks at once and frees the talker KV;
* sampled speech with a seed is the same alone and in a batch; empty answers; forced-answer TTS;
  Omni.stream_speech.

Run with `-s` to see the measured errors and step counts.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from thinktalk.api import Omni
from thinktalk.request import SamplingParams
from thinktalk.speech_stage import ResidualPick, SpeechStage, StaticFrameKV, predict_frame_static, predictor_positions

FRAMES = 24  # codec frames per spoken answer (caps the talker: ~2 s of speech)


@pytest.fixture(scope="module")
def omni(tiny_instruct):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two fighting
    try:
        yield Omni.load(tiny_instruct, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


PROMPTS = ["Tell me a story about a cat.", "Hi!", "What is the capital of France, and why is it famous?"]


def _request(omni, prompt=PROMPTS[0], speaker="Ethan", tokens=12, frames=FRAMES, **sampling):
    sampling.setdefault("temperature", 0.0)
    req = omni.make_request(_messages(prompt), SamplingParams(max_new_tokens=tokens, **sampling), speaker=speaker)
    req.speech_max_frames = frames
    return req


def _stage(omni, backend="contiguous", **kw) -> SpeechStage:
    return SpeechStage(omni.model, omni.cfg, sorted(omni.engine.eos_token_ids), backend=backend, keep_audio=True, **kw)


def _run(omni, stage, reqs, **add_kw):
    """Thinker and stage in one loop (engine.step then stage.step); returns (jobs, chunk log)."""
    log = []
    jobs = []
    for req in reqs:
        omni.engine.add_request(req)
        jobs.append(stage.add(req, **add_kw))
    step = 0
    while omni.engine.has_work() or stage.has_work():
        omni.engine.step()
        for chunk in stage.step():
            req = next(r for r in reqs if r.request_id == chunk.request_id)
            log.append((step, chunk, len(req.output_ids), req.finish_reason))
        step += 1
    return jobs, log


def _reference(omni, req):
    """The reference path on a finished request: speech.generate_codes via Omni.speak."""
    codes, _ = omni.speak(req)
    return codes


# -- correctness against the reference ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["contiguous", "slots"])
@pytest.mark.parametrize("voice", ["Ethan", "Chelsie", "Aiden"])
def test_codes_equal_reference(omni, voice, backend):
    req = _request(omni, speaker=voice)
    stage = _stage(omni, backend)
    (job,), log = _run(omni, stage, [req])
    ref = _reference(omni, req)
    assert job.codes().shape[1] > 0 and job.finish_reason in ("stop", "length")
    assert torch.equal(job.codes(), ref), f"{voice}/{backend}: stage codes differ from the reference path"
    # the talker ran beside the thinker: it had spoken frames before the thinker finished
    assert any(c.frames > 0 and reason is None for _, c, _, reason in log) or req.finish_reason is not None


def test_codes_equal_transformers(omni, tiny_instruct):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_instruct, dtype=torch.float32).eval()
    messages = _messages(PROMPTS[0])
    inputs = omni.processor.prepare_messages(messages)
    captured = {}

    def keep_codes(codes, *args, **kwargs):  # stands in for code2wav: the codes are what we compare
        captured["codes"] = codes
        return torch.zeros(codes.shape[0], 1, 1)

    hf.code2wav.chunked_decode = keep_codes
    with torch.no_grad():
        seqs, _ = hf.generate(**{k: v for k, v in inputs.items() if v is not None}, speaker="Chelsie",
                              thinker_max_new_tokens=12, thinker_do_sample=False, talker_do_sample=False,
                              talker_max_new_tokens=FRAMES + 1)
    req = _request(omni, speaker="Chelsie", tokens=12, frames=FRAMES)
    (job,), _ = _run(omni, _stage(omni), [req])
    assert req.output_ids == seqs[0, inputs["input_ids"].shape[1]:].tolist()
    assert torch.equal(job.codes(), captured["codes"][0])


def test_forced_answer_tts_equals_reference(omni):
    """A request finished before the stage sees it (tts.forced_prefill): all text known at once."""
    req = omni.speech_request("Hello there, how are you today?", "Aiden")
    omni.forced_prefill(req)
    req.speech_max_frames = FRAMES
    stage = _stage(omni)
    job = stage.add(req)
    while stage.has_work():
        stage.step()
    assert torch.equal(job.codes(), _reference(omni, req))


# -- streaming ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [False, True])
def test_stream_equals_oneshot_decode(omni, pad):
    """Streamed PCM (chunks of 4, 8, 16, 32, 50 frames) = one-shot code2wav of the same codes; pad: the
    last chunk decoded padded to a schedule size and cut (the GPU default), still exact."""
    req = _request(omni, tokens=16, frames=40)
    m = omni.model  # the same thinker and talker, code2wav in float64
    model64 = SimpleNamespace(thinker=m.thinker, talker=m.talker, code2wav=copy.deepcopy(m.code2wav).double())
    errors = {}
    for name, model in (("float32", omni.model), ("float64", model64)):
        stage = SpeechStage(model, omni.cfg, sorted(omni.engine.eos_token_ids), keep_audio=True, pad_final_chunk=pad)
        r = _request(omni, tokens=16, frames=40) if name == "float64" else req
        (job,), log = _run(omni, stage, [r])
        with torch.inference_mode():
            oneshot = model.code2wav(job.codes()[None]).flatten().numpy()
        streamed = job.pcm()
        sizes = [c.pcm.size for _, c, _, _ in log]
        u, hold = omni.model.code2wav.total_upsample, omni.model.code2wav.lookahead_samples
        assert sizes[0] == 4 * u - hold and sizes[1] == stage.schedule[1] * u  # small first chunk, then larger
        assert streamed.shape == oneshot.shape
        errors[name] = float(np.abs(streamed - oneshot).max())
    print(f"streamed vs one-shot code2wav (pad_final_chunk={pad}): max abs error {errors}")
    # float32: rounding of different conv lengths, amplified by the random decoder; float64: exact
    assert errors["float64"] < 1e-6 and errors["float32"] < 2e-2


def test_first_chunk_before_thinker_finishes(omni):
    req = _request(omni, tokens=40, frames=FRAMES)
    (job,), log = _run(omni, _stage(omni), [req])
    step, first, tokens_then, reason_then = next(x for x in log if x[1].pcm.size)
    print(f"first PCM chunk at stage step {step}: thinker had {tokens_then} of {len(req.output_ids)} tokens")
    assert reason_then is None and tokens_then < len(req.output_ids)
    assert step <= 5  # prefill after the first token, then one frame per thinker token: 4 frames


def _three_requests(omni):
    """Three spoken requests of different lengths and voices."""
    return [_request(omni, PROMPTS[0], "Ethan", tokens=16, frames=22),
            _request(omni, PROMPTS[1], "Chelsie", tokens=6, frames=8),
            _request(omni, PROMPTS[2], "Aiden", tokens=10, frames=14)]


@pytest.mark.parametrize("backend", ["contiguous", "slots"])
def test_three_concurrent_equal_each_alone(omni, backend):
    alone = []
    for req in _three_requests(omni):
        (job,), _ = _run(omni, _stage(omni, backend), [req])
        alone.append((job.codes(), job.pcm()))
    jobs, log = _run(omni, _stage(omni, backend), _three_requests(omni))
    assert len({len(j.frames) for j in jobs}) == 3  # different lengths
    steps_together = max(s for s, *_ in log)
    for job, (codes, pcm) in zip(jobs, alone):
        assert torch.equal(job.codes(), codes)
        assert np.array_equal(job.pcm(), pcm)
    print(f"{backend}: three requests together in {steps_together + 1} steps")


def test_sampled_with_seed_same_alone_and_batched(omni):
    def req(seed):
        return _request(omni, PROMPTS[2], "Ethan", tokens=8, frames=10, temperature=0.7, seed=seed)

    (a,), _ = _run(omni, _stage(omni), [req(1)])
    (b,), _ = _run(omni, _stage(omni), [req(2)])
    together, _ = _run(omni, _stage(omni), [req(1), req(2)])
    assert torch.equal(together[0].codes(), a.codes()) and torch.equal(together[1].codes(), b.codes())
    assert not torch.equal(a.codes(), b.codes())


def test_static_predictor_equals_plain_loop(omni):
    """The CUDA-graph body (static cache, fixed shapes), run eagerly, equals the plain loop, with
    greedy and noise-drawn rows mixed."""
    talker = omni.model.talker
    torch.manual_seed(0)
    b, h = 3, talker.cfg.text_config.hidden_size
    hidden = torch.randn(b, h)
    first = torch.tensor([5, 17, 300])
    cp = talker.code_predictor.cfg
    noise = torch.empty(talker.num_code_groups - 1, b, cp.vocab_size).exponential_()
    from thinktalk.speech import TalkerSampling

    for greedy in (None, torch.tensor([True, False, False])):
        pick = ResidualPick(TalkerSampling(), greedy, None if greedy is None else noise)
        with torch.inference_mode():
            ref_codes, ref_sum = talker.predict_residual_codes(hidden, first, pick)
            kv = StaticFrameKV(cp.num_hidden_layers, b, talker.num_code_groups, cp.num_key_value_heads,
                               cp.head_dim, hidden.dtype, hidden.device)
            codes, summed = predict_frame_static(talker, hidden, first, pick, kv,
                                                 predictor_positions(b, talker.num_code_groups, hidden.device))
        assert torch.equal(codes, ref_codes)
        assert (summed - ref_sum).abs().max() < 1e-5


# -- cancel and edge cases ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["engine_abort", "stage_cancel"])
@pytest.mark.parametrize("backend", ["contiguous", "slots"])
def test_cancel_stops_chunks_and_frees_kv(omni, how, backend):
    stage = _stage(omni, backend)
    keep = _request(omni, PROMPTS[1], "Chelsie", tokens=12, frames=12)
    victim = _request(omni, PROMPTS[0], "Ethan", tokens=30, frames=200)
    for r in (keep, victim):
        omni.engine.add_request(r)
        stage.add(r)
    after, cancelled_at, step = [], None, 0
    while omni.engine.has_work() or stage.has_work():
        omni.engine.step()
        events = stage.step()
        if cancelled_at is not None:
            after += [c for c in events if c.request_id == victim.request_id]
        elif any(c.request_id == victim.request_id and c.pcm.size for c in events):
            assert stage.kv_tokens() > 0
            if how == "engine_abort":
                omni.engine.abort(victim.request_id)
            else:
                stage.cancel(victim.request_id)
                omni.engine.abort(victim.request_id)
            cancelled_at = step
            held = stage.kv_tokens()
        if cancelled_at is not None and step == cancelled_at + 1:
            assert victim.request_id not in stage.jobs  # stopped within one step, KV freed
            assert stage.kv_tokens() < held
        step += 1
    assert cancelled_at is not None
    assert len(after) == 1 and after[0].finished and after[0].finish_reason == "abort" and after[0].pcm.size == 0
    assert stage.pop(keep.request_id).finish_reason in ("stop", "length")
    assert stage.kv_tokens() == 0 and not stage.jobs
    if backend == "slots":
        assert len(stage.runner.free) == stage.runner.num_slots


def test_empty_answer_and_fixed_length(omni):
    stage = _stage(omni)
    empty = _request(omni, tokens=1)  # one generated token: never fed, nothing to say
    fixed = _request(omni, PROMPTS[1], tokens=4, frames=10)
    jobs, log = _run(omni, stage, [empty], ignore_eos=True)
    assert jobs[0].finish_reason == "empty" and jobs[0].codes().shape[1] == 0
    jobs, _ = _run(omni, stage, [fixed], ignore_eos=True)
    assert jobs[0].finish_reason == "length" and jobs[0].codes().shape[1] == 10


def test_stream_speech_api(omni):
    events = list(omni.stream_speech(_messages(PROMPTS[0]), speaker="Ethan", temperature=0.0,
                                     max_new_tokens=16, speech_max_frames=16))
    assert events[-1].finished and events[-1].finish_reason in ("stop", "length")
    text = "".join(e.text for e in events)
    pcm = np.concatenate([e.pcm for e in events if e.pcm is not None])
    ref = omni.generate(_messages(PROMPTS[0]), speaker="Ethan", temperature=0.0, max_new_tokens=16,
                        speech_max_frames=16)
    assert text == ref.text
    with torch.inference_mode():
        oneshot = omni.model.code2wav(ref.codes[None]).flatten().numpy()
    assert pcm.shape == oneshot.shape
    # audio arrives interleaved with the text, not after it
    first_pcm = next(i for i, e in enumerate(events) if e.pcm is not None)
    last_text = max(i for i, e in enumerate(events) if e.text)
    assert first_pcm < last_text
    # closing the iterator early cancels the request
    it = omni.stream_speech(_messages(PROMPTS[0]), speaker="Ethan", temperature=0.0, max_new_tokens=40,
                            speech_max_frames=40)
    next(e for e in it if e.pcm is not None)
    it.close()
    assert not omni.engine.has_work() and not omni.speech_stage.has_work()
    assert omni.speech_stage.kv_tokens() == 0


def test_warmup_runs_greedy_and_sampled_predictor_then_speaks_the_same(omni):
    """warmup() runs (on the GPU: captures) both predictor variants of each bucket; the stage then
    speaks exactly as a cold one. On the CPU the 'graphs' backend runs the same bodies eagerly."""
    warm = _stage(omni, backend="graphs")
    warm.warmup((1, 2))
    req = _request(omni)
    (job,), _ = _run(omni, warm, [req])
    assert job.codes().shape[1] > 0 and torch.equal(job.codes(), _reference(omni, req))


def test_batched_code2wav_same_codes_and_lengths(omni):
    """batch_code2wav (the GPU default): three requests together, code2wav forwards shared. Codes
    are identical to each alone; PCM has the same length and differs only by the rounding of
    batched convolutions (amplified by the tiny random code2wav; on a well-scaled one the
    difference is <= 1e-5, tests/models/test_code2wav.py)."""
    alone = []
    for req in _three_requests(omni):
        (job,), _ = _run(omni, _stage(omni), [req])
        alone.append((job.codes(), job.pcm()))
    jobs, _ = _run(omni, _stage(omni, batch_code2wav=True), _three_requests(omni))
    for job, (codes, pcm) in zip(jobs, alone):
        assert torch.equal(job.codes(), codes)
        assert job.pcm().shape == pcm.shape
        assert float(np.abs(job.pcm() - pcm).max()) < 2e-2
