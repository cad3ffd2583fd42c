"""OpenAI wire types of requests (the subset this server speaks) plus llama-server's /tokenize and
/detokenize shapes; the replies are in :mod:`.replies`.

Requests ignore unknown fields (clients send many); values outside their range are a 400 naming the field.
Bounds that OpenAI's API does not state keep one request from costing the server more than its body is worth
(found by fuzzing the server: tests/test_serve_fuzz.py): how deep its JSON nests, how many stop strings it has.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..engine.chat import check_has_content
from ..errors import InvalidArgument
from .replies import ToolCall

# levels of JSON nesting a request field (or a tool call's arguments) may have: schemas and tool arguments are
# walked recursively (grammar conversion, chat templates), and Python's recursion ends near 1,000 frames
MAX_DEPTH = 64
# stop strings per request (OpenAI takes 4): each is looked for after every token, on the one computing thread
MAX_STOPS = 64


def json_depth(value: Any) -> int:
    """How deep ``value`` (parsed JSON) nests: 0 for a scalar, 1 for a flat list or object. Iterative, so any
    depth is measured."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, dict):
            x = x.values()
        elif not isinstance(x, list):
            continue
        deepest = max(deepest, d)
        todo.extend((y, d + 1) for y in x if isinstance(y, (dict, list)))  # scalars add no depth
    return deepest


def _too_deep(what: str, depth: int | None) -> ValueError:
    """``depth`` None: deeper than Python's JSON parser goes."""
    hint = " (a JSON schema can name a part in $defs and $ref it)" if what in ("response_format", "tools") else ""
    return ValueError(f"{what} nests {depth or 'too many'} levels deep but this server accepts at most {MAX_DEPTH}; "
                      f"flatten it{hint}")


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """An explicit null is the field's default, as in OpenAI's API (``temperature=None`` from the openai
        client or LangChain); a required field sent as null is still missing."""
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


class _Body(_Req):
    """A whole request body: no field nests deeper than :data:`MAX_DEPTH`."""

    @field_validator("*", mode="before")
    @classmethod
    def _shallow(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, (dict, list)) and (depth := json_depth(v)) > MAX_DEPTH:
            raise _too_deep(info.field_name, depth)
        return v


# -- shared request parts -------------------------------------------------------------------------------
class StreamOptions(_Req):
    include_usage: bool = False


class LoraScale(_Req):
    """llama-server's per-request adapter: its id (GET /lora-adapters) and the scale to apply it at."""

    id: int
    scale: float = Field(0.0, ge=-10, le=10, allow_inf_nan=False)  # 1: as trained, 0: off (a bound, not a tuning)


