"""AsyncEngine against a fake engine and speech stage: ordering, aborts, failures, stats."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from thinktalk.errors import InputError, OutOfMemoryError
from thinktalk.request import Request, SamplingParams
from thinktalk.server.async_engine import AsyncEngine, EngineDead


@dataclass
class Out:
    request: Request
    new_token: int | None
    finished: bool


class FakeEngine:
    """Each step gives every running request one token; a request finishes after `n` tokens."""

    def __init__(self, fail_when_running: int | None = None):
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.steps = 0
        # raise in the first step with this many requests running (a step count would race with
        # the test adding them: on a busy machine the thread could die before the last is added)
        self.fail_when_running = fail_when_running
        self.aborted: list[str] = []

    def add_request(self, req):
        if req.sampling.seed == -1:
            raise InputError("refused", param="seed")
        self.running.append(req)

    def abort(self, request_id):
        self.aborted.append(request_id)
        for r in list(self.running):
            if r.request_id == request_id:
                self.running.remove(r)
                r.finish_reason = "abort"

    def has_work(self):
        return bool(self.running)

    def step(self):
        self.steps += 1
        if self.fail_when_running is not None and len(self.running) >= self.fail_when_running:
            raise RuntimeError("boom")
        outs = []
        for r in list(self.running):
            if r.sampling.seed == -2:  # refused while running, as Engine._refuse_out_of_memory does
                self.running.remove(r)
                r.finish_reason, r.error = "error", OutOfMemoryError("out of memory", param="messages")
                outs.append(Out(r, None, True))
                continue
            r.output_ids.append(len(r.output_ids))
            done = len(r.output_ids) >= r.sampling.max_new_tokens
            if done:
                r.finish_reason = "length"
                self.running.remove(r)
            outs.append(Out(r, r.output_ids[-1], done))
        return outs


@dataclass
class Chunk:
    request_id: str
    pcm: np.ndarray
    frames: int
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Job:
    req: Request
    max_frames: int
    frames: int = 0
    cancelled: bool = False


class FakeStage:
    """Speaks one frame (10 samples) per step once the request has a token; stops at max_frames."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self.cancelled: list[str] = []
        self.popped: list[str] = []

    def add(self, req, max_frames=None):
        if req.speaker == "nobody":
            raise InputError("unknown voice", param="voice")
        self.jobs[req.request_id] = Job(req, max_frames or 3)

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.jobs[request_id].cancelled = True

    def has_work(self):
        return bool(self.jobs)

    def pop(self, request_id):
        self.popped.append(request_id)

    def kv_tokens(self):
        return sum(j.frames for j in self.jobs.values())

    def step(self):
        chunks = []
        for rid, job in list(self.jobs.items()):
            if job.cancelled:
                del self.jobs[rid]
                chunks.append(Chunk(rid, np.zeros(0, np.float32), job.frames, True, "abort"))
            elif job.req.output_ids:
                job.frames += 1
                end = job.frames >= job.max_frames
                if end:
                    del self.jobs[rid]
                chunks.append(Chunk(rid, np.ones(10, np.float32), job.frames, end, "length" if end else None))
        return chunks


def request(rid: str, n: int, speaker: str | None = None, seed: int | None = None) -> Request:
    import torch

    return Request(prompt_ids=[1, 2], positions=torch.zeros(3, 2), rope_delta=0,
                   sampling=SamplingParams(max_new_tokens=n, seed=seed), speaker=speaker, request_id=rid)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_text_and_speech_interleave_and_the_stream_ends_after_both():
    async def main():
        eng = AsyncEngine(FakeEngine(), speech=FakeStage())
        eng.start(asyncio.get_running_loop())
        stream = eng.add(request("a", 5, "ethan"), speak=True, max_frames=3)
        order = []
        async for ev in stream:
            order += ["t"] * len(ev.token_ids) + (["a"] if ev.audio is not None and len(ev.audio) else [])
        eng.stop()
        return stream, order, eng

    stream, order, eng = run(main())
    assert order.count("t") == 5 and order.count("a") == 3
    assert order.index("a") < len(order) - 1 - order[::-1].index("t")  # audio before the text ended
    assert stream.finish_reason == "length" and stream.speech_finish_reason == "length"
    assert stream.audio_samples == 30 and stream.frames == 3
    assert eng.speech.popped == ["a"] and eng.stats["speaking"] == 0


def test_abort_cancels_text_and_speech():
    async def main():
        engine, stage = FakeEngine(), FakeStage()
        eng = AsyncEngine(engine, speech=stage)
        eng.start(asyncio.get_running_loop())
        stream = eng.add(request("b", 1000, "ethan"), speak=True, max_frames=1000)
        async for ev in stream:
            if stream.num_tokens >= 3 and stream.audio_samples:
                stream.abort()
                stream.abort()  # once is enough
        eng.stop()
        return stream, engine, stage, eng

    stream, engine, stage, eng = run(main())
    assert stream.finish_reason == "abort" and stream.speech_finish_reason == "abort"
    assert engine.aborted == ["b"] and stage.cancelled == ["b"]
    assert eng.stats["running"] == 0 and eng.stats["speaking"] == 0 and eng.stats["talker_kv_tokens"] == 0


