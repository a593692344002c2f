"""OpenAI-shaped request and response models, and errors in OpenAI's shape.

Request models validate types and ranges, so a bad value is a 400 naming its field before any
work starts. Unknown fields are ignored (clients send fields of newer API versions), known fields
are checked. Responses are built as models and sent with `None` fields left out, except where the
OpenAI schema has an explicit null (message.content, finish_reason in the final response).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ..errors import InputError

AUDIO_OUT_FORMATS = ("wav", "mp3", "flac", "opus", "pcm16")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm", "pcm16")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# -- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error that goes back to the client as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- chat: request --------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


def _url_object(v):
    """A bare URL string is accepted where OpenAI wants {"url": ...}."""
    return {"url": v} if isinstance(v, str) else v


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class MediaURL(_Lenient):
    url: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: Annotated[ImageURL, BeforeValidator(_url_object)]


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: Annotated[MediaURL, BeforeValidator(_url_object)]


class AudioURLPart(_Lenient):
    type: Literal["audio_url"]
    audio_url: Annotated[MediaURL, BeforeValidator(_url_object)]


class InputAudio(_Lenient):
    data: str  # base64 (or a data: URL)
    format: Literal[INPUT_AUDIO_FORMATS] = "wav"  # type: ignore[valid-type]


class InputAudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[
    Union[TextPart, ImagePart, InputAudioPart, VideoPart, AudioURLPart], Field(discriminator="type")
]


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class AudioOut(_Lenient):
    voice: str
    format: Literal[AUDIO_OUT_FORMATS] = "wav"  # type: ignore[valid-type]


class ResponseFormat(_Lenient):
    type: Literal["text"]


class ChatTemplateKwargs(_Lenient):
    enable_thinking: bool | None = None


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as torch's generators take
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOut | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # extensions (vLLM-style extra body fields)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    preset: str | None = None
    use_audio_in_video: bool = False
    enable_thinking: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def template_tools(self) -> list[dict] | None:
        """The tools the chat template is given (None: none, and no tool calls are parsed).

        tool_choice "auto" (the default with tools) and "none" are what they say. "required" and a
        named function promise a tool call; vLLM keeps that promise with guided decoding (the
        answer constrained to the tools' JSON schema). We have no constrained decoding, so rather
        than pass them off as "auto" they are refused.
        """
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []]
        choice = self.tool_choice
        forcing = choice == "required" or isinstance(choice, NamedToolChoice)
        if not tools:
            if forcing:
                raise InputError("tool_choice needs tools", param="tool_choice")
            return None
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice) and all(t["function"]["name"] != choice.function.name for t in tools):
            raise InputError(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                             param="tool_choice")
        if forcing:
            what = "'required'" if choice == "required" else f"the function {choice.function.name!r}"
            raise InputError(
                f"tool_choice {what} is not supported: forcing a tool call needs guided decoding, which this "
                "server does not have; use 'auto' (the model decides, and the tool calls it writes are returned) "
                "or 'none'", param="tool_choice")
        return tools


# -- chat: response -------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob] | None = None


class ResponseFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(_Out):
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: ResponseFunction


class MessageAudio(_Out):
    id: str
    data: str
    transcript: str
    expires_at: int


class ResponseMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    audio: MessageAudio | None = None


class Choice(_Out):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(_Out):
    cached_tokens: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    video_tokens: int = 0


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = 0
    audio_tokens: int = 0  # codec frames of the spoken answer


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaAudio(_Out):
    id: str
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    audio: DeltaAudio | None = None


class ChunkChoice(_Out):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# -- audio ----------------------------------------------------------------------------------------
class SpeechRequest(_Lenient):
    model: str | None = None
    input: str = Field(min_length=1, max_length=4096)
    voice: str
    response_format: Literal[SPEECH_FORMATS] = "mp3"  # type: ignore[valid-type]
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: Literal["audio"] | None = None

    @field_validator("input")
    @classmethod
    def _not_blank(cls, v: str):
        if not v.strip():
            raise ValueError("input must not be blank")
        return v

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_name(cls, v):
        # the openai client may send {"id": ...} for custom voices
        if isinstance(v, dict) and isinstance(v.get("id"), str):
            return v["id"]
        return v


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thinktalk"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