class _Sampling(_Body):
    """Fields common to chat and completions (llama-server's extensions included). No number field takes NaN or
    infinity (nor 1e400, which JSON parsers read as infinity): every route's request is one of these."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str | None = None
    # left out: llama.cpp's defaults, as llama-server and `ondevice run` use (temperature 0.8, top_p 0.95, top_k
    # 40, min_p 0.05); OpenAI's 1.0 / 1.0 / none / none let a small model ramble to the end of its context
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0: the likeliest token only (llama.cpp keeps at least one)
    top_k: int | None = None  # extension; 0 = off, and so is k < 0 (Ollama's -1): llama.cpp's sampler skips k <= 0
    _top_k_off = field_validator("top_k")(lambda cls, k: k if k is None else max(k, 0))
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    repeat_penalty: float = Field(1.0, gt=0)  # extension
    # extensions: llama-server's other samplers, by its names (None: off, as there; see Sampling)
    repeat_last_n: int | None = Field(None, ge=-1)
    typical_p: float | None = Field(None, ge=0, le=1)
    top_n_sigma: float | None = None
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(None, ge=0)
    mirostat_eta: float | None = Field(None, gt=0, le=1)
    dynatemp_range: float | None = Field(None, ge=0)
    dynatemp_exponent: float | None = Field(None, gt=0)
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = None  # below 1: the default, as llama-server takes it
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_penalty_last_n: int | None = Field(None, ge=0)
    dry_sequence_breakers: list[str] | None = Field(None, min_length=1)
    n_indent: int | None = Field(None, ge=0)  # llama-server's code-infill line limits (engine/stops.LineLimits)
    t_max_predict_ms: float | None = Field(None, ge=0)
    samplers: list[str] | str | None = None  # llama-server's: which of llama.cpp's samplers, in its order
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100] (-100 bans it)
    n: int = Field(1, ge=1, le=64)  # choices per prompt: one batcher job each, decoded together
    seed: int | None = None  # -1: random, as llama-server's and Ollama's default; any other int64 as uint32
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: generate exactly max_tokens (benchmarks)
    grammar: str | None = None  # extension (llama-server's): a GBNF grammar the reply must follow
    # extension: speculative decoding ("lookup", "model": the server's --draft model, "none"; None: the server's
    # default); the output is the same, only faster where drafts are accepted
    draft: Literal["lookup", "model", "none"] | None = None
    draft_max: int | None = Field(None, ge=1, le=64)
    # llama-server's: these adapters at these scales, the others off (None: as the model names them, BASE+NAME)
    lora: list[LoraScale] | None = None
    # llama-server's: seconds a stream may stay silent before an SSE ping (None: --sse-ping-interval; <= 0: off)
    sse_ping_interval: float | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _n_predict(cls, data: Any) -> Any:
        """llama-server's ``n_predict``: max_tokens, taken before max_tokens as there; -1 runs until the reply ends
        or the context is full."""
        if not isinstance(data, dict) or data.get("n_predict") is None:
            return data
        n = data["n_predict"]
        if not isinstance(n, int) or isinstance(n, bool) or n < -1:
            raise ValueError(f"n_predict={n!r} must be an integer >= -1 (-1: until the context is full); or send "
                             f"max_tokens")
        data = {k: v for k, v in data.items() if k not in ("n_predict", "max_tokens", "max_completion_tokens")}
        if n >= 0:
            data["max_tokens"] = n
        elif cls.model_fields["max_tokens"].default is not None:  # completions' 16: no limit but the context's
            data["max_tokens"] = 1 << 30
        return data

    @field_validator("dry_base")
    @classmethod
    def _dry_base(cls, v: float | None) -> float | None:
        return None if v is not None and v < 1 else v

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, v: int | None) -> int | None:
        if v is None or v in (-1, 0xFFFFFFFF):  # llama.cpp's "random" is as left out: each choice draws its own
            return None
        if not -(1 << 63) <= v < 1 << 64:
            raise ValueError(f"seed {v} is out of range; give an integer that fits 64 bits, or -1 for a random one")
        return v % (1 << 32)  # as llama-server's uint32 cast

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"stop has {len(v)} strings but this server takes at most {MAX_STOPS}; send fewer")
        return v


# -- chat ---------------------------------------------------------------------------------------------


class ContentPart(_Req):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant turn's refusal part (OpenAI's), read as its text


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _has_content(cls, data: Any) -> Any:
        """No ``content`` key (a misspelt ``contents``) is refused, as llama-server does; ``content: null`` is an
        empty message, as there."""
        if isinstance(data, dict) and data.get("role") != "assistant" and "content" not in data:
            try:
                check_has_content(str(data.get("role")), data.keys(), None)
            except InvalidArgument as e:  # as pydantic's: the reply names where (messages.1)
                raise ValueError(str(e)) from None
        return data

    @field_validator("tool_calls")
    @classmethod
    def _shallow_arguments(cls, calls: list[ToolCall] | None) -> list[ToolCall] | None:
        """Arguments are JSON text, parsed and rendered into the prompt: bound their nesting as a field's
        (arguments that are not JSON are refused where they are parsed, with the fix)."""
        for j, c in enumerate(calls or []):
            try:
                depth = json_depth(json.loads(c.function.arguments))
            except RecursionError:
                depth = None
            except ValueError:
                continue
            if depth is None or depth > MAX_DEPTH:
                raise _too_deep(f"tool_calls[{j}].function.arguments", depth)
        return calls


class FunctionDef(_Req):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Arguments are a JSON object (OpenAI's): ``{}`` ("no arguments") the empty one, a schema without a type
        an object, not any JSON value (a forced call could run on as an array to the token limit)."""
        if not v:
            return {"type": "object", "properties": {}}
        return v if "type" in v or any(k in v for k in ("$ref", "anyOf", "oneOf", "allOf")) else {"type": "object", **v}

    @model_validator(mode="after")
    def _object_root(self) -> FunctionDef:
        """A root ``type`` other than ``"object"`` (an array, a string...) is refused, as OpenAI refuses it: the
        call's ``arguments`` are a JSON object, and no object can match such a schema."""
        t = self.parameters.get("type")
        if t is not None and t != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type \"object\", not "
                             f"{json.dumps(t)[:60]} (a call's arguments are a JSON object); make the value a "
                             "property: {\"type\": \"object\", \"properties\": {\"value\": THIS_SCHEMA}, "
                             "\"required\": [\"value\"]}")
        return self


class Tool(_Req):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Req):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(_Req):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-cpp-python's json_object + schema


class CascadeOptions(_Req):
    """Per-request cascade policy (extension; see ondevice.cascade.policy.RequestPolicy)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt policy must not pass silently
    never_defer: bool = False  # private: never leaves the device, never stored
    always_defer: bool = False
    threshold: float | None = Field(None, ge=0, le=1)
    keep: bool | None = None  # keep as a hard sample if deferred (None: the server's --cascade-keep-hard)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    cascade: CascadeOptions | None = None  # extension: with `ondevice serve --cascade URL`
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None  # OpenAI's deprecated form of tools: refused with the fix, not ignored
    function_call: Any = None
    # OpenAI's fields for its own service: no use on the device; a cascade's cloud tier gets them (cascade/serve.py)
    reasoning_effort: str | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, v: Any) -> Any:
        if v is None:  # sent as null: nothing asked
            return v
        raise ValueError("OpenAI's deprecated functions / function_call are not taken; send tools: [{\"type\": "
                         "\"function\", \"function\": {...}}] and tool_choice instead")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:  # OpenAI and llama-server answer 400 too
            raise ValueError("top_logprobs needs logprobs: true; set it, or drop top_logprobs")
        return self


# -- completions -----------------------------------------------------------------------------------------
class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    max_tokens: int = Field(16, ge=0)  # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    cascade: Any = None  # one asking for the cloud is refused (below): the cloud tier answers chat messages
    best_of: int | None = Field(None, ge=1)  # more than one: refused (below), not ignored as llama-server does

    @field_validator("best_of")
    @classmethod
    def _one_of_one(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError(f"best_of={v} is not done here (one completion per choice, none ranked); drop it, or "
                             f"ask for n={v} completions and pick one")
        return v

    @field_validator("cascade")
    @classmethod
    def _chat_only(cls, v: Any) -> Any:
        from ..cascade.serve import completion_cascade
        from ..errors import InvalidArgument

        try:  # never_defer / keep: false are served: a client marking its private requests keeps working
            completion_cascade(v)
        except InvalidArgument as e:
            raise ValueError(str(e).removeprefix("cascade: ")) from None  # the field is named once
        return v


# Ollama's /api/chat and /api/generate: their options go to llama.cpp's sampler as they are, as Ollama's do, so a
# temperature has no upper bound there (OpenAI's 2 stays on the /v1 routes); ollama.py maps what Ollama clamps
class OllamaChatRequest(ChatCompletionRequest):
    temperature: float | None = Field(None, ge=0)  # finite: _Sampling's allow_inf_nan=False


class OllamaCompletionRequest(CompletionRequest):  # /api/generate's raw prompt and suffix
    temperature: float | None = Field(None, ge=0)  # finite: _Sampling's allow_inf_nan=False


# -- embeddings, models, tokenize ------------------------------------------------------------------------
class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class TokenizeRequest(_Body):
    """llama-server's fields (``content``, ``add_special``), or vLLM's as lm-eval sends them (``prompt``,
    ``add_special_tokens``)."""

    content: str | None = None
    prompt: str | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    parse_special: bool = True
    with_pieces: bool = False

    @model_validator(mode="after")
    def _one_text(self) -> TokenizeRequest:
        if self.content is None and self.prompt is None:
            raise ValueError("give the text to tokenize as content (or prompt)")
        return self

    @property
    def text(self) -> str:
        return self.content if self.content is not None else self.prompt

    @property
    def add(self) -> bool:
        return bool(self.add_special if self.add_special is not None else self.add_special_tokens)


class DetokenizeRequest(_Body):
    tokens: list[int]
