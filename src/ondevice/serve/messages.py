"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) served over the chat route,
as llama-server serves it.

A Messages request becomes a chat request (:func:`to_chat`: ``system`` a system message, ``tool_use`` blocks an
assistant's tool calls, ``tool_result`` blocks tool messages, ``tools`` function tools, ``tool_choice`` any/tool
``required``/a named function, ``stop_sequences`` ``stop``); the chat reply becomes a ``message`` (:func:`from_chat`)
and a chat stream becomes the Messages events (:class:`Events`: ``message_start``, ``content_block_start``/
``_delta``/``_stop`` per block, ``message_delta``, ``message_stop``). What only Anthropic's servers do is refused
with the fix: images and documents (the model reads text), server tools (web search, code execution, ...), MCP
servers, containers, extended ``thinking``. Fields the chat route knows pass through (``seed``, ``cascade``, ...).
Errors on these routes come in Anthropic's shape (:data:`ERRORS`).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from ..errors import InvalidArgument
from .responses import PING_CHUNK, arguments_object, chat_chunks, chat_request, over_chat

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
# converted (or dropped) here; every other field of the request passes to the chat route as it is
_CONVERTED = {"messages", "system", "tools", "tool_choice", "stop_sequences", "metadata", "thinking", "service_tier",
              "container", "mcp_servers", "stop", "context_management", "n", "output_config", "output_format",
              "cache_control", "response_format"}
_FIELD = {"stop": "stop_sequences"}  # chat -> ours, in validation errors
_SERVER_SIDE = {"container": "containers", "mcp_servers": "MCP servers"}
# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def error_body(status: int, message: str) -> dict:
    """Anthropic's error object for an HTTP ``status``."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                                                  else "api_error"), "message": message}}


def model_info(card: dict) -> dict:
    """A /v1/models entry (OpenAI's fields) with Anthropic's ModelInfo fields too (``type``, ``display_name``,
    ``created_at`` in RFC 3339), which the Anthropic SDK's models.list / models.retrieve read; others ignore them."""
    at = datetime.fromtimestamp(card["created"], UTC).isoformat().replace("+00:00", "Z")
    return card | {"type": "model", "display_name": card["id"], "created_at": at}


def model_page(listing: dict) -> dict:
    """The /v1/models listing (OpenAI's) as Anthropic's page too: each entry :func:`model_info`'s, and the page
    fields (one page holds every model)."""
    data = [model_info(c) for c in listing["data"]]
    return listing | {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None}


def _text(content, where: str) -> str:
    """The text of ``content``: a string, or a list of text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(f"{where} must be a string or a list of text blocks")
    out = []
    for j, b in enumerate(content):
        _check_block(b, f"{where}[{j}]")
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise InvalidArgument(f"{where}[{j}] must be {{\"type\": \"text\", \"text\": \"...\"}}")
        out.append(b["text"])
    return "".join(out)


def _check_block(b, where: str) -> None:
    kind = b.get("type") if isinstance(b, dict) else None
    if kind in ("image", "document"):
        raise InvalidArgument(f"{where}: {kind} blocks are not supported: the model reads text only; send the "
                              f"content as text blocks")
    if kind in ("server_tool_use", "web_search_tool_result", "code_execution_tool_result", "mcp_tool_use",
                "mcp_tool_result", "container_upload", "search_result"):
        raise InvalidArgument(f"{where}: {kind} blocks come from tools that run on Anthropic's servers, not here; "
                              f"send text, tool_use and tool_result blocks")


def _messages(body: dict) -> list[dict]:
    msgs: list[dict] = []
    system = body.get("system")
    if system is not None:
        msgs.append({"role": "system", "content": _text(system, "system")})
    items = body.get("messages")
    if not isinstance(items, list) or not items:
        raise InvalidArgument("messages is required: a list of {\"role\": \"user\" or \"assistant\", \"content\": ...}")
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise InvalidArgument(f"{where}.role must be 'user' or 'assistant' (the system prompt goes in system), "
                                  f"not {role!r}")
        content = m.get("content")
        if isinstance(content, str):
            msgs.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidArgument(f"{where}.content must be a string or a list of content blocks")
        text, calls = [], []
        for j, b in enumerate(content):
            at = f"{where}.content[{j}]"
            _check_block(b, at)
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind in ("thinking", "redacted_thinking"):
                continue  # another model's reasoning: not part of what this model reads
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) \
                        or not isinstance(b.get("input", {}), dict):
                    raise InvalidArgument(f"{at}: a tool_use block needs id and name (strings) and input (an object)")
                calls.append({"id": b["id"], "type": "function", "function": {
                    "name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise InvalidArgument(f"{at}: a tool_result block needs tool_use_id (a string)")
                out = _text(b.get("content", ""), f"{at}.content")
                msgs.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                             "content": f"Error: {out}" if b.get("is_error") else out})
            else:
                raise InvalidArgument(f"{at}: a {role} message holds text{', tool_use' if role == 'assistant' else ''}"
                                      f"{', tool_result' if role == 'user' else ''} blocks, not {kind or 'this'}")
        if calls:
            msgs.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
        elif text or not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            msgs.append({"role": role, "content": "".join(text)})
    return msgs


def _tools(body: dict) -> tuple[list | None, object]:
    tools = None
    if body.get("tools") is not None:
        if not isinstance(body["tools"], list):
            raise InvalidArgument("tools must be a list of {\"name\": ..., \"description\": ..., "
                                  "\"input_schema\": {...}}")
        tools = []
        for i, t in enumerate(body["tools"]):
            if not isinstance(t, dict):
                raise InvalidArgument(f"tools[{i}] must be an object: {{\"name\": ..., \"input_schema\": {{...}}}}")
            kind = t.get("type") or "custom"
            if kind != "custom":
                raise InvalidArgument(f"tools[{i}]: {kind!r} is a server tool that runs on Anthropic's servers, not "
                                      f"here; send custom tools ({{\"name\": ..., \"input_schema\": {{...}}}}) and run "
                                      f"them yourself")
            if not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
                raise InvalidArgument(f"tools[{i}] needs name (a string) and input_schema (a JSON schema object)")
            fn = {"name": t["name"], "parameters": t["input_schema"]}
            if t.get("description") is not None:
                fn["description"] = t["description"]
            tools.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if choice is None:
        return tools, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return tools, kind
    if kind == "any":
        return tools, "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return tools, {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidArgument("tool_choice must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} or "
                          "{\"type\": \"tool\", \"name\": ...}")


def to_chat(body: dict, counting: bool = False) -> dict:
    """The chat completions request that answers the Messages request ``body`` (fields it does not convert pass
    through; ``counting``: for count_tokens, where max_tokens is not needed). Raises :class:`InvalidArgument`
    naming what cannot be served and what to send instead."""
    if not counting and body.get("max_tokens") is None:
        raise InvalidArgument("max_tokens is required: the most tokens the reply may have, e.g. \"max_tokens\": 1024")
    thinking = body.get("thinking")  # adaptive: the model decides, and this one never thinks
    if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled", "adaptive"):
        raise InvalidArgument("thinking: the model has no extended thinking; leave thinking unset or send "
                              "{\"type\": \"disabled\"}")
    for key, what in _SERVER_SIDE.items():
        if body.get(key):
            raise InvalidArgument(f"{key}: {what} run on Anthropic's servers, not here; leave {key} unset")
    chat = {k: v for k, v in body.items() if k not in _CONVERTED}
    chat["messages"] = _messages(body)
    tools, choice = _tools(body)
    if tools is not None:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
        if isinstance(body["tool_choice"], dict) and body["tool_choice"].get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    config = body.get("output_config") or {}
    if not isinstance(config, dict):
        raise InvalidArgument("output_config must be an object, e.g. {\"format\": {\"type\": \"json_schema\", ...}}")
    fmt = config.get("format") or body.get("output_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise InvalidArgument("output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidArgument("stop_sequences must be a list of strings")
        chat["stop"] = stops
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    return chat


class Shell:
    """What every ``message`` of one request repeats, and how a chat finish reads as Anthropic's stop_reason."""

    def __init__(self, body: dict, model: str):
        self.id, self.model = _id("msg"), model
        self.stops = body.get("stop_sequences") or []

    def stop(self, finish: str | None, stop_string: str | None) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence) for the chat route's finish reason and the stop string that ended it."""
        if finish == "tool_calls":
            return "tool_use", None
        if finish == "length":
            return "max_tokens", None
        if stop_string is not None and stop_string in self.stops:  # not a stop the template's turn adds
            return "stop_sequence", stop_string
        return ("end_turn", None) if finish else (None, None)

    def message(self, content: list, finish=None, stop_string=None, usage=None, **extra) -> dict:
        reason, seq = self.stop(finish, stop_string)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": seq, "usage": _usage(usage), **extra}


def _usage(u: dict | None) -> dict:
    u = u or {}
    return {"input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0)}


def _tool_use(call_id: str, name: str, args: str | None) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call_id.removeprefix("call_"), "name": name,
            "input": arguments_object(args)}


def from_chat(shell: Shell, chat: dict) -> dict:
    """The ``message`` for a chat completion (fields the chat reply adds, e.g. ``timings`` and ``cascade``, are
    kept)."""
    choice = chat["choices"][0]
    msg = choice["message"]
    content = [{"type": "text", "text": msg["content"]}] if msg.get("content") else []
    content += [_tool_use(c["id"], c["function"]["name"], c["function"]["arguments"])
                for c in msg.get("tool_calls") or []]
    extra = {k: v for k, v in chat.items() if k in ("timings", "cascade")}
    shell.model = chat.get("model") or shell.model  # who answered (a cascade's cloud tier)
    return shell.message(content, choice.get("finish_reason"), choice.get("stop_reason"), chat.get("usage"), **extra)


def _sse(type_: str, **data) -> bytes:
    return f"event: {type_}\ndata: {json.dumps({'type': type_, **data})}\n\n".encode()


class Events:
    """Turns the chat route's SSE chunks (one choice) into the Messages API's events."""

    def __init__(self, shell: Shell, input_tokens: int = 0):
        self.shell, self.input_tokens = shell, input_tokens  # message_start's usage, as Anthropic's has it
        self.n = 0  # content blocks started
        self.open: str | None = None  # the kind of the open block (the last one)
        self.calls: dict[int, int] = {}  # tool call index -> its block's index
        self.finish = self.stop_string = self.usage = None
        self.cascade = None  # a cascade server's ``cascade`` object (its last chunk's): on message_delta

    def _open(self, block: dict) -> list[bytes]:
        out = self._close()
        self.open, self.n = block["type"], self.n + 1
        return out + [_sse("content_block_start", index=self.n - 1, content_block=block)]

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [_sse("content_block_stop", index=self.n - 1)]

    def chunk(self, c: dict) -> list[bytes]:
        out: list[bytes] = []
        if c.get("usage"):
            self.usage = c["usage"]
        self.cascade = c.get("cascade") or self.cascade
        for ch in c.get("choices") or []:
            d = ch.get("delta") or {}
            if d.get("content"):
                if self.open != "text":
                    out += self._open({"type": "text", "text": ""})
                out.append(_sse("content_block_delta", index=self.n - 1,
                                delta={"type": "text_delta", "text": d["content"]}))
            for tc in d.get("tool_calls") or []:
                i, fn = tc.get("index", 0), tc.get("function") or {}
                if i not in self.calls:
                    block = _tool_use(tc.get("id") or _id("call"), fn.get("name", ""), None)
                    out += self._open(block)
                    self.open = f"tool_use {i}"  # a second call opens a block of its own
                    self.calls[i] = self.n - 1
                if fn.get("arguments"):
                    out.append(_sse("content_block_delta", index=self.calls[i],
                                    delta={"type": "input_json_delta", "partial_json": fn["arguments"]}))
            if ch.get("finish_reason"):
                self.finish, self.stop_string = ch["finish_reason"], ch.get("stop_reason")
        return out

    def end(self) -> list[bytes]:
        reason, seq = self.shell.stop(self.finish, self.stop_string)
        told = {"cascade": self.cascade} if self.cascade else {}  # who answered, as a whole reply says
        return self._close() + [_sse("message_delta", delta={"stop_reason": reason, "stop_sequence": seq},
                                     usage=_usage(self.usage), **told),
                                _sse("message_stop")]

    def _start(self) -> bytes:
        return _sse("message_start", message=self.shell.message([], usage={"prompt_tokens": self.input_tokens}))

    async def relay(self, chunks) -> object:
        """The events for the chat stream ``chunks`` (bytes of ``data: {...}`` lines)."""
        started = False
        async for c in chat_chunks(chunks, pings=True):
            if c is PING_CHUNK:  # the keep-alive, as Anthropic's API sends it (its SDK skips `ping` events)
                yield _sse("ping")
                continue
            if not started:  # after the first chunk: it names who answers (a cascade's cloud tier)
                self.shell.model = c.get("model") or self.shell.model
                yield self._start()
                started = True
            if "error" in c:
                status = {"server_error": 500, "rate_limit_error": 429, "timeout_error": 504}.get(
                    c["error"].get("type"), 400)
                yield _sse("error", error=error_body(status, c["error"].get("message", ""))["error"])
                return
            for b in self.chunk(c):
                yield b
        if not started:
            yield self._start()
        for b in self.end():
            yield b


async def respond(runner, body: dict, request):
    """Answer the Messages request ``body`` through ``runner.chat`` (the chat route's own code path: its limits,
    cascade, grammar and tool calls), in the Messages API's shape."""
    req = chat_request(to_chat(body), _FIELD)
    shell = Shell(body, runner.state.answered_by(req.model))
    events = Events(shell, await runner.prompt_tokens(req) if req.stream else 0)  # a client reads it at once
    return await over_chat(runner, req, request, lambda chat: from_chat(shell, chat), events.relay)


async def count_tokens(runner, body: dict) -> dict:
    """``{"input_tokens": N}``: the prompt that ``body`` renders to, as the chat route renders it."""
    return {"input_tokens": await runner.prompt_tokens(chat_request(to_chat(body, counting=True), _FIELD))}


# http.ErrorShape's settings for these routes: every error in Anthropic's shape, with its status
# its routes, and any other under /v1/messages/ (batches, ...: a 404 in Anthropic's shape, as its SDK reads it)
ERRORS = {"applies": lambda path: path in PATHS or path.startswith("/v1/messages/"), "body": error_body}
