"""The text pipeline of a chat choice: same result whether the ids come one by one or all at once."""

import json

import pytest

from thinktalk.server.outputs import (
    IncrementalDetokenizer, ReasoningSplitter, StopStrings, TextPipeline, ToolCallParser,
)


class ByteTokenizer:
    """Every byte is a token; 256 is a special token that decodes to nothing."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def run(pipe_factory, text: str, chunk: int):
    ids = ByteTokenizer.encode(text) + [256]
    pipe = pipe_factory()
    reasoning = content = ""
    calls = []
    for start in range(0, len(ids), chunk):
        p = pipe.feed(ids[start : start + chunk])
        reasoning, content, calls = reasoning + p.reasoning, content + p.content, calls + p.tool_calls
        if pipe.stopped:
            break
    p = pipe.finish()
    return reasoning + p.reasoning, content + p.content, calls + p.tool_calls


def test_detokenizer_never_splits_a_character():
    d = IncrementalDetokenizer(ByteTokenizer.decode)
    text = "héllo wörld ✓ 日本"
    out = [d.add([b]) for b in ByteTokenizer.encode(text)] + [d.flush()]
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


def test_stop_strings_across_chunks():
    s = StopStrings(["STOP", "##"])
    out = "".join(s.feed(c) for c in "abcST" "OPdef") + s.flush()
    assert out == "abc" and s.hit
    s = StopStrings(["STOP"])
    assert "".join(s.feed(c) for c in "abcSTOxyz") + s.flush() == "abcSTOxyz" and not s.hit


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_reasoning_split(chunk):
    factory = lambda: TextPipeline(ByteTokenizer.decode, [], parse_tools=False)  # noqa: E731
    assert run(factory, "<think>\nwhy not</think>\n\nbecause.", chunk)[:2] == ("why not", "because.")
    assert run(factory, "plain answer <think>", chunk)[:2] == ("", "plain answer <think>")
    assert run(factory, "<think>cut short", chunk)[:2] == ("cut short", "")
    assert run(factory, "<thin", chunk)[:2] == ("", "<thin")


def test_reasoning_tokens_counted():
    pipe = TextPipeline(ByteTokenizer.decode, [], parse_tools=False)
    for b in ByteTokenizer.encode("<think>ab</think>cd"):
        pipe.feed([b])
    pipe.finish()
    assert pipe.all_reasoning == "ab" and pipe.all_content == "cd"
    assert pipe.reasoning_tokens == len("<think>ab</think>")


@pytest.mark.parametrize("chunk", [1, 2, 7, 1000])
def test_tool_calls(chunk):
    factory = lambda: TextPipeline(ByteTokenizer.decode, [], parse_tools=True)  # noqa: E731
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    _, content, calls = run(factory, text, chunk)
    assert content.strip() == "Let me look."
    assert [c.name for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id != calls[1].id
    # not JSON: stays text; unterminated but valid: still a call
    _, content, calls = run(factory, "<tool_call>not json</tool_call>", chunk)
    assert content == "<tool_call>not json</tool_call>" and not calls
    _, content, calls = run(factory, '<tool_call>{"name": "f", "arguments": {"x": 1}}', chunk)
    assert content == "" and calls[0].name == "f"


def test_tool_call_parser_ignores_tags_without_tools():
    factory = lambda: TextPipeline(ByteTokenizer.decode, [], parse_tools=False)  # noqa: E731
    _, content, calls = run(factory, '<tool_call>{"name": "f"}</tool_call>', 1)
    assert calls == [] and content == '<tool_call>{"name": "f"}</tool_call>'


def test_stop_string_inside_pipeline_cuts_everything_after():
    factory = lambda: TextPipeline(ByteTokenizer.decode, ["\nUser:"], parse_tools=False)  # noqa: E731
    for chunk in (1, 4, 100):
        assert run(factory, "Hi there.\nUser: more", chunk)[1] == "Hi there."


def test_parsers_alone():
    r = ReasoningSplitter()
    assert r.feed("  <th") == ("", "")
    assert r.feed("ink>x") == ("x", "")
    t = ToolCallParser()
    assert t.feed("a<tool_") == ("a", [])
    assert t.feed("call>{}</tool_call>b") == ("<tool_call>{}</tool_call>b", [])


def test_token_bytes_of_the_real_tokenizer():
    from thinktalk.config import ASSETS
    from thinktalk.multimodal.tokenizer import load_tokenizer
    from thinktalk.server.outputs import Tokens

    tok = load_tokenizer(ASSETS)

    class Processor:
        tokenizer = tok

        @staticmethod
        def decode(ids, skip_special_tokens=False):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    tokens = Tokens(Processor())
    text = "Grüße, 日本語! <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert b"".join(bytes(tokens.get(i)[1]) for i in ids).decode("utf-8") == text
    assert tokens.get(tok.token_to_id("<|im_end|>"))[0] == "<|im_end|>"
    assert tokens.get(ids[0]) is tokens.get(ids[0])  # cached
