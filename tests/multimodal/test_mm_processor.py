"""OmniProcessor vs transformers' Qwen3OmniMoeProcessor: chat template strings, processor outputs
(same keys, dtypes, token ids; features / pixels max abs error) and get_rope_index positions, for
text, images, audio, video and video with use_audio_in_video, single and batched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mm_synth import gradient_frames, make_image, report, tone

from thinktalk.multimodal.audio import load_audio
from thinktalk.multimodal.image import load_image, recipe_resize_image
from thinktalk.multimodal.mrope import get_rope_index
from thinktalk.multimodal.video import load_video

SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
          "auditory and visual inputs, as well as generating text and speech.")
# transformers' processor calls np.arange on 0-d tensors, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATIONS = {
    "system+media": [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "audio", "audio": "b.wav"},
                                     {"type": "text", "text": "What is in the picture and what do you hear?"}]},
    ],
    "plain": [{"role": "user", "content": "Hi there! 你好 😀"}],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": [{"type": "video", "video": "c.mp4"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A clip.", "reasoning_content": "looked at it"},
        {"role": "user", "content": "Thanks"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "sunny"},
    ],
    "openai-image-url": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "describe"}]},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False])
def test_chat_template_matches_reference(hf_processor, processor, name, thinking):
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    extra = {} if thinking is None else {"enable_thinking": thinking}
    for gen in (True, False):
        # transformers rewrites image_url parts in place: give it a copy
        ref = hf_processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=gen, tokenize=False,
                                               tools=tools, **extra)
        got = processor.apply_chat_template(messages, add_generation_prompt=gen, enable_thinking=thinking, tools=tools)
        assert got == ref


def test_chat_template_batch_and_named_template(hf_processor, processor):
    from thinktalk.config import ASSETS

    batch = [CONVERSATIONS["plain"], CONVERSATIONS["multi-turn"]]
    ref = hf_processor.apply_chat_template(copy.deepcopy(batch), add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(batch) == ref
    thinking = (ASSETS / "chat_template_thinking.jinja").read_text()
    ref = hf_processor.apply_chat_template(CONVERSATIONS["multi-turn"], chat_template=thinking,
                                           add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(CONVERSATIONS["multi-turn"], chat_template=thinking) == ref
    messages = copy.deepcopy(CONVERSATIONS["openai-image-url"])
    processor.apply_chat_template(messages)
    assert messages == CONVERSATIONS["openai-image-url"]  # ours leaves the input untouched


# --------------------------------------------------------------------------------------------
# processor outputs + positions


def _compare(name, hf_processor, processor, hf_rope_index, thinker_config, text, *, use_audio_in_video=False,
             fps=None, **media):
    extra = {} if fps is None else {"fps": fps}
    ref = hf_processor(text=text, return_tensors="pt", padding=True, use_audio_in_video=use_audio_in_video,
                       **extra, **media)
    got = processor(text, use_audio_in_video=use_audio_in_video, fps=fps, **media)
    assert sorted(got) == sorted(ref.keys())
    for key in ref.keys():
        r, g = ref[key], got[key]
        assert g.dtype == r.dtype and g.shape == r.shape, key
        if r.is_floating_point():
            err = (g - r).abs().max().item()
            report(f"{name} {key}", err)
            assert err <= 1e-5, key
        else:
            assert torch.equal(g, r), key
    audio_lengths = ref["feature_attention_mask"].sum(-1) if "feature_attention_mask" in ref else None
    args = (ref["input_ids"], ref.get("image_grid_thw"), ref.get("video_grid_thw"), ref["attention_mask"],
            use_audio_in_video, audio_lengths, ref.get("video_second_per_grid"))
    ref_pos, ref_delta = hf_rope_index(*args)
    pos, delta = get_rope_index(*args, config=thinker_config)
    assert pos.dtype == ref_pos.dtype and torch.equal(pos, ref_pos)
    assert delta.dtype == ref_delta.dtype and torch.equal(delta, ref_delta)
    return got, pos


@pytest.fixture(scope="module")
def assets(mm_files):
    return {
        "image": load_image(mm_files["image_png"]),
        "image2": make_image(33, 97, seed=21),
        "audio": load_audio(mm_files["audio_wav"]),
        "audio5": load_audio(mm_files["audio_5s"]),
        "video": load_video(mm_files["video"], with_audio=True),
    }


@pytest.fixture
def compare(hf_processor, processor, hf_rope_index, thinker_config):
    def run(name, text, **kw):
        return _compare(name, hf_processor, processor, hf_rope_index, thinker_config, text, **kw)
    return run


def test_text_only_batch_left_padded(compare):
    got, pos = compare("text", ["Hello world, a longer prompt here.", "Hi"])
    assert got["attention_mask"][1, 0] == 0 and got["attention_mask"][1, -1] == 1


def test_one_image_and_audio_prompt_of_428_tokens(compare, processor):
    # VERIFY.md: 640x480 image -> 300 image tokens, 5 s audio -> 65 audio tokens, 428 in all
    text = processor.apply_chat_template(CONVERSATIONS["system+media"])
    audio = tone(5.0, 16000, freq=300)
    got, _ = compare("image+audio", [text], images=[make_image(640, 480, seed=22)], audio=[audio])
    ids = got["input_ids"][0]
    assert ids.numel() == 428
    assert int((ids == processor.image_token_id).sum()) == 300 and int((ids == processor.audio_token_id).sum()) == 65


def test_one_image(compare, assets):
    compare("one image", [f"<|im_start|>user\n{VISION}What is it?<|im_end|>\n"], images=[assets["image"]])


def test_two_images(compare, assets):
    compare("two images", [f"{VISION}first{VISION}second"], images=[assets["image"], assets["image2"]])


def test_audio(compare, assets):
    compare("audio", [f"listen {AUDIO} and {AUDIO}"], audio=[assets["audio"], assets["audio5"]])


@pytest.mark.parametrize("fps", [None, 2.0])
def test_video(compare, assets, fps):
    frames = assets["video"].frames
    compare(f"video fps={fps}", [f"watch {VIDEO} now"], videos=[frames], fps=fps)


@pytest.mark.parametrize("fps", [2.0, 1.3, None])
def test_video_with_audio_in_video(compare, assets, processor, fps):
    clip = assets["video"]
    text = [f"{AUDIO} then {VIDEO} end"]
    got, pos = compare(f"video+audio_in_video fps={fps}", text, videos=[clip.frames], audio=[assets["audio"], clip.audio],
                       use_audio_in_video=True, fps=fps)
    ids = got["input_ids"][0].tolist()
    start = ids.index(processor.token_id("<|vision_start|>"))
    assert ids[start + 1] == processor.token_id("<|audio_start|>")


def test_mixed_batch(compare, assets):
    texts = [f"{VISION}hi", f"{AUDIO} and {VIDEO} and {VISION} done"]
    compare("mixed batch", texts, images=[assets["image"], assets["image2"]], audio=[assets["audio"]],
            videos=[assets["video"].frames], fps=2.0)


def test_audio_in_video_batch(compare, assets):
    clip = assets["video"]
    short = gradient_frames(4, 48, 80, seed=31)
    texts = [f"{VIDEO}", f"{AUDIO} {VIDEO} and {VISION}"]
    compare("audio_in_video batch", texts, videos=[clip.frames, short], images=[assets["image"]],
            audio=[clip.audio, assets["audio"], tone(1.7, freq=500)], use_audio_in_video=True, fps=2.0)


def test_audio_only_batch_uses_text_positions(compare, assets):
    compare("audio batch", [f"a{AUDIO}b", "c"], audio=[assets["audio"]])


# --------------------------------------------------------------------------------------------
# the recipe end to end


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_prepare_messages_matches_recipe(hf_processor, processor, mm_files, use_audio_in_video):
    """prepare_messages == transformers' processor fed what qwen-omni-utils' process_mm_info returns.

    The media are loaded with our loaders (checked against their references in the other test
    files): images pre-resized as fetch_image does, frames as float (fetch_video returns float),
    and the video's true sample rate passed as fps.
    """
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [
            {"type": "image", "image": str(mm_files["image_jpg"])},
            {"type": "audio", "audio": mm_files["audio_wav"].read_bytes()},
            {"type": "video", "video": str(mm_files["video"])},
            {"type": "text", "text": "Describe all of it."},
        ]},
    ]
    got = processor.prepare_messages(messages, use_audio_in_video=use_audio_in_video)
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    clip = load_video(mm_files["video"], with_audio=use_audio_in_video)
    audios = [load_audio(mm_files["audio_wav"])] + ([clip.audio] if use_audio_in_video else [])
    ref = hf_processor(text=text, images=[recipe_resize_image(load_image(mm_files["image_jpg"]))], audio=audios,
                       videos=[clip.frames.astype(np.float32)], fps=clip.metadata.sample_fps,
                       use_audio_in_video=use_audio_in_video, padding=True, return_tensors="pt")
    assert sorted(got) == sorted(ref.keys())
    for key in ref.keys():
        if ref[key].is_floating_point():
            err = (got[key] - ref[key]).abs().max().item()
            report(f"prepare_messages aiv={use_audio_in_video} {key}", err)
            assert err <= 1e-5
        else:
            assert torch.equal(got[key], ref[key]), key
    assert got["video_second_per_grid"].tolist() == [1.0]


def test_prepare_messages_batch_and_sources(processor, mm_files):
    import base64

    url = "data:image/png;base64," + base64.b64encode(mm_files["image_png"].read_bytes()).decode()
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": url}, {"type": "text", "text": "a"}]}],
        [{"role": "user", "content": [{"type": "image", "image": make_image(40, 30)},
                                      {"type": "audio", "audio": tone(1.0)}, {"type": "text", "text": "b"}]}],
    ]
    out = processor.prepare_messages(convs, enable_thinking=False)
    assert out["input_ids"].shape[0] == 2 and out["image_grid_thw"].shape == (2, 3)
    assert out["attention_mask"][:, -1].tolist() == [1, 1]
    assert processor.decode(out["input_ids"][0], skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")


def test_decode_matches_reference(hf_processor, processor):
    text = "<|im_start|>user\n你好😀 café\r\n\tcode();<|im_end|>\n<|audio_start|><|audio_pad|><|audio_end|>"
    ids = processor.encode(text)
    assert ids == hf_processor.tokenizer(text)["input_ids"]
    for skip in (False, True):
        assert processor.decode(ids, skip_special_tokens=skip) == hf_processor.tokenizer.decode(ids, skip_special_tokens=skip)
    assert processor.decode(torch.tensor([ids, ids])) == [processor.decode(ids)] * 2


def test_processor_reads_token_ids_from_the_tokenizer(processor, thinker_config):
    assert processor.image_token_id == thinker_config.image_token_id
    assert processor.video_token_id == thinker_config.video_token_id
    assert processor.audio_token_id == thinker_config.audio_token_id
    assert processor.position_id_per_seconds == thinker_config.position_id_per_seconds


def test_rope_index_video_positions_follow_time(processor, thinker_config):
    frames = gradient_frames(4, 64, 64)
    out = processor([f"x{VIDEO}y"], videos=[frames], fps=2.0)
    pos, _ = get_rope_index(out["input_ids"], None, out["video_grid_thw"], out["attention_mask"], False, None,
                            out["video_second_per_grid"], config=thinker_config)
    vid = out["input_ids"][0] == processor.video_token_id
    t = pos[0, 0, vid].unique().tolist()
    start = float(pos[0, 0, 2])  # first video token: after "x" and <|vision_start|>
    assert [v - start for v in t] == [0.0, thinker_config.position_id_per_seconds * 1.0]


def test_video_as_list_of_frames(processor, mm_files):
    frames = [make_image(60, 40, seed=30 + i) for i in range(3)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "sample_fps": 1.0},
                                             {"type": "text", "text": "what happens?"}]}]
    out = processor.prepare_messages(messages)
    assert out["video_grid_thw"][0, 0].item() == 2  # 3 frames padded to 4 -> 2 temporal patches
    assert out["video_second_per_grid"].tolist() == [2.0]
    with pytest.raises(Exception, match="no audio track"):
        processor.prepare_messages(messages, use_audio_in_video=True)


def test_official_layout_without_tokenizer_json(tmp_path):
    """The official checkpoints ship vocab.json + merges.txt and no tokenizer.json."""
    import shutil

    from thinktalk.config import ASSETS, ConfigError
    from thinktalk.multimodal.processor import OmniProcessor

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        shutil.copyfile(ASSETS / name, tmp_path / name)
    shutil.copyfile(ASSETS / "config_instruct.json", tmp_path / "config.json")
    proc = OmniProcessor.from_pretrained(tmp_path)
    ref = OmniProcessor.from_pretrained(ASSETS)
    text = "你好😀 <|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|>hi<|im_end|>"
    assert proc.encode(text) == ref.encode(text)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json and no merges.txt"):
        OmniProcessor.from_pretrained(tmp_path)
