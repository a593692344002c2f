"""The text tokenizer: a checkpoint's tokenizer.json, or the byte-level BPE its vocab.json and
merges.txt define.

The official Qwen3-Omni checkpoints ship vocab.json + merges.txt (+ tokenizer_config.json with the
added special tokens) and no tokenizer.json; transformers builds its fast tokenizer from them.
`byte_level_bpe` builds the same thing with `tokenizers`: Qwen2's pipeline (NFC, the split regex,
byte-level mapping and decoding) around a BPE model of those files. For Qwen3-Omni's own files the
result was identical, field for field, to the reference's tokenizer.json (checked before that 5 MiB
file left the package), and it gives transformers' ids and text (tests/multimodal/test_mm_tokenizer.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError

# Qwen2's pre-tokenizer split: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def load_tokenizer(folder: Path):
    """`tokenizers.Tokenizer` of a checkpoint folder: its tokenizer.json, else `byte_level_bpe`."""
    from tokenizers import Tokenizer

    own = folder / "tokenizer.json"
    if own.is_file():
        return Tokenizer.from_file(str(own))
    return Tokenizer.from_str(json.dumps(byte_level_bpe(folder)))


def byte_level_bpe(folder: Path) -> dict:
    """The tokenizer.json content that vocab.json, merges.txt and tokenizer_config.json's
    added_tokens_decoder define."""
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder}: no tokenizer.json and no {' / '.join(missing)} to build one from")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for n, line in enumerate((folder / "merges.txt").read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ConfigError(f"{folder / 'merges.txt'}:{n}: a merge is two tokens separated by one space, got {line!r}")
        merges.append(pair)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    added = [
        {"id": int(token_id), **{k: token[k] for k in _ADDED_TOKEN_FIELDS if k in token}}
        for token_id, token in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                _BYTE_LEVEL,
            ],
        },
        "post_processor": _BYTE_LEVEL,
        "decoder": _BYTE_LEVEL,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }
