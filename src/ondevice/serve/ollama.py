"""Ollama's native REST API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``, ``/api/embed``, ``/api/embeddings``) over the chat, completions and embeddings routes, so that
apps written for Ollama (the ``ollama`` client, LangChain's ChatOllama, Open WebUI) work unchanged.

/api/chat becomes a chat request (:func:`_common`: ``options`` the sampling fields, ``num_predict`` max_tokens,
``format`` a response_format; :func:`_messages`: tool calls with object arguments become OpenAI's); /api/generate
is one user message (after ``system``) through the chat template, or with ``raw`` the prompt as it is through the
completions route, or with ``suffix`` a fill-in-the-middle prompt in the model's FIM tokens (fim.py).
Replies are newline-delimited JSON objects (:class:`Reply`; streamed unless ``stream`` is false, Ollama's
default), the last with ``done_reason`` and durations (ns) from the route's timings. An empty prompt (or no
messages) is Ollama's "load the model" call, answered ``done_reason: "load"``: the model is always loaded, and
``keep_alive`` changes nothing. ``num_ctx`` above the slot context is served in it (as Ollama clamps to what it
holds; the log says so once); a prompt longer than it is cut to fit, as Ollama's ``truncate`` cuts it
(truncate.py). ``format`` is the JSON alone, without the fence the /v1 routes allow (structured.plan). Refused
with the fix: a model not served (404, as Ollama), ``think``, images,
``template``, ``suffix`` on a model without FIM tokens, ``context`` (an earlier reply's token history: nothing
is kept between requests, so replies carry none either), and a ``cascade`` object asking for the cloud on a prompt
the device alone answers (``raw``, ``suffix``: the cloud tier answers chat messages; on a cascade server their last
object says ``"reason": "not_applicable"``). Errors on /api/*
come in Ollama's ``{"error": "..."}`` (:class:`OllamaErrors`), a full queue as Ollama's 503. What /api/tags, /api/ps
and /api/show say of the models is ollama_models.py's.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Annotated, Any

from fastapi import Body, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..cascade.serve import NO_CLOUD, NOT_APPLICABLE_HEADERS, device_only, not_applicable_info, only_restricts
from ..errors import InvalidArgument
from . import replies as R
from . import schemas as S
from . import structured
from .fim import fim_prompt
from .http import error_response
from .ollama_models import NEVER, created_at, entries, names, show
from .responses import arguments_object, chat_chunks, over_chat, validated
from .state import UnknownModel
from .truncate import NUM_KEEP, fit_context, fit_tokens, room

_SERVE_IT = ", then serve it with `ondevice serve -m NAME`"  # where the command made a model
_MANAGING = {  # Ollama's model management routes: what ondevice does instead
    "/api/create": "`ondevice quantize` or `ondevice adapt merge` makes a model here" + _SERVE_IT,
    "/api/copy": "`ondevice quantize MODEL --type COPY --name NEW` copies a model in the store" + _SERVE_IT,
    "/api/delete": "`ondevice rm NAME` deletes a model from the store",
    "/api/push": "ondevice keeps models on this machine",
}
PATHS = ("/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version", "/api/embed",
         "/api/embeddings", "/api/pull", *_MANAGING)
API_VERSION = "0.12.11"  # the Ollama release whose request and reply fields these routes follow (logprobs: 0.12.11)
# Ollama's options -> the chat route's fields. Load-time options (num_gpu, num_thread, use_mmap, ...) and unknown
# ones are ignored, as Ollama ignores unknown ones: the server's settings fix them
_OPTIONS = {"num_predict": "max_tokens", **{k: k for k in (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "stop", "seed", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta")}}
_FIELD = {v: f"options.{k}" for k, v in _OPTIONS.items()} | {"response_format": "format"}  # chat -> ours, in errors
_SAMPLING = set(S._Sampling.model_fields)  # what a raw prompt's completions request takes from the chat request
# Ollama's own defaults (api/types.go DefaultOptions) where they differ from llama.cpp's, which the chat route
# uses: a small model loops without its repeat penalty ("1. Banana 2. Apple 3. Apple 4. Apple ...")
DEFAULTS = {"top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1, "repeat_last_n": 64}


def _as_ollama_reads(key: str, v):
    """An option's value as Ollama's sampler reads it (sample/samplers.go NewSampler), where it takes what the chat
    route refuses: a negative temperature is 0 (greedy, as llama.cpp's temp <= 0), top_p and min_p are clamped to
    [0, 1], and a repeat_penalty <= 0 is 1 (off): llama.cpp's penalties sampler divides a repeated token's positive
    logit by it, so 0 would make every repeated token certain. A temperature above OpenAI's 2 is taken as it is
    (schemas.OllamaChatRequest)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
        return v  # not a finite number (NaN, inf, 1e400): the schema names it, a 400 as on every route
    if key == "temperature":
        return max(v, 0)
    if key in ("top_p", "min_p"):
        return min(max(v, 0), 1)
    return v if key != "repeat_penalty" or v > 0 else 1.0


def _request(body: dict) -> S.OllamaChatRequest:
    """``body`` as the chat route's request, an invalid field named as Ollama's client sent it."""
    return validated(S.OllamaChatRequest, body, _FIELD)


def _served(state, body: dict) -> tuple[str, str]:
    """(the name ``body`` gives, the chat route's id of that model: ``name`` or ``name:latest``); raises
    :class:`UnknownModel` for one the server does not serve."""
    name = body.get("model") or body.get("name")  # /api/show's old clients send name
    served = names(state)
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"model is required: one of {', '.join(served)} (GET /api/tags lists them)")
    if name in served or name in served.values():
        return name, served.get(name, name)
    raise UnknownModel(f"model '{name}' not found; this server serves {', '.join(served)} (GET /api/tags lists "
                       f"them)")


