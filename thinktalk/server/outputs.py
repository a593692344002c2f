"""Generated token ids -> what a chat choice sends: text deltas, reasoning, tool calls, stop strings.

One pipeline serves streaming and non-streaming answers, so both give the same text:

    ids -> IncrementalDetokenizer -> StopStrings -> ReasoningSplitter -> ToolCallParser
                                                       |                      |
                                               reasoning_content       content, tool_calls

Each stage holds back only what could still turn into its marker (a stop string, ``<think>``,
``</think>``, ``<tool_call>``) and lets the rest through at once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class IncrementalDetokenizer:
    """Decode a growing list of ids into text deltas; never splits a multi-byte character."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded into text already sent
        self.read = 0

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""  # an incomplete UTF-8 sequence (or a special token): wait for more
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Cut the text at the first stop string; hold back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = max(len(self.buf) - self.hold, 0)
        out, self.buf = self.buf[:keep], self.buf[keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


class ReasoningSplitter:
    """A Thinking model's ``<think>...</think>`` part apart from the answer.

    The answer opens with ``<think>`` (after blank space) or it has no reasoning part at all.
    """

    def __init__(self):
        # start -> reasoning_start -> reasoning -> answer_start -> answer, or start -> answer
        self.state = "start"
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buf = head[len(THINK_OPEN) :]
                    self.state = "reasoning_start"
                    continue
                if THINK_OPEN.startswith(head):  # blank, or a beginning of <think>: wait
                    return reasoning, content
                self.state = "answer"
                continue
            if self.state in ("reasoning_start", "answer_start"):  # newlines after a tag are layout
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    return reasoning, content
                self.state = "reasoning" if self.state == "reasoning_start" else "answer"
                continue
            if self.state == "reasoning":
                end = self.buf.find(THINK_CLOSE)
                if end < 0:
                    keep = len(self.buf) - _partial_suffix(self.buf, THINK_CLOSE)
                    reasoning += self.buf[:keep]
                    self.buf = self.buf[keep:]
                    return reasoning, content
                reasoning += self.buf[:end]
                self.buf = self.buf[end + len(THINK_CLOSE) :]
                self.state = "answer_start"
                continue
            content += self.buf
            self.buf = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        buf, self.buf = self.buf, ""
        if self.state in ("reasoning_start", "reasoning"):
            return (buf.lstrip("\n") if self.state == "reasoning_start" else buf), ""
        if self.state == "answer_start":
            return "", ""
        return "", buf


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


class ToolCallParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks -> tool calls.

    A block that is not a JSON object with a string name stays in the content as it was written.
    """

    def __init__(self):
        self.buf = ""
        self.inside = False
        self.calls: list[ParsedToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self.buf += text
        content, calls = "", []
        while True:
            if not self.inside:
                start = self.buf.find(TOOL_OPEN)
                if start < 0:
                    keep = len(self.buf) - _partial_suffix(self.buf, TOOL_OPEN)
                    content += self.buf[:keep]
                    self.buf = self.buf[keep:]
                    return content, calls
                content += self.buf[:start]
                self.buf = self.buf[start + len(TOOL_OPEN) :]
                self.inside = True
            end = self.buf.find(TOOL_CLOSE)
            if end < 0:
                return content, calls
            body, self.buf = self.buf[:end], self.buf[end + len(TOOL_CLOSE) :]
            self.inside = False
            call = self._parse(body)
            if call is None:
                content += TOOL_OPEN + body + TOOL_CLOSE
            else:
                calls.append(call)

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        buf, self.buf = self.buf, ""
        if not self.inside:
            return buf, []
        self.inside = False
        call = self._parse(buf)  # the answer ended inside a block (no closing tag)
        return ("", [call]) if call is not None else (TOOL_OPEN + buf, [])

    def _parse(self, body: str) -> ParsedToolCall | None:
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError:
                args = json.dumps(args)
            else:
                return self._keep(ParsedToolCall(obj["name"], args))
        return self._keep(ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False)))

    def _keep(self, call: ParsedToolCall) -> ParsedToolCall:
        self.calls.append(call)
        return call


@dataclass
class Pieces:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class TextPipeline:
    """All stages for one choice. `feed(ids)` / `finish()` return what is ready to send."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], parse_tools: bool):
        self.detok = IncrementalDetokenizer(decode)
        self.stops = StopStrings(stops)
        self.reasoning = ReasoningSplitter()
        self.tools = ToolCallParser() if parse_tools else None
        self.text = ""  # the answer text after stop strings (reasoning included), as sent
        self.all_reasoning = ""
        self.all_content = ""
        self.n_tokens = 0
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.stops.hit

    def feed(self, ids: list[int]) -> Pieces:
        self.n_tokens += len(ids)
        before = self.reasoning.state
        pieces = self._route(self.stops.feed(self.detok.add(ids)), final=False)
        if before.startswith("reasoning") or self.reasoning.state.startswith("reasoning"):
            self.reasoning_tokens = self.n_tokens  # up to the token that closed the reasoning
        return pieces

    def finish(self) -> Pieces:
        text = "" if self.stops.hit else self.stops.feed(self.detok.flush())
        return self._route(text + self.stops.flush(), final=True)

    def _route(self, text: str, final: bool) -> Pieces:
        self.text += text
        reasoning, content = self.reasoning.feed(text)
        if final:
            r2, c2 = self.reasoning.flush()
            reasoning, content = reasoning + r2, content + c2
        calls: list[ParsedToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                c2, more = self.tools.flush()
                content, calls = content + c2, calls + more
        self.all_reasoning += reasoning
        self.all_content += content
        return Pieces(reasoning, content, calls)

    @property
    def tool_calls(self) -> list[ParsedToolCall]:
        return self.tools.calls if self.tools is not None else []


class Tokens:
    """Token strings and their raw bytes (a token may hold part of a character), for logprobs."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder = _byte_decoder()

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.processor.tokenizer.id_to_token(token_id)
        if piece and all(c in self._byte_decoder for c in piece):
            raw = bytes(self._byte_decoder[c] for c in piece)  # byte-level BPE symbols -> bytes
            return raw.decode("utf-8", "replace"), list(raw)
        text = self.processor.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE's symbol for every byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table
