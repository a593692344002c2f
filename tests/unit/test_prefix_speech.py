"""Prefix reuse for requests that speak, and encoders over only the media a prefill computes.

A spoken turn 2 of a conversation (turn 1: an audio clip, optionally an image) on the paged engine
with prefix caching reuses turn 1's KV; the talker's hidden states of the reused prefix come from
the pool's side tensor (kv_cache.PagedPool.hidden) and the token embeddings. Greedy text and
talker codes must equal the same conversation without prefix caching, on the contiguous reference
engine, and the reference talker path (`Omni.speak`) over the kept hidden states. The audio and
vision encoders run only over the items of the computed suffix, with bit-identical embeddings.

Tiny random checkpoint, fp32, CPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from thinktalk.api import Omni
from thinktalk.engine import EngineConfig
from thinktalk.multimodal.items import item_of_token, items_from, select_items
from thinktalk.request import SamplingParams

FRAMES = 12  # codec frames per answer


@pytest.fixture(scope="module")
def omni(tiny_instruct):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two fighting
    try:
        yield Omni.load(tiny_instruct, device="cpu", progress=False,
                        engine_config=EngineConfig(kv_backend="paged", block_size=4, num_kv_blocks=512))
    finally:
        torch.set_num_threads(threads)


def _twin(omni, **config) -> Omni:
    """Another Omni over the same weights with another engine config."""
    return Omni(omni.model, omni.processor, omni.path, EngineConfig(**config))


def _clip(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) * (0.8 + 0.2 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def _speak_turn(omni, messages, max_new_tokens=8):
    """One spoken turn through the engine and the streaming speech stage: (request, codes, stats)."""
    req = omni.make_request(messages, SamplingParams(temperature=0, max_new_tokens=max_new_tokens), speaker="Ethan",
                            audio_per_clip=True)
    req.speech_max_frames = FRAMES
    stage = omni.speech_stage
    before = dict(omni.engine.stats)
    omni.engine.add_request(req)
    stage.add(req, decode_audio=False)
    while omni.engine.has_work() or stage.has_work():
        omni.engine.step()
        stage.step()
    stats = {k: omni.engine.stats[k] - before[k] for k in before}
    return req, stage.pop(req.request_id).codes(), stats


def _conversation(omni, runner, with_image: bool):
    """Turn 1 (image?, audio, text) then turn 2 (turn 1 + the answer + a new clip), both spoken."""
    first = [{"type": "audio", "audio": _clip(1.2, 220)}, {"type": "text", "text": "What do you hear?"}]
    if with_image:
        first.insert(0, {"type": "image", "image": _image(0)})
    m1 = [{"role": "user", "content": first}]
    r1, c1, s1 = _speak_turn(runner, m1)
    answer = omni.processor.decode([t for t in r1.output_ids if t not in omni.engine.eos_token_ids],
                                   skip_special_tokens=True)
    m2 = m1 + [{"role": "assistant", "content": answer},
               {"role": "user", "content": [{"type": "audio", "audio": _clip(0.8, 330)}]}]
    r2, c2, s2 = _speak_turn(runner, m2)
    return (r1, c1, s1), (r2, c2, s2)


@pytest.mark.parametrize("with_image", [False, True], ids=["audio", "audio+image"])
def test_spoken_second_turn_reuses_the_prefix(omni, with_image):
    layer = omni.cfg.talker_config.accept_hidden_layer
    runs = {
        "cached": omni,
        "uncached": _twin(omni, kv_backend="paged", block_size=4, num_kv_blocks=512, enable_prefix_caching=False),
        "reference": _twin(omni, kv_backend="contiguous"),
    }
    assert omni.engine.pool.hidden is not None and runs["uncached"].engine.pool.hidden is None
    turns = {name: _conversation(omni, runner, with_image) for name, runner in runs.items()}

    (r1, c1, _), (r2, c2, s2) = turns["cached"]
    # turn 2 found turn 1 (prompt and answer) in the cache: only the new turn was computed
    assert s2["cached_tokens"] > len(r1.prompt_ids) // 2
    assert s2["prefill_tokens"] == len(r2.prompt_ids) - s2["cached_tokens"]
    assert r2.num_cached_tokens == s2["cached_tokens"]
    assert turns["uncached"][1][2]["cached_tokens"] == 0
    assert c2.shape[1] > 0

    for name in ("uncached", "reference"):
        (q1, d1, _), (q2, d2, _) = turns[name]
        assert q1.output_ids == r1.output_ids and q2.prompt_ids == r2.prompt_ids and q2.output_ids == r2.output_ids
        assert torch.equal(d1, c1), name
        assert torch.equal(d2, c2), f"turn 2 codes with prefix reuse differ from {name}"
        # the kept hidden states: same rows; the talker reads layer 0 at text positions (exact: token
        # embeddings) and the captured layer at media placeholders (reused rows: same to rounding)
        mm = torch.tensor([t in (omni.cfg.thinker_config.audio_token_id, omni.cfg.thinker_config.image_token_id)
                           for t in r2.prompt_ids + r2.output_ids[:-1]])
        for lay in (0, layer):
            x, y = torch.cat(r2.capture[lay]), torch.cat(q2.capture[lay])
            assert x.shape == y.shape == (r2.num_tokens - 1, x.shape[1])
        assert torch.equal(torch.cat(r2.capture[0])[~mm], torch.cat(q2.capture[0])[~mm])
        torch.testing.assert_close(torch.cat(r2.capture[layer])[mm], torch.cat(q2.capture[layer])[mm],
                                   rtol=1e-4, atol=1e-4)
    # and the reference talker (speech.generate_codes after the thinker) over the reused states
    codes, _ = omni.speak(r2, greedy=True, max_frames=FRAMES)
    assert torch.equal(codes, c2)


def test_spoken_turn_in_chunks_after_a_cached_prefix(omni):
    """Chunked prefill of turn 2's suffix (chunks of 5 tokens, cutting the new clip apart) after the
    reused prefix: same text and codes as without prefix caching."""
    chunked = _twin(omni, kv_backend="paged", block_size=4, num_kv_blocks=512, max_prefill_tokens=5)
    plain = _twin(omni, kv_backend="paged", block_size=4, num_kv_blocks=512, enable_prefix_caching=False)
    (_, _, _), (r2, c2, s2) = _conversation(omni, chunked, with_image=True)
    (_, _, _), (q2, d2, _) = _conversation(omni, plain, with_image=True)
    assert s2["cached_tokens"] > 0
    assert r2.output_ids == q2.output_ids and torch.equal(c2, d2)


# -- encoders over the computed media only --------------------------------------------------------
class _CountCalls:
    """Wraps an encoder's forward: how many items (clips or grids) it encoded, call by call."""

    def __init__(self, module, monkeypatch):
        self.items: list[int] = []
        forward = module.forward

        def counted(features, lens_or_grid, *rest):  # audio: clip lengths [n]; vision: grids [n, 3]
            self.items.append(int(lens_or_grid.shape[0]))
            return forward(features, lens_or_grid, *rest)

        monkeypatch.setattr(module, "forward", counted)