@functools.lru_cache(maxsize=16)
def _num_ctx_above(asked: int, slot: int) -> None:
    """Said once per value in the server's log: Ollama too serves a num_ctx above what it holds in what it holds."""
    import logging

    logging.getLogger("ondevice.serve").warning(
        "options.num_ctx=%d is above this server's context per slot (%d tokens): served in %d; a prompt that does "
        "not fit is refused as ever (restart with a larger --ctx to hold more)", asked, slot, slot)


def _common(body: dict, state) -> dict:
    """The chat request fields of what /api/chat and /api/generate share: options, format, logprobs, stream."""
    think = body.get("think")
    if think not in (None, False):
        raise InvalidArgument(f"think={think!r}: this model has no thinking mode; leave think unset or false")
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise InvalidArgument("options must be an object, e.g. {\"temperature\": 0, \"num_predict\": 64}")
    opts = {k: int(v) if k in ("num_ctx", "num_predict") and isinstance(v, float) and v.is_integer() else v
            for k, v in opts.items()}  # 4096.0: a whole number, as Ollama converts it
    ctx = opts.get("num_ctx")
    if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1):
        raise InvalidArgument(f"options.num_ctx={ctx!r} must be a whole number of tokens")
    if ctx is not None and ctx > state.settings.ctx:
        _num_ctx_above(ctx, state.settings.ctx)
    chat = {**DEFAULTS, **{ours: _as_ollama_reads(k, opts[k]) for k, ours in _OPTIONS.items()
                           if opts.get(k) is not None}}
    n = chat.pop("max_tokens", None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < -2):
        raise InvalidArgument(f"options.num_predict={n!r} must be an integer: the most tokens to generate, or -1 "
                              f"(or -2) for no limit but the context")
    if n is not None and n >= 0:
        chat["max_tokens"] = n
    fmt = body.get("format")
    if fmt == "json":
        chat["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidArgument(f"format must be \"json\" or a JSON schema object, not {fmt!r}")
    if body.get("logprobs"):
        chat.update(logprobs=True, top_logprobs=body.get("top_logprobs") or 0)
    cascade = body.get("cascade")  # ondevice's policy object, as on the OpenAI routes (never_defer: stays here)
    if cascade is not None and state.cascade is None:
        if not only_restricts(cascade):  # never_defer / keep: false are served on the device
            raise InvalidArgument(f"cascade: {NO_CLOUD}")
    elif cascade is not None:
        chat["cascade"] = cascade
    chat["stream"] = body.get("stream") is not False  # Ollama streams unless told not to
    if chat["stream"]:
        chat["stream_options"] = {"include_usage": True}  # the last object's counts
    return chat


