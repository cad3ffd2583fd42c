"""OpenAI's Responses API (``POST /v1/responses``) served over the chat route, as llama-server serves it.

A Responses request becomes a chat request (:func:`to_chat`: ``instructions`` a system message, ``input`` items
messages, function tools chat tools, ``text.format`` a ``response_format``, ``max_output_tokens`` ``max_tokens``);
the chat reply becomes a ``response`` object (:func:`from_chat`), and a chat stream becomes the Responses events
(:class:`Events`: ``response.created`` ... ``response.output_text.delta`` ... ``response.completed``). Nothing is
kept between requests: ``previous_response_id`` is refused with the fix (send the whole conversation in
``input``), as llama-server refuses it; so are hosted tools (web search, file search, ...) that only OpenAI runs.
Fields the chat route knows pass through (``seed``, ``top_k``, ``stop``, ``cascade``, ``draft``, ...).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from ..errors import InvalidArgument
from .chunks import SSE_PING

# converted here; every other field of the request passes to the chat route as it is
_CONVERTED = {"input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "top_logprobs", "include",
              "previous_response_id", "conversation", "background", "store", "reasoning", "truncation", "metadata",
              "prompt", "prompt_cache_key", "service_tier", "safety_identifier", "max_tool_calls", "messages"}
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_FIELD = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}  # chat -> ours


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_of(parts, where: str, kinds: tuple[str, ...]) -> str:
    """The text of a message's content: a string, or a list of text parts (``input_text``/``output_text``)."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise InvalidArgument(f"{where} must be a string or a list of content parts")
    out = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise InvalidArgument(f"{where}[{j}]: {kind} is not supported: the model reads text only; "
                                  f"send the content as input_text")
        if kind not in kinds or not isinstance(p.get("text"), str):
            raise InvalidArgument(f"{where}[{j}] must be {{\"type\": \"{kinds[0]}\", \"text\": \"...\"}}")
        out.append(p["text"])
    return "".join(out)


def _messages(body: dict) -> list[dict]:
    msgs: list[dict] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise InvalidArgument("instructions must be a string")
        msgs.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if items is None:
        raise InvalidArgument("input is required: a string, or a list of messages and function call items")
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise InvalidArgument("input must be a string or a list of items")

    def assistant() -> dict:  # calls and text of one assistant turn go in one message, as the template wants
        if not msgs or msgs[-1]["role"] != "assistant":
            msgs.append({"role": "assistant", "content": None})
        return msgs[-1]

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where} must be an object")
        kind, role = item.get("type"), item.get("role")
        if role in ("user", "system", "developer") and kind in (None, "message"):
            msgs.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content", ("input_text", "text"))})
        elif role == "assistant" and kind in (None, "message"):
            m = assistant()
            text = _text_of(item.get("content"), f"{where}.content", ("output_text", "input_text", "text"))
            m["content"] = (m["content"] or "") + text
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise InvalidArgument(f"{where}: a function_call needs call_id, name and arguments (strings)")
            m = assistant()
            m.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            out = item.get("output")
            if not isinstance(item.get("call_id"), str) or out is None:
                raise InvalidArgument(f"{where}: a function_call_output needs call_id and output")
            text = out if isinstance(out, str) else _text_of(out, f"{where}.output", ("input_text", "output_text", "text"))
            msgs.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            continue  # a reasoning model's notes from another server: not part of what this model reads
        elif kind == "item_reference":
            raise InvalidArgument(f"{where}: item_reference needs stored responses, which ondevice does not keep; "
                                  f"send the item itself")
        else:
            raise InvalidArgument(f"{where}: cannot tell what this item is ({kind or role or 'no type or role'}); "
                                  f"send a message ({{\"role\": \"user\", \"content\": \"...\"}}), a function_call "
                                  f"or a function_call_output")
    return msgs


def _tools(body: dict) -> tuple[list | None, object]:
    tools = None
    if body.get("tools") is not None:
        if not isinstance(body["tools"], list):
            raise InvalidArgument("tools must be a list of function tools")
        tools = []
        for i, t in enumerate(body["tools"]):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else None
                raise InvalidArgument(f"tools[{i}]: {kind!r} tools run on OpenAI's servers, not here; send function "
                                      f"tools ({{\"type\": \"function\", \"name\": ..., \"parameters\": ...}}) and run "
                                      f"them yourself")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            tools.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise InvalidArgument("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                                  "\"name\": ...}")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _format(body: dict) -> dict | None:
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None and not isinstance(fmt, dict):
        raise InvalidArgument("text.format must be an object: {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                              "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise InvalidArgument(f"text.format.type must be 'text', 'json_object' or 'json_schema', not {fmt.get('type')!r}")


def to_chat(body: dict) -> dict:
    """The chat completions request that answers the Responses request ``body`` (fields it does not convert pass
    through). Raises :class:`InvalidArgument` naming what cannot be served and what to send instead."""
    if body.get("previous_response_id") or body.get("conversation"):
        raise InvalidArgument("ondevice keeps no responses or conversations (previous_response_id, conversation); "
                              "send the whole conversation in input",
                              param="previous_response_id" if body.get("previous_response_id") else "conversation")
    if body.get("background"):
        raise InvalidArgument("background responses are not supported; leave background unset and wait for the "
                              "reply, or stream it", param="background")
    if body.get("prompt"):
        raise InvalidArgument("stored prompts (prompt) live on OpenAI's servers; send the text in instructions/input",
                              param="prompt")
    chat = {k: v for k, v in body.items() if k not in _CONVERTED}
    chat["messages"] = _messages(body)
    tools, choice = _tools(body)
    if tools is not None:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    if (fmt := _format(body)) is not None:
        chat["response_format"] = fmt
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    include = body.get("include") or []
    if not isinstance(include, list):
        raise InvalidArgument(f"include must be a list of strings, e.g. [\"{LOGPROBS_INCLUDE}\"]")
    if body.get("top_logprobs") is not None or LOGPROBS_INCLUDE in include:
        chat["logprobs"] = True
        chat["top_logprobs"] = body.get("top_logprobs") or 0
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    return chat


def _usage(u: dict | None) -> dict | None:
    if not u:
        return None
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _logprobs(content: list | None) -> list:
    return [{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes") or [],
             "top_logprobs": [{"token": x["token"], "logprob": x["logprob"], "bytes": x.get("bytes") or []}
                              for x in t.get("top_logprobs", [])]} for t in content or []]


def _message_item(item_id: str, text: str, logprobs: list, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def _item_status(finish: str | None) -> str:
    """An output item's status: cut by max_output_tokens, it is incomplete, as the response is (OpenAI's)."""
    return "incomplete" if finish == "length" else "completed"


def _call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


class Shell:
    """What every ``response`` object of one request repeats: the request's settings, as OpenAI echoes them."""

    def __init__(self, body: dict, model: str):
        self.id, self.created = _id("resp"), int(time.time())
        tools = [t for t in body.get("tools") or []]
        self.fields = {
            "model": model, "instructions": body.get("instructions"), "tools": tools,
            "tool_choice": body.get("tool_choice") or "auto",
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"), "text": body.get("text") or {"format": {"type": "text"}},
            "metadata": body.get("metadata") or {}, "store": False, "previous_response_id": None}

    def response(self, output: list, status: str, finish: str | None = None, usage=None, error=None, **extra) -> dict:
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        if incomplete and status == "completed":
            status = "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status != "in_progress" else None, "error": error,
                "incomplete_details": incomplete, "output": output, "usage": _usage(usage), **self.fields, **extra}


def from_chat(shell: Shell, chat: dict) -> dict:
    """The ``response`` object for a chat completion (fields the chat reply adds, e.g. ``cascade`` and
    ``timings``, are kept)."""
    choice = chat["choices"][0]
    msg = choice["message"]
    output = []
    status = _item_status(choice.get("finish_reason"))
    if msg.get("content"):
        lps = _logprobs((choice.get("logprobs") or {}).get("content"))
        output.append(_message_item(_id("msg"), msg["content"], lps, status))
    output += [_call_item(c, status) for c in msg.get("tool_calls") or []]
    extra = {k: v for k, v in chat.items() if k not in ("id", "object", "created", "model", "choices", "usage",
                                                         "system_fingerprint")}
    shell.fields["model"] = chat.get("model") or shell.fields["model"]  # who answered (a cascade's cloud tier)
    return shell.response(output, "completed", choice.get("finish_reason"), chat.get("usage"), **extra)


def _sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


class Events:
    """Turns the chat route's SSE chunks (one choice) into the Responses API's events."""

    def __init__(self, shell: Shell):
        self.shell, self.seq = shell, 0
        self.output: list[dict] = []  # items, in order
        self.text: dict | None = None  # the open message item
        self.calls: dict[int, dict] = {}  # tool call index -> its item
        self.finish = self.usage = None

    def _ev(self, type_: str, **kw) -> bytes:
        ev = {"type": type_, "sequence_number": self.seq, **kw}
        self.seq += 1
        return _sse(ev)

    def start(self) -> list[bytes]:
        r = self.shell.response([], "in_progress")
        return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]

    def _open_text(self) -> list[bytes]:
        self.text = _message_item(_id("msg"), "", [], "in_progress")
        self.output.append(self.text)
        i = len(self.output) - 1
        return [self._ev("response.output_item.added", output_index=i, item={**self.text, "content": []}),
                self._ev("response.content_part.added", item_id=self.text["id"], output_index=i, content_index=0,
                         part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def chunk(self, c: dict) -> list[bytes]:
        out: list[bytes] = []
        if c.get("usage"):
            self.usage = c["usage"]
        for ch in c.get("choices") or []:
            d = ch.get("delta") or {}
            if d.get("content"):
                if self.text is None:
                    out += self._open_text()
                part = self.text["content"][0]
                lps = _logprobs((ch.get("logprobs") or {}).get("content"))
                part["text"] += d["content"]
                part["logprobs"] += lps
                out.append(self._ev("response.output_text.delta", item_id=self.text["id"],
                                    output_index=self.output.index(self.text), content_index=0, delta=d["content"],
                                    logprobs=lps))
            for tc in d.get("tool_calls") or []:
                item = self.calls.get(tc.get("index", 0))
                fn = tc.get("function") or {}
                if item is None:
                    item = _call_item({"id": tc.get("id") or _id("call"),
                                       "function": {"name": fn.get("name", ""), "arguments": ""}}, "in_progress")
                    self.calls[tc.get("index", 0)] = item
                    self.output.append(item)
                    out.append(self._ev("response.output_item.added", output_index=len(self.output) - 1, item=item))
                if fn.get("arguments"):
                    item["arguments"] += fn["arguments"]
                    out.append(self._ev("response.function_call_arguments.delta", item_id=item["id"],
                                        output_index=self.output.index(item), delta=fn["arguments"]))
            if ch.get("finish_reason"):
                self.finish = ch["finish_reason"]
        return out

    def end(self, extra: dict) -> list[bytes]:
        out = []
        for i, item in enumerate(self.output):
            item["status"] = _item_status(self.finish)
            if item is self.text:
                part = item["content"][0]
                out += [self._ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                                 text=part["text"], logprobs=part["logprobs"]),
                        self._ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                                 part=part)]
            else:
                out.append(self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                    name=item["name"], arguments=item["arguments"]))
            out.append(self._ev("response.output_item.done", output_index=i, item=item))
        r = self.shell.response(self.output, "completed", self.finish, self.usage, **extra)
        return out + [self._ev(f"response.{r['status']}", response=r)]

    def failed(self, error: dict) -> list[bytes]:
        err = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        return [self._ev("error", **err, param=error.get("param")),
                self._ev("response.failed", response=self.shell.response(self.output, "failed", error=err))]

    async def relay(self, chunks: AsyncIterator) -> AsyncIterator[bytes]:
        """The events for the chat stream ``chunks`` (bytes of ``data: {...}`` lines)."""
        for b in self.start():
            yield b
        extra = {}
        async for c in chat_chunks(chunks, pings=True):
            if c is PING_CHUNK:  # the chat stream's keep-alive, passed on: an SSE comment every client skips
                yield SSE_PING
                continue
            if "error" in c:
                for b in self.failed(c["error"]):
                    yield b
                return
            extra.update({k: v for k, v in c.items() if k in ("timings", "cascade") and v})
            self.shell.fields["model"] = c.get("model") or self.shell.fields["model"]  # response.completed's
            for b in self.chunk(c):
                yield b
        for b in self.end(extra):
            yield b