def test_encoders_skip_items_of_the_cached_prefix(omni, monkeypatch):
    thinker = omni.model.thinker
    audio, vision = _CountCalls(thinker.audio_tower, monkeypatch), _CountCalls(thinker.visual, monkeypatch)
    runner = _twin(omni, kv_backend="paged", block_size=4, num_kv_blocks=512)
    (r1, _, _), (r2, c2, s2) = _conversation(omni, runner, with_image=True)
    # turn 1: one clip, one image; turn 2: the new clip only (clip 1 and the image are in the prefix)
    assert audio.items == [1, 1] and vision.items == [1]
    assert s2["cached_tokens"] > 0
    monkeypatch.undo()
    ref = _twin(omni, kv_backend="contiguous")
    (_, _, _), (q2, d2, _) = _conversation(omni, ref, with_image=True)
    assert r2.output_ids == q2.output_ids and torch.equal(c2, d2)


def _mixed_request(omni):
    """A prompt with two images and three clips over two user turns (items interleaved in the prompt)."""
    m = [{"role": "user", "content": [{"type": "image", "image": _image(1)}, {"type": "audio", "audio": _clip(0.7, 200)},
                                      {"type": "text", "text": "first"}]},
         {"role": "assistant", "content": "an answer"},
         {"role": "user", "content": [{"type": "audio", "audio": _clip(1.1, 300)}, {"type": "image", "image": _image(2)},
                                      {"type": "audio", "audio": _clip(0.5, 400)}, {"type": "text", "text": "second"}]}]
    return omni.make_request(m, SamplingParams(max_new_tokens=1), audio_per_clip=True)


def _video_request(omni, media):
    """A video with its audio interleaved (use_audio_in_video), then a clip."""
    m = [{"role": "user", "content": [{"type": "video", "video": str(media["video"])},
                                      {"type": "audio", "audio": _clip(0.6, 250)}, {"type": "text", "text": "hi"}]}]
    return omni.make_request(m, SamplingParams(max_new_tokens=1), use_audio_in_video=True, audio_per_clip=True)