def _truncation(body: dict) -> int | None:
    """Ollama's ``truncate`` (on unless false): None when off, else how many tokens at the prompt's start a cut
    keeps (``options.num_keep``)."""
    if body.get("truncate", True) is False:
        return None
    keep = (body.get("options") or {}).get("num_keep", NUM_KEEP)
    keep = int(keep) if isinstance(keep, float) and keep.is_integer() else keep
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise InvalidArgument(f"options.num_keep={keep!r} must be a whole number: the tokens at the prompt's start "
                              f"that a prompt cut to fit the context keeps (-1: all it can)")
    return keep


def _call_in(c, where: str, call_id: str) -> dict:
    """An Ollama tool call (arguments an object) as OpenAI's (arguments JSON text)."""
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidArgument(f"{where} must be {{\"function\": {{\"name\": \"...\", \"arguments\": {{...}}}}}}")
    args = fn.get("arguments") or {}
    return {"id": c.get("id") or call_id, "type": "function",
            "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _messages(items) -> list[dict]:
    if not isinstance(items, list):
        raise InvalidArgument("messages must be a list of {\"role\": \"user\", \"content\": \"...\"}")
    msgs = []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgument(f"{where} must be an object: {{\"role\": \"user\", \"content\": \"...\"}}")
        if m.get("images"):
            raise InvalidArgument(f"{where}.images: the model reads text only; send the content as text")
        if not isinstance(m.get("content") or "", str):
            raise InvalidArgument(f"{where}.content must be a string")
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise InvalidArgument(f"{where}.tool_calls must be a list")
        # thinking (another model's) is not read; a tool message names its tool (tool_name), not a call id
        msg = {"role": m.get("role"), "content": m.get("content") or "", "name": m.get("tool_name"),
               "tool_call_id": m.get("tool_call_id"),
               "tool_calls": [_call_in(c, f"{where}.tool_calls[{j}]", f"call_{i}_{j}") for j, c in enumerate(calls)]}
        msgs.append({k: v for k, v in msg.items() if v or k == "content"})
    return msgs


def _logprobs(ch: dict) -> list | None:
    """A choice's logprobs as Ollama's (the chat route's entries, or the completions route's legacy lists)."""
    lp = ch.get("logprobs") or {}
    if lp.get("content"):
        return lp["content"]
    return [{"token": t, "logprob": v, "top_logprobs": [{"token": k, "logprob": x} for k, x in (top or {}).items()]}
            for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or [])
            ] or None


def _call_out(c: dict, index: int) -> dict:
    fn = c["function"]
    return {"id": c.get("id"), "function": {"index": index, "name": fn["name"],
                                            "arguments": arguments_object(fn.get("arguments"))}}


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


