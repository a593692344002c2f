"""The streaming speech stage (thinktalk/speech_stage.py) on the tiny checkpoint, CPU.

* greedy codes equal the reference path (`speech.generate_codes` through `Omni.speak`, after the
  thinker finished) while the stage ran beside the thinker, for every voice and backend (the
  reference contiguous KV; the paged talker KV, eager; and the GPU's paged KV + static decode
  buffers + static predictor loop, run eagerly), and equal transformers' generate(return_audio=True);
* paged talker KV: the paged backends equal the contiguous one for three concurrent requests;
  padding rows of a decode bucket write only the scratch block; a pool too small for every
  request at once makes requests wait for blocks (and, when nothing can run, preempts the
  youngest and recomputes it) with the same codes; admission waits for free blocks; a request
  larger than the pool ends with "length"; every block is free again at the end;
* the streamed waveform equals the one-shot code2wav decode of the same codes;
* three concurrent spoken requests of different lengths equal each alone;
* the first PCM chunk comes out while the thinker is still writing a longer answer;
* cancelling (engine abort or stage.cancel) stops the chunks at once and frees the talker KV (its
  blocks, counted, on the paged backends);
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
@pytest.mark.parametrize("backend", ["contiguous", "paged", "graphs"])
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


@pytest.mark.parametrize("backend", ["contiguous", "paged", "graphs"])
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
@pytest.mark.parametrize("backend", ["contiguous", "paged", "graphs"])
def test_cancel_stops_chunks_and_frees_kv(omni, how, backend):
    stage = _stage(omni, backend)
    keep = _request(omni, PROMPTS[1], "Chelsie", tokens=12, frames=12)
    victim = _request(omni, PROMPTS[0], "Ethan", tokens=30, frames=200)
    jobs = []
    for r in (keep, victim):
        omni.engine.add_request(r)
        jobs.append(stage.add(r))
    bm = stage.runner.block_manager if backend != "contiguous" else None
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
            if bm is not None:
                assert len(jobs[1].kv.block_table) > 0
        if cancelled_at is not None and step == cancelled_at + 1:
            assert victim.request_id not in stage.jobs  # stopped within one step, KV freed
            assert stage.kv_tokens() < held
            if bm is not None:  # every block but those of the request still speaking is free again
                kept = len(jobs[0].kv.block_table) if jobs[0].kv is not None else 0
                assert jobs[1].kv is None and bm.num_free_blocks == bm.num_blocks - kept
        step += 1
    assert cancelled_at is not None
    assert len(after) == 1 and after[0].finished and after[0].finish_reason == "abort" and after[0].pcm.size == 0
    assert stage.pop(keep.request_id).finish_reason in ("stop", "length")
    assert stage.kv_tokens() == 0 and not stage.jobs
    if backend != "contiguous":  # every talker KV block back in the pool
        bm = stage.runner.block_manager
        assert bm.num_free_blocks == bm.num_blocks


# -- paged talker KV ----------------------------------------------------------------------------
def _codes_of(jobs):
    return [j.codes() for j in jobs]


@pytest.fixture(scope="module")
def contiguous_three(omni):
    """Codes of the three requests spoken together by the reference backend."""
    jobs, _ = _run(omni, _stage(omni, "contiguous"), _three_requests(omni))
    return _codes_of(jobs)


@pytest.mark.parametrize("backend,block_size", [("paged", 16), ("graphs", 16), ("graphs", 4)])
def test_paged_three_concurrent_equal_contiguous(omni, contiguous_three, backend, block_size):
    """Greedy codes of the paged backends (eager; the CUDA-graph body through its static buffers)
    equal the contiguous reference for three concurrent requests of different lengths. Three
    decoding requests take the bucket of 4 (one padding row on the scratch block), then 2, then 1;
    with blocks of 4 tokens every request spans many blocks."""
    stage = _stage(omni, backend, kv_block_size=block_size)
    jobs, _ = _run(omni, stage, _three_requests(omni))
    assert len({len(j.frames) for j in jobs}) == 3
    for got, ref in zip(_codes_of(jobs), contiguous_three):
        assert torch.equal(got, ref)
    steps = stage.runner.steps
    if backend == "graphs":
        assert steps is not None and steps.steps > 0  # decode went through the static buffers
    else:
        assert steps is None
    assert stage.counts["kv_waits"] == 0 and stage.counts["preemptions"] == 0
    bm = stage.runner.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_padding_rows_write_only_the_scratch_block(omni):
    """Decode steps of 3 requests run in the bucket of 4: the padding row writes the scratch block;
    in the pool only the new tokens' slots change."""
    stage = _stage(omni, "graphs", kv_block_size=4, talker_kv_blocks=64)
    reqs = _three_requests(omni)
    for r in reqs:
        omni.engine.add_request(r)
        stage.add(r)
    pool, bs = stage.runner.pool, stage.runner.pool.block_size
    scratch = set(range(pool.scratch_block * bs, (pool.scratch_block + 1) * bs))
    checked = 0
    while omni.engine.has_work() or stage.has_work():
        omni.engine.step()
        jobs = list(stage.jobs.values())
        all_running = len(jobs) == 3 and all(j.state == "running" for j in jobs)
        fed = [j.fed for j in jobs]
        if all_running:
            for k in pool.k:
                k[pool.scratch_block].fill_(7.0)  # a marker the padding row overwrites
        before = [k.clone().flatten(0, 1) for k in pool.k] if all_running else None
        stage.step()
        if not all_running or [j.fed for j in jobs] != [f + 1 for f in fed] or any(j.done for j in jobs):
            continue  # not a step where exactly these three decoded (and still hold their blocks)
        written = set()
        for j in jobs:  # the slot each request's new token went to
            t = j.kv.num_computed - 1
            written.add(j.kv.block_table[t // bs] * bs + t % bs)
        for old, new in zip(before, pool.k):
            changed = set((old != new.flatten(0, 1)).flatten(1).any(1).nonzero().flatten().tolist())
            assert changed - scratch == written and changed & scratch  # the padding row wrote the scratch block
        checked += 1
    assert checked > 0


def test_kv_full_requests_wait_for_blocks(omni, contiguous_three):
    """A pool too small for the three requests at once (21 blocks of 4 tokens; they need ~36):
    requests that cannot grow wait for blocks (the oldest served first) instead of failing, and
    speak exactly the reference's codes; every block is back at the end."""
    stage = _stage(omni, "graphs", kv_block_size=4, talker_kv_blocks=21)
    jobs, _ = _run(omni, stage, _three_requests(omni))
    print(f"21 blocks: {stage.counts}")
    assert stage.counts["kv_waits"] > 0 and stage.counts["preemptions"] == 0
    for got, ref in zip(_codes_of(jobs), contiguous_three):
        assert torch.equal(got, ref)
    assert [j.finish_reason for j in jobs] == ["length"] * 3
    bm = stage.runner.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_admission_bounded_by_free_blocks(omni, contiguous_three):
    """15 blocks of 4 tokens hold two of the prompts but not the third as well: it is admitted
    (gets KV) only once blocks are free, and still speaks the reference's codes."""
    stage = _stage(omni, "paged", kv_block_size=4, talker_kv_blocks=15)
    reqs = _three_requests(omni)
    jobs = []
    for r in reqs:
        omni.engine.add_request(r)
        jobs.append(stage.add(r))
    queued_while_others_spoke = False
    while omni.engine.has_work() or stage.has_work():
        omni.engine.step()
        stage.step()
        bm = stage.runner.block_manager
        held = sum(len(j.kv.block_table) for j in jobs if j.kv is not None)
        assert held == bm.num_used_blocks <= bm.num_blocks
        if any(j.kv is None and not j.done for j in jobs) and any(j.kv is not None for j in jobs):
            queued_while_others_spoke = True
    assert queued_while_others_spoke
    for got, ref in zip(_codes_of(jobs), contiguous_three):
        assert torch.equal(got, ref)


def test_stalled_pool_preempts_youngest_and_recomputes(omni, contiguous_three):
    """19 blocks: every request able to run waits for a block at some step, so the most recently
    admitted one is preempted (blocks freed, back to the queue) and recomputed when readmitted:
    prompt + the decode inputs it was fed, rebuilt from its codes. Its earlier frames stand; on
    this tiny fp32 model the recompute's rounding changes no pick, so all codes equal the
    reference (a wrong recompute, input, position or block would not)."""
    stage = _stage(omni, "graphs", kv_block_size=4, talker_kv_blocks=19)
    jobs, _ = _run(omni, stage, _three_requests(omni))
    print(f"19 blocks: {stage.counts}")
    assert stage.counts["preemptions"] > 0
    for got, ref in zip(_codes_of(jobs), contiguous_three):
        assert torch.equal(got, ref)
    bm = stage.runner.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_request_larger_than_the_pool_ends_with_length(omni):
    """A pool smaller than one request: its speech is cut short ("length") rather than hanging;
    a prompt the pool can never hold is not spoken at all."""
    req = _request(omni, PROMPTS[1], "Chelsie", tokens=6, frames=30)
    stage = _stage(omni, "paged", kv_block_size=4, talker_kv_blocks=6)  # 24 tokens
    (job,), _ = _run(omni, stage, [req])
    assert job.finish_reason == "length" and 0 < job.codes().shape[1] < 30
    assert torch.equal(job.codes(), _reference(omni, req)[:, : job.codes().shape[1]])
    assert stage.runner.block_manager.num_free_blocks == 6
    stage = _stage(omni, "paged", kv_block_size=4, talker_kv_blocks=2)  # 8 tokens: not even the prompt
    (job,), _ = _run(omni, stage, [_request(omni, PROMPTS[1], "Chelsie", tokens=6, frames=30)])
    assert job.finish_reason == "length" and job.codes().shape[1] == 0


def test_triton_paged_decode_attention(omni, contiguous_three):
    """The Triton paged decode kernel (the GPU's) in the talker's static decode step, under the
    CPU interpreter: same codes as the reference. Run with TRITON_INTERPRET=1 set before thinktalk
    is imported (e.g. `TRITON_INTERPRET=1 pytest tests/unit/test_speech_stage.py -k triton`)."""
    from thinktalk.kernels.common import available, interpreting
    from thinktalk.speech_graphs import PagedTalker

    if not available("cpu") or not interpreting():
        pytest.skip("needs triton and TRITON_INTERPRET=1 before thinktalk is imported")
    stage = _stage(omni, "graphs")
    stage.runner = PagedTalker(omni.model.talker, 64, 4, graphs=True, decode_attention="triton")
    assert stage.runner.pool.decode_fn.__name__ == "paged_attention"
    jobs, _ = _run(omni, stage, _three_requests(omni))
    assert stage.runner.steps.steps > 0
    for got, ref in zip(_codes_of(jobs), contiguous_three):
        assert torch.equal(got, ref)


def test_pool_sizing(omni):
    """talker_kv_blocks, talker_kv_gib, or 2,048 tokens per request of max_active (at least
    8,192); the full talker holds 20 KiB per token in bf16."""
    from thinktalk.config import reference_config
    from thinktalk.speech_graphs import plan_talker_blocks, talker_block_bytes, talker_kv_bytes

    full = reference_config().talker_config
    assert talker_block_bytes(full, 16, torch.bfloat16) == 16 * 20 * 2**10
    assert plan_talker_blocks(full, torch.bfloat16, max_active=16) == 16 * 2048 // 16
    assert plan_talker_blocks(full, torch.bfloat16, max_active=1) == 8192 // 16
    assert plan_talker_blocks(full, torch.bfloat16) == 64 * 2048 // 16
    assert plan_talker_blocks(full, torch.bfloat16, gib=1.0) == 2**30 // (16 * 20 * 2**10)
    assert plan_talker_blocks(full, torch.bfloat16, num_blocks=7, gib=1.0) == 7
    stage = _stage(omni, "paged", talker_kv_blocks=10, kv_block_size=8)
    pool = stage.runner.pool
    held = sum(t.numel() * t.element_size() for t in pool.k + pool.v)
    assert held == talker_kv_bytes(omni.cfg.talker_config, 10, 8, torch.float32)
    assert stage.runner.block_manager.num_blocks == 10 and pool.k[0].shape[:2] == (11, 8)  # + the scratch block
    with pytest.raises(ValueError, match="backend"):
        _stage(omni, "slots")


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


def test_warmup_prepares_every_code2wav_shape(omni):
    """Backend "graphs": warmup prepares (on the GPU: captures) code2wav's conv stack for every
    length the schedule makes and its transformer for every chunk size, so a 125-frame answer and
    its padded last chunk run none of them eagerly; its codes are those of the reference backend,
    its PCM too up to float rounding: the transformer runs over a padded window of
    transformer_context_frames + chunk frames, ~5e-7 from the unpadded one, which this random
    decoder amplifies as it does the streamed vs one-shot rounding (~2e-3: test_stream_equals_oneshot_decode;
    tight on a well-scaled decoder: tests/unit/test_code2wav_graphs.py)."""
    stage = _stage(omni, backend="graphs", pad_final_chunk=True)
    stage.warmup((1,))
    conv, tf = stage.code2wav_graphs, stage.code2wav_tf_graphs
    assert conv.captured == [(1, t) for t in (4, 8, 12, 14, 18, 26, 42, 60)]
    assert tf.captured == [(1, n) for n in (4, 8, 16, 32, 50)]
    before = {"conv": dict(conv.counts), "tf": dict(tf.counts)}
    (job,), _ = _run(omni, stage, [_request(omni, frames=125)], ignore_eos=True)
    assert len(job.frames) == 125
    # chunks of 4, 8, 16, 32 and 50 frames, then the last 15 padded to 16
    for runner, was in ((conv, before["conv"]), (tf, before["tf"])):
        assert runner.counts["replays"] - was["replays"] == 6 and runner.counts["eager"] == was["eager"]
    (ref,), _ = _run(omni, _stage(omni, pad_final_chunk=True), [_request(omni, frames=125)], ignore_eos=True)
    assert torch.equal(job.codes(), ref.codes())
    assert job.pcm().shape == ref.pcm().shape
    assert float(np.abs(job.pcm() - ref.pcm()).max()) < 2e-2
    u, hold = omni.model.code2wav.total_upsample, omni.model.code2wav.lookahead_samples
    assert job.pcm().size == 125 * u - hold


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
