"""The per-conversation media cache (multimodal/media_cache.py): a conversation re-sent turn after
turn processes each clip and image once, with inputs (and prefix-cache digests) identical to a call
without the cache."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from mm_synth import make_image

from thinktalk.multimodal.items import media_items
from thinktalk.multimodal.media_cache import MediaCache, source_key


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(96, 64, seed=seed).save(buf, format="JPEG")
    return buf.getvalue()


def _clip(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def _turns():
    """User turns as a realtime session sends them: camera frames as bytes, clips as arrays
    (lengths up and down, so a longer clip joins after shorter ones), one frame as a data URL."""
    url = "data:image/jpeg;base64," + base64.b64encode(_jpeg(9)).decode()
    return [
        [{"type": "image", "image": _jpeg(1)}, {"type": "audio", "audio": _clip(0.6, 1)}],
        [{"type": "audio", "audio": _clip(1.9, 2)}, {"type": "text", "text": "and this?"}],
        [{"type": "image", "image": url}, {"type": "audio", "audio": _clip(0.4, 3)}],
        [{"type": "image", "image": _jpeg(4)}, {"type": "audio", "audio": _clip(1.1, 4)}],
    ]


def _assert_same(got: dict, want: dict) -> None:
    """The same processor outputs; with cached items also their digests (`item_digests`)."""
    assert got.keys() - {"item_digests"} == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_each_turn_processes_only_its_new_media(processor, thinker_config):
    cache = MediaCache()
    messages: list[dict] = []
    for k, content in enumerate(_turns()):
        messages.append({"role": "user", "content": content})
        before = (cache.hits, cache.misses)
        got = processor.prepare_messages(messages, audio_per_clip=True, cache=cache)
        want = processor.prepare_messages(messages, audio_per_clip=True)
        _assert_same(got, want)
        items = media_items(want, thinker_config)
        assert got["item_digests"] == [it.digest for it in items]  # made once per item, the same
        assert media_items(got, thinker_config) == items  # the same prefix-cache keys
        new = sum(1 for p in content if p["type"] != "text")
        old = sum(1 for m in messages[:-1] if m["role"] == "user" for p in m["content"] if p["type"] != "text")
        assert (cache.hits - before[0], cache.misses - before[1]) == (old, new), k
        assert len(cache) == old + new
        messages.append({"role": "assistant", "content": f"answer {k}"})


def test_the_cache_keeps_only_the_conversation_as_last_sent(processor):
    cache = MediaCache()
    turns = [{"role": "user", "content": c} for c in _turns()]
    processor.prepare_messages(turns, audio_per_clip=True, cache=cache)
    assert len(cache) == 7
    processor.prepare_messages(turns[2:], audio_per_clip=True, cache=cache)  # the oldest turns dropped
    assert len(cache) == 4
    misses = cache.misses
    _assert_same(processor.prepare_messages(turns[2:], audio_per_clip=True, cache=cache),
                 processor.prepare_messages(turns[2:], audio_per_clip=True))
    assert cache.misses == misses


def test_what_is_not_cached(processor, thinker_config, tmp_path):
    """A path (the file can change), and clips without audio_per_clip (the reference batch pads a
    clip to the longest of the call, so it is not a property of the clip)."""
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg(5))
    assert source_key(str(path)) is None and source_key(_jpeg(5)) is not None
    cache = MediaCache()
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "audio", "audio": _clip(0.5, 1)},
                                             {"type": "audio", "audio": _clip(0.9, 2)}]}]
    got, want = processor.prepare_messages(messages, cache=cache), processor.prepare_messages(messages)
    _assert_same(got, want)
    assert media_items(got, thinker_config) == media_items(want, thinker_config)
    assert cache.hits == cache.misses == 0 and len(cache) == 0


def test_source_keys_follow_content():
    a = _clip(0.2, 1)
    assert source_key(a) == source_key(a.copy()) != source_key(a[:-1])
    assert source_key(a) != source_key(a.astype(np.float64))
    assert source_key((a, 16000)) != source_key((a, 8000))
    assert source_key(torch.from_numpy(a)) == source_key(a)
    assert source_key([a]) is None and source_key("https://example.com/a.jpg") is None
