"""Text to speech through the talker: the given text is forced as the thinker's answer.

Qwen3-Omni has no separate TTS model: the talker speaks what the thinker answers, reading the
thinker's token embeddings and the hidden states of layer `accept_hidden_layer` over the whole
conversation. To speak a given text we build the conversation a normal spoken answer would have
had:

    <|im_start|>user\\nRead the following text aloud ...\\n\\n{text}<|im_end|>\\n<|im_start|>assistant\\n{text}

and run ONE thinker forward over all of it (teacher forcing: no sampling, the answer tokens are
the text's own tokens). The request then looks exactly like one whose answer the thinker generated
and ended with <|im_end|>: `req.output_ids` = the text's tokens + <|im_end|>, and `req.capture` holds
the embeddings and hidden states of every position fed (prompt + answer), so `Omni.speak` (talker,
code predictor, code2wav) runs on it unchanged.

    omni.say("Hello there.", "Ethan")  -> Result with .audio (24 kHz float32)

In the server the forward runs on the engine thread (`AsyncEngine.call`), the only thread that
runs the thinker, and the talker in the speech pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .layers.attention import ContiguousKV, SequenceKV
from .request import Request, SamplingParams, Status

if TYPE_CHECKING:
    from .api import Omni, Result

READ_ALOUD = "Read the following text aloud, exactly as written, and say nothing else."


def _user_prompt(text: str, instructions: str | None) -> str:
    head = READ_ALOUD if not instructions else f"{READ_ALOUD} {instructions.strip()}"
    return f"{head}\n\n{text}"


def speech_request(self: "Omni", text: str, speaker: str, *, instructions: str | None = None) -> Request:
    """A request whose answer is `text`, ready for `forced_prefill` then `speak` (CPU work only)."""
    if not text or not text.strip():
        raise InputError("there is no text to speak", param="input")
    speaker = self.check_speaker(speaker)
    messages = [{"role": "user", "content": [{"type": "text", "text": _user_prompt(text, instructions)}]}]
    inputs = self.processor.prepare_messages(messages, enable_thinking=None)
    prompt = inputs["input_ids"][0].tolist()
    answer = self.processor.tokenizer.encode(text, add_special_tokens=False).ids
    if not answer:
        raise InputError("the text has no tokens to speak", param="input")
    n = len(prompt)
    req = Request(
        prompt_ids=prompt,
        positions=torch.arange(n)[None].expand(3, -1).clone(),  # a text-only prompt: t = h = w
        rope_delta=0,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=len(answer) + 1),
        speaker=speaker,
    )
    req.forced_answer = answer
    req.mm_inputs = {}
    return req


@torch.inference_mode()
def forced_prefill(self: "Omni", req: Request) -> None:
    """One thinker forward over prompt + forced answer, keeping what the talker reads.

    Runs the thinker: call it where the thinker may run (the engine thread in the server).
    """
    answer: list[int] = req.forced_answer
    ids = req.prompt_ids + answer
    n_prompt, n = len(req.prompt_ids), len(req.prompt_ids) + len(answer)
    thinker = self.model.thinker
    positions = torch.cat([
        req.positions.to(torch.long),
        (torch.arange(n_prompt, n) + req.rope_delta)[None].expand(3, -1),
    ], dim=1).to(self.device)
    layer = self.cfg.talker_config.accept_hidden_layer
    capture = tuple(sorted({0, layer}))
    embeds, _ = thinker.embed(torch.tensor(ids, device=self.device))
    _, captured = thinker(embeds, positions, ContiguousKV([SequenceKV()], [n]), None, capture)
    req.capture = {k: [captured[k]] for k in capture}
    # as if the thinker had generated the answer and then <|im_end|> (whose state is never computed)
    req.output_ids = list(answer) + [self.tokenizer_eos[0]]
    req.status = Status.FINISHED
    req.finish_reason = "stop"


def say(self: "Omni", text: str, speaker: str = "Ethan", *, instructions: str | None = None,
        max_frames: int | None = None) -> "Result":
    """Speak `text` with `speaker` (Python API; drives the thinker directly, like `generate`)."""
    from .api import Result

    req = speech_request(self, text, speaker, instructions=instructions)
    forced_prefill(self, req)
    codes, audio = self.speak(req, max_frames=max_frames)
    return Result(text=text, token_ids=list(req.output_ids), finish_reason="stop", prompt_tokens=len(req.prompt_ids),
                  audio=audio, codes=codes)