def test_refusals_fail_that_request_only():
    async def main():
        engine = FakeEngine()
        eng = AsyncEngine(engine, speech=FakeStage())
        eng.start(asyncio.get_running_loop())
        bad_seed = eng.add(request("c", 3, seed=-1))
        bad_voice = eng.add(request("d", 3, "nobody"), speak=True)
        good = eng.add(request("e", 2))
        errors = []
        for s in (bad_seed, bad_voice):
            with pytest.raises(InputError) as info:
                async for _ in s:
                    pass
            errors.append(info.value.param)
        tokens = [t async for ev in good for t in ev.token_ids]
        eng.stop()
        return errors, tokens, engine

    errors, tokens, engine = run(main())
    assert errors == ["seed", "voice"] and tokens == [0, 1]
    assert "d" in engine.aborted  # its text was stopped when its speech was refused


def test_a_request_refused_while_running_fails_alone():
    """The engine refuses a running request (out of memory in its prefill): its stream raises the
    engine's error, its speech is cancelled, and the other requests and the engine carry on."""
    async def main():
        engine, stage = FakeEngine(), FakeStage()
        eng = AsyncEngine(engine, speech=stage)
        eng.start(asyncio.get_running_loop())
        bad = eng.add(request("f", 3, "ethan", seed=-2), speak=True)
        good = eng.add(request("g", 2))
        with pytest.raises(OutOfMemoryError) as info:
            async for _ in bad:
                pass
        tokens = [t async for ev in good for t in ev.token_ids]
        later = [t async for ev in eng.add(request("h", 3)) for t in ev.token_ids]
        await asyncio.sleep(0.05)  # the cancelled speech's last step
        eng.stop()
        return info.value, tokens, later, stage, eng, bad

    err, tokens, later, stage, eng, bad = run(main())
    assert err.param == "messages" and tokens == [0, 1] and later == [0, 1, 2]
    assert bad.finish_reason == "error" and stage.cancelled == ["f"]
    assert eng.error is None and eng.stats["running"] == 0


def test_engine_death_reaches_every_stream_and_is_reported():
    fatal = []

    async def main():
        eng = AsyncEngine(FakeEngine(fail_when_running=3), on_fatal=fatal.append)
        eng.start(asyncio.get_running_loop())
        # answers long enough that none ends before all three run and the engine dies
        streams = [eng.add(request(f"f{i}", 10**9)) for i in range(3)]
        for s in streams:
            with pytest.raises(EngineDead):
                async for _ in s:
                    pass
        with pytest.raises(EngineDead):
            eng.add(request("late", 1))
        with pytest.raises(EngineDead):
            await eng.call(lambda: 1)
        return eng

    eng = run(main())
    assert eng.error is not None and isinstance(fatal[0], RuntimeError)


def test_calls_run_on_the_engine_thread():
    import threading

    async def main():
        eng = AsyncEngine(FakeEngine())
        eng.start(asyncio.get_running_loop())
        name = await eng.call(lambda: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await eng.call(lambda: 1 / 0)
        still = await eng.call(lambda: "alive")
        eng.stop()
        return name, still

    assert run(main()) == ("thinktalk-engine", "alive")


def test_real_engine_with_overlapped_steps_streams_every_token_and_frees_every_block():
    """The thinker engine with overlapped decode steps (the GPU default; here its CPU form) behind
    the engine thread: each stream gets exactly its tokens, in order, though steps report them one
    call late; an abort while a step is in flight ends that stream and frees its blocks at once."""
    import torch

    from thinktalk.config import config_from_dict
    from thinktalk.engine import Engine, EngineConfig
    from thinktalk.weights.loader import build_model
    from thinktalk.weights.tiny import randomize_
    from thinktalk.weights.tiny_config import tiny_config_dict

    model = randomize_(build_model(config_from_dict(tiny_config_dict()), "cpu", torch.float32, with_talker=False), seed=3)

    def requests():
        out = []
        for i, (n, new) in enumerate([(9, 14), (23, 8), (5, 400)]):
            ids = torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(i)).tolist()
            out.append(Request(ids, torch.arange(n)[None].expand(3, -1).clone(), 0,
                               SamplingParams(temperature=0, max_new_tokens=new), request_id=f"r{i}"))
        return out

    reference = Engine(model, [-1], EngineConfig())
    ref = requests()
    for r in ref:
        reference.add_request(r)
    while reference.has_work():
        reference.step()

    engine = Engine(model, [-1], EngineConfig(kv_backend="paged", block_size=4, num_kv_blocks=256, cuda_graphs=True,
                                              overlap_steps=True))
    launches = []
    launch = engine._launch
    engine._launch = lambda *a, **k: launches.append(1) or launch(*a, **k)

    async def main():
        eng = AsyncEngine(engine)
        eng.start(asyncio.get_running_loop())
        streams = [eng.add(r) for r in requests()]
        got: list[list[int]] = [[] for _ in streams]

        async def consume(i):
            async for ev in streams[i]:
                got[i] += ev.token_ids
                if i == 2 and len(got[i]) == 20:
                    streams[i].abort()

        await asyncio.gather(*(consume(i) for i in range(3)))
        free = await eng.call(lambda: engine.block_manager.num_free_blocks)
        eng.stop()
        return streams, got, free

    streams, got, free = run(main())
    assert got[0] == ref[0].output_ids and got[1] == ref[1].output_ids
    assert streams[2].finish_reason == "abort" and got[2] == ref[2].output_ids[: len(got[2])] and len(got[2]) < 400
    assert [s.finish_reason for s in streams[:2]] == ["length", "length"]
    assert free == engine.block_manager.num_blocks
    assert len(launches) > 20  # the decode steps did run overlapped