def arguments_object(text: str | None) -> dict:
    """A call's arguments as the object Anthropic's ``input`` and Ollama's ``arguments`` are; a call that
    ``max_tokens`` cut (finish "length") has only a prefix of its JSON: the longest prefix that parses once its
    open string and brackets are closed (``{"city": "Os`` -> ``{"city": "Os"}``, as the anthropic SDK's stream
    accumulator reads the same partial JSON), else ``{}``."""
    text = (text or "").strip()
    try:
        value = json.loads(text or "{}")
        return value if isinstance(value, dict) else {}
    except ValueError:
        pass
    for cut in range(len(text), 0, -1):
        stack, in_str, esc = [], False, False
        for ch in text[:cut]:
            if in_str:
                esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                stack.append("}" if ch == "{" else "]")
            elif ch in "}]" and stack:
                stack.pop()
        if esc:
            continue  # cut inside an escape: a shorter prefix
        closing = ('"' if in_str else "") + "".join(reversed(stack))
        try:
            value = json.loads(text[:cut] + closing)
        except ValueError:
            continue
        return value if isinstance(value, dict) else {}
    return {}


PING_CHUNK: dict = {"ping": True}  # what :func:`chat_chunks` yields for the chat stream's keep-alive


async def chat_chunks(chunks: AsyncIterator, pings: bool = False) -> AsyncIterator[dict]:
    """The chunks of the chat route's stream ``chunks`` (bytes of ``data: {...}`` lines) as dicts; with ``pings``,
    its keep-alive comments as :data:`PING_CHUNK` (for a relay to send its own API's). A choice that
    ends with finish reason ``error`` (a cascade's cloud stream that failed after its first text) comes as an
    error chunk: the answer is cut off, and the Messages, Responses and Ollama streams say so as their APIs say
    a failure, not as a finished answer."""
    buf = ""
    async for piece in chunks:
        buf += piece.decode() if isinstance(piece, bytes) else piece
        *events, buf = buf.split("\n\n")
        for e in events:
            if e.startswith(":"):  # an SSE comment: the chat stream's keep-alive (chunks.SSE_PING)
                if pings:
                    yield PING_CHUNK
                continue
            data = e.removeprefix("data: ").strip()
            if not data or data == "[DONE]":
                continue
            c = json.loads(data)
            if any(ch.get("finish_reason") == "error" for ch in c.get("choices") or []):
                why = (c.get("cascade") or {}).get("error") or "the stream failed"
                c = {"error": {"message": f"the answer was cut off: {why}", "type": "server_error",
                               "code": "stream_failed"}}
            yield c


