"""OpenAI wire types of replies (the subset this server speaks), with llama-server's ``timings`` and vLLM's
``stop_reason``: written without their unset fields, except a choice's ``finish_reason`` (:mod:`.schemas` has the
requests)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Resp(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class _Choice(_Resp):
    """A choice says ``finish_reason: null`` until it finishes (every streamed chunk but the last), as OpenAI's and
    llama-server's do, though responses are written without their other unset fields."""

    @model_serializer(mode="wrap")
    def _keep_finish(self, handler):
        out = handler(self)
        out.setdefault("finish_reason", None)
        return out


class ErrorBody(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Resp):
    error: ErrorBody


class FunctionCall(_Resp):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Resp):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Resp):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Resp):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None  # vLLM's extension: the stop string that ended the reply (Anthropic's stop_sequence)


class PromptTokensDetails(_Resp):
    cached_tokens: int = 0


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Timings(_Resp):
    """llama-server's ``timings`` object (an extension to the OpenAI wire format), from the last record."""

    prompt_n: int  # prompt tokens computed (cache_n more were reused)
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float
    cache_n: int
    ttft_ms: float  # from the request's arrival, queueing included
    draft_n: int | None = None  # speculative decoding: tokens drafted (llama-server's names)
    draft_n_accepted: int | None = None  # ... and accepted


def reply_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletion(_Resp):
    id: str = Field(default_factory=lambda: reply_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    timings: Timings | None = None
    cascade: dict[str, Any] | None = None  # with --cascade: tier, confidence, per-tier latency, reason


class FunctionCallDelta(_Resp):
    name: str | None = None  # in a call's first delta only, as OpenAI streams it
    arguments: str | None = None  # "" first, then the JSON text in pieces


class ToolCallDelta(_Resp):
    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(_Resp):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Choice):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None  # as ChatChoice's, on the chunk that finishes


class ChatCompletionChunk(_Resp):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None
    cascade: dict[str, Any] | None = None  # on the last chunk, with --cascade


class CompletionLogprobs(_Resp):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Choice):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Resp):
    id: str = Field(default_factory=lambda: reply_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    timings: Timings | None = None  # only for a single prompt


class Embedding(_Resp):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Resp):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Resp):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ondevice"
    meta: dict[str, Any] | None = None


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]
