"""Media items of a prompt (the prefix cache's per-item keys) and per-clip audio features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mm_synth import gradient_frames, make_image, tone

from thinktalk.multimodal.audio import log_mel_features
from thinktalk.multimodal.items import MediaItem, item_of_token, media_items

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"


def _noise(seconds, seed):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def test_items_own_their_placeholders_in_prompt_order(processor, thinker_config):
    """Audio, images and a video with its audio interleaved: every placeholder has its item, each
    item as many tokens as the prompt gives it, in prompt order within each kind."""
    video = gradient_frames(4, 56, 84, seed=3)
    clips = [tone(0.7, freq=300), _noise(1.3, 1), _noise(2.1, 2)]  # the last one is the video's
    text = f"{AUDIO} a {VISION} b {AUDIO} c {VISION} d {VIDEO} e"
    out = processor(text, images=[make_image(40, 30, seed=1), make_image(64, 48, seed=2)], audio=clips,
                    videos=[video], use_audio_in_video=True, fps=2.0)
    items = media_items(out, thinker_config)
    assert [it.kind for it in items] == ["audio"] * 3 + ["image"] * 2 + ["video"]
    ids = out["input_ids"][0].tolist()
    owner = item_of_token(ids, items)
    assert owner is not None
    for k, it in enumerate(items):
        where = np.flatnonzero(owner == k)
        assert len(where) == it.num_tokens > 0
        assert all(ids[t] == it.token_id for t in where)
    for token_id in {it.token_id for it in items}:  # within a kind, items follow each other
        seq = owner[np.asarray(ids) == token_id]
        assert np.all(np.diff(seq) >= 0)
    placeholders = {thinker_config.audio_token_id, thinker_config.image_token_id, thinker_config.video_token_id}
    assert np.array_equal(owner >= 0, np.isin(ids, list(placeholders)))
    assert len({it.digest for it in items}) == len(items)


def test_item_digest_is_its_content_only(processor, thinker_config):
    """An item's digest does not change when other items join the request (audio with per-clip
    features), and changes with its own content."""
    a1, a2 = _noise(1.0, 1), _noise(3.0, 2)  # a longer clip joins: the reference batch would pad a1
    alone = media_items(processor(AUDIO, audio=[a1]), thinker_config)
    both = media_items(processor(AUDIO + AUDIO, audio=[a1, a2], audio_per_clip=True), thinker_config)
    assert both[0] == alone[0] and both[1] != alone[0]
    other = media_items(processor(AUDIO, audio=[a1 * 0.5]), thinker_config)
    assert other[0].num_tokens == alone[0].num_tokens and other[0].digest != alone[0].digest

    im1, im2 = make_image(40, 30, seed=1), make_image(64, 48, seed=2)
    one = media_items(processor(VISION, images=[im1]), thinker_config)
    two = media_items(processor(VISION + VISION, images=[im1, im2]), thinker_config)
    assert two[0] == one[0] and two[1] != one[0]


def test_reference_batch_features_of_a_shorter_clip_depend_on_the_longest():
    """Why per-clip features exist: in the reference batch, a clip's last frame (and with some
    lengths its frame count) changes when a longer clip is in the same request."""
    a1, a2 = _noise(1.0, 1) + 0.05, _noise(3.0, 2)
    alone, _ = log_mel_features([a1])
    batch, mask = log_mel_features([a1, a2])
    n = alone.shape[-1]
    assert int(mask[0].sum()) == n
    assert not torch.equal(batch[0, :, :n], alone[0])
    odd = _noise(16080 / 16000, 3)  # not a whole number of hops: one frame more once padded
    assert int(log_mel_features([odd, a2])[1][0].sum()) == log_mel_features([odd])[1].shape[-1] + 1


@pytest.mark.parametrize("lengths", [[16000, 48000], [16080, 48000, 800], [48000, 16013]])
def test_per_clip_features_are_each_clip_alone(lengths):
    clips = [_noise(n / 16000, i) for i, n in enumerate(lengths)]
    feats, mask = log_mel_features(clips, per_clip=True)
    assert feats.shape[0] == mask.shape[0] == len(clips) and mask.dtype == torch.int32
    for i, clip in enumerate(clips):
        f, m = log_mel_features([clip])
        n = f.shape[-1]
        assert torch.equal(mask[i, :n], m[0]) and int(mask[i].sum()) == int(m.sum())
        assert torch.equal(feats[i, :, :n], f[0])
        assert not feats[i, :, n:].any()
    single, _ = log_mel_features(clips[:1], per_clip=True)
    assert torch.equal(single, log_mel_features(clips[:1])[0])


def test_item_of_token_refuses_a_prompt_that_does_not_match():
    items = [MediaItem("audio", 7, 3, b"a" * 16), MediaItem("audio", 7, 2, b"b" * 16)]
    owner = item_of_token([1, 7, 7, 7, 2, 7, 7, 3], items)
    assert owner.tolist() == [-1, 0, 0, 0, -1, 1, 1, -1]
    assert item_of_token([1, 7, 7, 7, 2, 7, 3], items) is None  # one placeholder short