def chat_request(chat: dict, fields: dict[str, str]):
    """``chat`` validated as a chat completions request; an invalid field is named as the client sent it
    (``fields``: the chat route's name -> the client's)."""
    from . import schemas as S

    return validated(S.ChatCompletionRequest, chat, fields)


def validated(model, data: dict, fields: dict[str, str]):
    """``data`` validated as ``model`` (a request schema); an invalid field is a 400 that names it as the client
    sent it (``fields``: the schema's name -> the client's)."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": (fields.get(err["loc"][0], err["loc"][0]), *err["loc"][1:])}
                                      if err.get("loc") else err for err in e.errors()]) from None


async def over_chat(runner, req, request, reply, relay):
    """The chat route's answer to ``req`` in another API's shape: ``reply(chat completion as a dict)`` for a whole
    answer, ``relay(the chat stream's chunks)`` for a stream (headers and background tasks kept)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from . import replies as R

    result = await runner.chat(req, request)
    if isinstance(result, R.ChatCompletion):
        return reply(result.model_dump(mode="json", exclude_none=True))
    headers = {k: v for k, v in result.headers.items() if k not in ("content-length", "content-type")}
    if isinstance(result, StreamingResponse):
        return StreamingResponse(relay(result.body_iterator), media_type="text/event-stream", headers=headers,
                                 background=result.background)
    if result.status_code != 200:  # e.g. 499: the client went away
        return result
    return JSONResponse(reply(json.loads(result.body)), headers=headers, background=result.background)


async def count_input_tokens(runner, body: dict) -> dict:
    """OpenAI's ``POST /v1/responses/input_tokens`` (``client.responses.input_tokens.count``): the tokens of the
    prompt the Responses request ``body`` renders to."""
    return {"object": "response.input_tokens",
            "input_tokens": await runner.prompt_tokens(chat_request(to_chat({**body, "stream": False}), _FIELD))}


async def respond(runner, body: dict, request):
    """Answer the Responses request ``body`` through ``runner.chat`` (the chat route's own code path: its limits,
    cascade, structured output and tool calls), in the Responses API's shape."""
    req = chat_request(to_chat(body), _FIELD)
    if req.n != 1:
        raise InvalidArgument("n is not a Responses API field: a response has one answer; send one request per answer")
    shell = Shell(body, runner.state.answered_by(req.model))
    return await over_chat(runner, req, request, lambda chat: from_chat(shell, chat), Events(shell).relay)