class Reply:
    """The objects of one reply (``key``: "message" for /api/chat, "response" for /api/generate), from the chat or
    completions route's answer. ``model``: the name the client gave; ``device``: the chat route's name of it. A reply
    a cascade's cloud tier wrote names the cloud's model instead, as the chat route's does."""

    def __init__(self, model: str, key: str, device: str | None = None):
        self.model, self.key, self.device, self.t0 = model, key, device, time.perf_counter_ns()
        self.told: dict = {}  # the last object's ``cascade`` when the route says none (a raw prompt's, on a cascade)

    def _answered_by(self, chat: dict) -> None:
        if chat.get("model") and self.device and chat["model"] != self.device:
            self.model = chat["model"]

    def obj(self, text: str = "", calls: list | None = None, logprobs: list | None = None, done: bool = False,
            **final) -> dict:
        out: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.key == "message":
            out["message"] = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        else:
            out["response"] = text
        if logprobs:
            out["logprobs"] = logprobs
        return {**out, "done": done, **final}

    def final(self, finish: str | None, usage: dict | None, timings: dict | None) -> dict:
        """The last object's fields: why it ended (a tool call too is "stop", as Ollama says), counts, durations."""
        u, t = usage or {}, timings or {}
        return {"done_reason": "length" if finish == "length" else "stop",
                "total_duration": time.perf_counter_ns() - self.t0, "load_duration": 0,
                "prompt_eval_count": u.get("prompt_tokens", 0),
                "prompt_eval_duration": int(t.get("prompt_ms", 0) * 1e6),
                "eval_count": u.get("completion_tokens", 0), "eval_duration": int(t.get("predicted_ms", 0) * 1e6)}

    def whole(self, chat: dict) -> dict:
        """The one object of a reply that is not streamed, from the chat completion ``chat``."""
        self._answered_by(chat)
        ch = chat["choices"][0]
        msg = ch["message"]
        calls = [_call_out(c, k) for k, c in enumerate(msg.get("tool_calls") or [])]
        return self.obj(msg.get("content") or "", calls, _logprobs(ch), True,
                        **self.final(ch.get("finish_reason"), chat.get("usage"), chat.get("timings")),
                        **(_cascade(chat) or self.told))

    async def relay(self, chunks):
        """The objects of the chat (or completions) stream ``chunks``; tool calls come whole, as Ollama sends them."""
        calls: dict[int, dict] = {}
        finish = usage = timings = None
        cascade: dict = {}
        async for c in chat_chunks(chunks):
            if "error" in c:
                yield _line({"error": c["error"].get("message", "")})
                return
            usage, timings, cascade = c.get("usage") or usage, c.get("timings") or timings, _cascade(c) or cascade
            self._answered_by(c)
            for ch in c.get("choices") or []:
                d = ch.get("delta") or {}
                text = d.get("content") if "delta" in ch else ch.get("text")
                for tc in d.get("tool_calls") or []:
                    call = calls.setdefault(tc.get("index", 0), {"id": tc.get("id"), "function": {"name": "",
                                                                                               "arguments": ""}})
                    fn = tc.get("function") or {}
                    call["function"]["name"] += fn.get("name") or ""
                    call["function"]["arguments"] += fn.get("arguments") or ""
                lps = _logprobs(ch)
                if text or lps:
                    yield _line(self.obj(text or "", logprobs=lps))
                finish = ch.get("finish_reason") or finish
        if calls:
            yield _line(self.obj("", [_call_out(c, k) for k, c in sorted(calls.items())]))
        yield _line(self.obj("", done=True, **self.final(finish, usage, timings), **(cascade or self.told)))


def _cascade(chat: dict) -> dict:
    """A cascade server's ``cascade`` object (which tier answered, the confidence), for the reply's last object."""
    return {"cascade": chat["cascade"]} if chat.get("cascade") else {}


class _Raw:
    """``over_chat``'s runner for a raw prompt: the completions route, its whole answer read as a chat completion."""

    def __init__(self, runner):
        self.runner = runner

    async def chat(self, req, request):
        r = await self.runner.completions(req, request)
        if not isinstance(r, R.Completion):
            return r
        c = r.choices[0]
        lps = _logprobs({"logprobs": c.logprobs.model_dump()}) if c.logprobs else None
        return R.ChatCompletion(model=r.model, usage=r.usage, timings=r.timings, choices=[R.ChatChoice(
            message=R.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
            logprobs=R.ChoiceLogprobs(content=lps) if lps else None)])


def _as_sent(e: InvalidArgument) -> InvalidArgument:
    """``e`` with a schema the grammar cannot express named as the client sent it."""
    return type(e)(str(e).replace("response_format.json_schema.schema", "format"))


async def _fit(runner, chat: dict, body: dict, route: str) -> dict:
    """The chat request ``chat`` cut to fit the context as Ollama's ``truncate`` cuts it (unless it is false):
    the oldest turns, then the text, go, not the request."""
    keep = _truncation(body)
    try:
        return chat if keep is None else await fit_context(runner, chat, _request, keep, route)
    except InvalidArgument as e:  # measuring the prompt plans its grammar
        raise _as_sent(e) from None


async def _answer(runner, req, request, reply: Reply):
    try:
        resp = await over_chat(runner, req, request, reply.whole, reply.relay)
    except InvalidArgument as e:
        raise _as_sent(e) from None
    if reply.told and isinstance(resp, dict):  # a cascade server's device-only prompt: its headers say so too
        resp = JSONResponse(resp, headers=NOT_APPLICABLE_HEADERS)
    elif reply.told and resp.status_code == 200:
        resp.headers.update(NOT_APPLICABLE_HEADERS)
    if isinstance(resp, StreamingResponse):
        resp.headers["content-type"] = "application/x-ndjson"
    return resp


