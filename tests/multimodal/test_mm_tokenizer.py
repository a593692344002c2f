"""The tokenizer built from vocab.json + merges.txt equals transformers' Qwen2 tokenizer of the
same files (the official checkpoints ship no tokenizer.json; neither does this package)."""

import json
import shutil

import pytest

transformers = pytest.importorskip("transformers")

from thinktalk.config import ASSETS  # noqa: E402
from thinktalk.multimodal.tokenizer import byte_level_bpe, load_tokenizer  # noqa: E402

TEXTS = [
    "Hello, world! It's 2026; we'll see what they've done.",
    "你好😀，世界！ こんにちは 안녕하세요 Привет мир",
    "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>hi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n\treturn x**2  # 12345678 \r\n\n\n   trailing   ",
    "naïve café — “quotes” ‘single’ … ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<think>\n\n</think>\n\n<tool_call>{\"name\": \"f\"}</tool_call>",
]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(ASSETS / name, folder / name)
    return folder


def test_same_model_and_splitting_as_transformers(official):
    hf = json.loads(transformers.AutoTokenizer.from_pretrained(official).backend_tokenizer.to_str())
    ours = byte_level_bpe(official)
    for key in ("added_tokens", "normalizer", "model"):
        assert ours[key] == hf[key], key
    assert ours["pre_tokenizer"]["pretokenizers"][0] == hf["pre_tokenizer"]["pretokenizers"][0]  # the split regex
    # (the remaining differences are offset trimming flags: they change offsets, not ids or text)


def test_same_ids_and_text_as_transformers(official):
    hf = transformers.AutoTokenizer.from_pretrained(official)
    ours = load_tokenizer(official)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_a_folder_with_a_tokenizer_json_uses_it(official, tmp_path):
    load_tokenizer(official).save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode(TEXTS[1]).ids == load_tokenizer(official).encode(TEXTS[1]).ids