@pytest.mark.parametrize("kind", ["images+clips", "video+audio-in-video"])
def test_partial_encoding_equals_encoding_everything(omni, media, kind):
    """For every start position: the embeddings (and deepstack features) of the prompt from there,
    encoding only the items `items_from` picks, equal those of encoding all the media: exactly
    where all items are encoded and at text positions, else to float rounding (a matrix product of
    fewer rows rounds differently on the CPU too; the clips' padding context is kept exactly)."""
    req = _mixed_request(omni) if kind == "images+clips" else _video_request(omni, media)
    engine, thinker = omni.engine, omni.model.thinker
    owner = item_of_token(req.prompt_ids, req.media_items)
    assert owner is not None and len(req.media_items) >= 3
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        full, deep = thinker.embed(torch.tensor(req.prompt_ids), req.mm)
        picked = set()
        for start in range(len(req.prompt_ids)):
            lo, e, d = engine._embed_prompt_rest(req, start)
            _, keep = items_from(owner, start)
            picked.add(len(keep))
            assert lo <= start and e.shape == full[lo:].shape
            text = torch.from_numpy(owner[lo:] < 0)
            assert torch.equal(e[text], full[lo:][text])
            if len(keep) == len(req.media_items):
                assert torch.equal(e, full[lo:])
            torch.testing.assert_close(e, full[lo:], **close)
            assert (d is None) == (deep is None or not deep[0][lo:].any())
            if d is not None:
                assert torch.equal(d[0], deep[0][lo:])
                skip = int(deep[0][:lo].sum())
                for a, b in zip(d[1], deep[1]):
                    torch.testing.assert_close(a, b[skip:], **close)
    assert len(picked) > 2  # some starts encode fewer items than others


def test_a_clip_encodes_as_among_all_clips(omni):
    """The audio encoder's padding is not neutral: a short clip encoded alone differs from the same
    clip in a call with a longer one, unless it is padded as in that call (audio_longest_frames)."""
    req = _mixed_request(omni)
    thinker, items = omni.model.thinker, req.media_items
    owner = item_of_token(req.prompt_ids, items)
    ids = torch.tensor(req.prompt_ids)
    with torch.inference_mode():
        full, _ = thinker.embed(ids, req.mm)
        short = 2  # the 0.5 s clip; the 1.1 s one is the longest
        where = torch.from_numpy(owner == short)
        sub = select_items(req.mm, items, [short])
        assert sub.audio_longest_frames == int(req.mm.feature_attention_mask.sum(-1).max())
        lo = int(np.flatnonzero(owner == short)[0])
        hi = int(np.flatnonzero(owner == short)[-1]) + 1
        padded, _ = thinker.embed(ids[lo:hi], sub)
        alone, _ = thinker.embed(ids[lo:hi], replace(sub, audio_longest_frames=None))
    torch.testing.assert_close(padded, full[where], rtol=1e-5, atol=1e-5)
    assert (alone - full[where]).abs().max() > 1e-3


def test_items_from_keeps_interleaved_items_whole():
    # item 0: 1-2; items 1 and 2 interleave over 4-9 (a video's frames and audio); item 3: 12
    owner = np.array([-1, 0, 0, -1, 1, 2, 1, 2, 2, 1, -1, -1, 3, -1])
    assert items_from(owner, 0) == (0, [0, 1, 2, 3])
    assert items_from(owner, 2) == (1, [0, 1, 2, 3])
    assert items_from(owner, 3) == (3, [1, 2, 3])
    assert items_from(owner, 7) == (4, [1, 2, 3])  # inside the interleaved pair: both, from their start
    assert items_from(owner, 10) == (10, [3])
    assert items_from(owner, 13) == (13, [])


def test_select_items_takes_rows_of_the_chosen_items(omni):
    req = _mixed_request(omni)
    items = req.media_items
    kinds = [it.kind for it in items]
    assert kinds == ["audio", "audio", "audio", "image", "image"]
    sub = select_items(req.mm, items, [1, 4])  # the second clip, the second image
    assert torch.equal(sub.input_features, req.mm.input_features[[1]])
    assert torch.equal(sub.feature_attention_mask, req.mm.feature_attention_mask[[1]])
    first_rows = int(req.mm.image_grid_thw[0].prod())
    assert torch.equal(sub.pixel_values, req.mm.pixel_values[first_rows:])
    assert torch.equal(sub.image_grid_thw, req.mm.image_grid_thw[1:])
    none = select_items(req.mm, items, [0])
    assert none.pixel_values is None and none.image_grid_thw is None and none.input_features.shape[0] == 1