async def chat(runner, body: dict, request):
    """Answer an /api/chat request through ``runner.chat`` (its limits, grammar and tool calls)."""
    name, model = _served(runner.state, body)
    reply = Reply(name, "message", model)
    if not body.get("messages"):  # Ollama's "load the model"
        return reply.obj(done=True, done_reason="load")
    req = {**_common(body, runner.state), "model": model, "messages": _messages(body["messages"])}
    if body.get("tools"):
        req["tools"] = body["tools"]
    return await _answer(runner, _request(await _fit(runner, req, body, "/api/chat")), request, reply)


_GENERATE_REFUSED = {
    "template": "the model's own chat template renders the prompt (or send raw: true and the prompt as you want it)",
    "images": "the model reads text only",
    "context": "nothing is kept between requests, so there is no token history to continue; send the conversation "
               "as messages to /api/chat, or the whole text as the prompt",
}


async def generate(runner, body: dict, request):
    """Answer an /api/generate request: through ``runner.chat`` (the chat template), or with ``raw`` through
    ``runner.completions`` (the prompt as it is)."""
    st = runner.state
    name, model = _served(st, body)
    reply = Reply(name, "response", model)
    for key, why in _GENERATE_REFUSED.items():
        if body.get(key):
            raise InvalidArgument(f"{key}: {why}; leave {key} unset")
    prompt, system = body.get("prompt") or "", body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise InvalidArgument("prompt and system must be strings")
    if not prompt:  # Ollama's "load the model"
        return reply.obj(done=True, done_reason="load")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidArgument("suffix must be a string: the text after the part to fill in")
    if body.get("raw") and system and not suffix:
        raise InvalidArgument("system is rendered by the chat template, which raw: true skips; put it in the prompt "
                              "or drop raw")
    raw = body.get("raw") or st.template is None  # no chat template: Ollama's {{ .Prompt }}, the text continued
    if raw and not body.get("raw") and system:
        prompt = f"{system}\n\n{prompt}"
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if raw or suffix:  # the cloud tier answers chat messages: a cascade object asking for it is refused
        device_only(body.get("cascade"), "a fill-in-the-middle prompt (suffix) is the model's FIM tokens" if suffix
                    else "a raw: true prompt skips the chat template" if body.get("raw") else
                    "this model has no chat template (its prompt is continued as it is)",
                    "send the prompt without raw (the chat template renders it, and it may be deferred, as on "
                    "/api/chat)" if body.get("raw") and not suffix else "send the conversation to /api/chat")
    chat = {**_common(body, st), "model": model, "messages": msgs}
    if not raw and not suffix:
        return await _answer(runner, _request(await _fit(runner, chat, body, "/api/generate")), request, reply)
    if st.cascade is not None:  # a cascade server says who answered, as for a chat request it does not apply to
        reply.told = {"cascade": not_applicable_info(model)}
    req = _request(chat)
    if suffix:  # fill in the middle, as Ollama's code-model templates render it (system and raw do not apply)
        prompt = await run_in_threadpool(fim_prompt, st, prompt, suffix)  # its tokens
    if (keep := _truncation(body)) is not None:  # its tokens cut as Ollama's runner cuts them; as sent if they fit
        tokens = prompt if isinstance(prompt, list) else await run_in_threadpool(st.tokenize, prompt)
        cut = fit_tokens(st, tokens, room(st, req.max_tokens), keep, "/api/generate")
        prompt = prompt if cut is tokens else cut
    comp = S.OllamaCompletionRequest.model_validate({
        **req.model_dump(include=_SAMPLING, exclude_none=True), "prompt": prompt,
        "max_tokens": st.settings.ctx if req.max_tokens is None else req.max_tokens,  # the job keeps it to the room
        "grammar": structured.plan(req).grammar,  # raw: the text continued, as Ollama's
        "logprobs": (req.top_logprobs or 0) if req.logprobs else None})
    return await _answer(_Raw(runner), comp, request, reply)


def _refusal(path: str, instead: str):
    """The route of an Ollama model management call: a 400 that says what to do instead."""
    async def refuse(body: Annotated[dict[str, Any], Body()]):  # Ollama's calls send a JSON object
        raise InvalidArgument(f"{path}: this server manages no models over its API; {instead}")
    return refuse


def add_routes(app, runner, embeddings) -> None:
    """Ollama's routes on ``app``: generation over ``runner``; embeddings over ``embeddings``, the /v1/embeddings
    handler (its limits and packing)."""
    state = runner.state

    @app.exception_handler(UnknownModel)
    async def _unknown(request: Request, exc: UnknownModel):
        return error_response(404, str(exc), "not_found_error", "model", "model_not_found")

    @app.post("/api/chat")
    async def ollama_chat(request: Request, body: Annotated[dict[str, Any], Body()]):
        return await chat(runner, body, request)

    @app.post("/api/generate")
    async def ollama_generate(request: Request, body: Annotated[dict[str, Any], Body()]):
        return await generate(runner, body, request)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def ollama_root():  # Ollama's heartbeat: its CLI sends HEAD / before a command (status only)
        return PlainTextResponse("ondevice is running (Ollama's API under /api, OpenAI's under /v1)")

    @app.api_route("/api/version", methods=["GET", "HEAD"])  # HEAD as Ollama answers it: a liveness probe
    async def ollama_version():
        return {"version": API_VERSION}

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def ollama_tags():
        return {"models": (await entries(state))[0]}

    @app.post("/api/pull")
    async def ollama_pull(body: Annotated[dict[str, Any], Body()]):  # "make sure it is pulled": it is, if served
        _served(state, body)
        return {"status": "success"}

    for path, instead in _MANAGING.items():
        app.add_api_route(path, _refusal(path, instead), methods=["DELETE"] if path == "/api/delete" else ["POST"])

    @app.get("/api/ps")
    async def ollama_ps():
        return {"models": [{**m, "expires_at": NEVER, "size_vram": 0, "context_length": state.settings.ctx}
                           for m in (await entries(state))[0]]}

    @app.post("/api/show")
    async def ollama_show(body: Annotated[dict[str, Any], Body()]):
        return await show(state, _served(state, body)[1])

    async def embed(body: dict, request: Request, key: str):
        """(the name to answer with, the /v1/embeddings answer) for the text(s) in ``body[key]``."""
        name, _ = _served(state, body)
        texts = [body.get(key)] if isinstance(body.get(key), str) else body.get(key)
        if not isinstance(texts, list) or not texts or not all(isinstance(x, str) for x in texts):
            raise InvalidArgument(f"{key} must be a string or a non-empty list of strings")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise InvalidArgument(f"dimensions={dims!r} must be a positive integer (or left unset: all of them)")
        if body.get("truncate") is not False and state.embedder is not None:  # Ollama's default: cut to fit
            limit = min(state.settings.embeddings_ctx, state.settings.prompt_limit)
            texts = [state.tokenize(x)[:limit] for x in texts]
        return name, await embeddings(S.EmbeddingRequest(input=texts, dimensions=dims), request)

    @app.post("/api/embed")
    async def ollama_embed(request: Request, body: Annotated[dict[str, Any], Body()]):
        t0 = time.perf_counter_ns()
        if body.get("input") in (None, "", []):  # nothing to embed: Ollama answers no vectors (embed_documents([]))
            name, vectors, n = _served(state, body)[0], [], 0
        else:
            name, out = await embed(body, request, "input")
            if not isinstance(out, R.EmbeddingResponse):  # the client went away
                return out
            vectors, n = [d.embedding for d in out.data], out.usage.prompt_tokens
        return {"model": name, "embeddings": vectors, "load_duration": 0,
                "total_duration": time.perf_counter_ns() - t0, "prompt_eval_count": n}

    @app.post("/api/embeddings")
    async def ollama_embeddings(request: Request, body: Annotated[dict[str, Any], Body()]):
        if not body.get("prompt"):  # Ollama's answer to an empty prompt
            _served(state, body)
            return {"embedding": []}
        out = (await embed(body, request, "prompt"))[1]
        return {"embedding": out.data[0].embedding} if isinstance(out, R.EmbeddingResponse) else out


# http.ErrorShape's settings for /api/*: Ollama's {"error": "..."}, and a full queue (429) as its 503 "server busy"
ERRORS = {"applies": lambda path: path.startswith("/api/"), "body": lambda status, message: {"error": message},
          "status": lambda code: 503 if code == 429 else code}


