"""One model turn that may call tools: the prompt with the tools, the grammar, and the reply read back.

Tools are shown the way the model's own chat template shows them, as llama-server ``--jinja`` and Ollama
do: a template that renders ``tools`` gets them (Qwen2.5 lists them in ``<tools>`` and asks for
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks, its trained format); a template that
does not (SmolLM2) gets their description in the system message and is asked for a bare JSON call.

Constrained (the default), the reply is decoded under a grammar built from the tools' schemas, in the
model's own call format, so it is a call whose arguments match the tool's schema (or, when a plain answer
is allowed, text that does not start like a call). Unconstrained, the reply is free text: its
``<tool_call>`` blocks, or else the first JSON value in it, are read as the call(s) — how a small model
does without a grammar, for comparison. The formats, grammar and reader live in
:mod:`ondevice.engine.toolcalls`, shared with the server; this module applies them to :class:`Tool` objects
and a loaded model (:func:`call_request` is the one door for the agent, the suite and ``ondevice eval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine import toolcalls as tc
from ..engine.records import Sampling
from ..engine.toolcalls import TEXT_RULE, Call, answer_decided, read_calls, starts_like_call
from .tools import Tool, ToolError

__all__ = ["TEXT_RULE", "Call", "Turn", "answer_decided", "bounded", "call_grammar", "call_prompt", "call_request",
           "call_turn", "check_calls", "read_calls", "schema_problem", "schema_tool", "starts_like_call",
           "system_prompt", "with_system", "wraps_calls"]


def schema_tool(spec: dict) -> Tool:
    """A tool that is only its OpenAI function object: suites score calls to it, it never runs."""
    name = spec["name"]

    def fn(**_: object) -> object:
        raise ToolError(f"{name} is a suite tool (a schema only); it does not run", "failed")

    return Tool(name, spec.get("description") or "", spec["parameters"], fn)


def wraps_calls(model) -> bool:
    """Whether ``model``'s chat template asks for calls inside ``<tool_call>`` tags (Qwen2.5, Hermes 2 Pro)."""
    return tc.wraps_calls(getattr(model, "template", None))


@dataclass
class Turn:
    """A model turn: its raw text, the calls read from it (None: a plain answer or unreadable), timings."""

    text: str
    calls: list[Call] | None
    constrained: bool
    parse_error: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)


MAX_CHARS, MAX_ITEMS = 80, 6  # the call grammar's default bound on a free string / array (bounded, cut_value)


def bounded(schema: dict, max_chars: int = MAX_CHARS, max_items: int = MAX_ITEMS) -> dict:
    """A copy of ``schema`` whose free strings and arrays have an upper bound, for the grammar only.

    Under a grammar a small model can still run away inside a value (an array that never closes, a string
    that never ends, extra keys) until ``max_tokens`` cuts the call short; with bounds every call the
    grammar allows ends. Validation still uses the tool's own schema; the agent refuses a value that reached
    the bound (:func:`cut_value`: it was cut, not finished, e.g. an email body or a guest list).
    """
    if isinstance(schema, list):
        return [bounded(x, max_chars, max_items) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (bounded(v, max_chars, max_items) if k not in ("enum", "const", "default", "examples") else v)
           for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: bounded(sub, max_chars, max_items) for name, sub in schema[k].items()}
    types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    if "object" in types and "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False  # only the declared keys: no endless extra ones
    free = not any(k in schema for k in ("enum", "const", "pattern", "format"))
    if "string" in types and free:
        out["maxLength"] = min(schema.get("maxLength", max_chars), max_chars)
    if "array" in types:
        out["maxItems"] = min(schema.get("maxItems", max_items), max_items)
    return out


def call_grammar(tools: Sequence[Tool], *, parallel: bool, allow_text: bool, wrapped: bool = False,
                 bounds: tuple[int, int] = (MAX_CHARS, MAX_ITEMS)) -> str:
    """:func:`ondevice.engine.toolcalls.call_grammar` over ``tools`` with :func:`bounded` values (``bounds``:
    characters per free string, items per array)."""
    return tc.call_grammar([(t.name, bounded(t.parameters, *bounds)) for t in tools], parallel=parallel,
                           allow_text=allow_text, wrapped=wrapped)


def schema_problem(t: Tool) -> str | None:
    """Why no call grammar can be built from ``t``'s parameters schema (an unknown ``type``, a ``$ref`` to
    nothing, an empty ``enum``...), else None: a fault of the tool, not of a model's call, so no retry mends it."""
    from ..errors import InvalidArgument

    try:
        tc.call_grammar([(t.name, bounded(t.parameters))], parallel=False, allow_text=False)
    except InvalidArgument as e:
        return str(e)
    return None


def system_prompt(tools: Sequence[Tool], *, parallel: bool, allow_text: bool, extra: str = "") -> str:
    """The system message for a template that does not render tools: their description, the call format."""
    note = tc.tools_note([t.spec() for t in tools], parallel, allow_text)
    return f"{extra.strip()}\n\n{note}" if extra.strip() else note


def call_prompt(model, messages: Sequence[dict], tools: Sequence[Tool], *, parallel: bool, allow_text: bool,
                system: str = "") -> tuple[list[dict], list[dict] | None]:
    """``(messages, tools for the template)`` that offer ``tools`` to ``model`` in its own template's way.

    A template that renders tools gets them as OpenAI tool objects and nothing else is added (``system``,
    e.g. SOPs, as a system message when given), as llama-server and Ollama send them; otherwise the tools'
    description (and, with ``allow_text``, that a plain answer is fine) goes into the system message. The
    tools come before the conversation either way, so requests offering the same tools share a prompt
    prefix whose KV the generator reuses.
    """
    if tc.template_shows_tools(getattr(model, "template", None)):
        msgs = with_system(messages, system.strip()) if system.strip() else [dict(m) for m in messages]
        return msgs, [{"type": "function", "function": t.spec()} for t in tools]
    return with_system(messages, system_prompt(tools, parallel=parallel, allow_text=allow_text, extra=system)), None


def with_system(messages: Sequence[dict], system: str) -> list[dict]:
    """``system`` as the first system message (merged into one that is already there)."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{system}"
        return msgs
    return [{"role": "system", "content": system}, *msgs]


def call_request(model, messages: Sequence[dict], tools: Sequence[Tool], *, parallel: bool, allow_text: bool,
                 constrained: bool, system: str = "", bounds: tuple[int, int] = (MAX_CHARS, MAX_ITEMS)
                 ) -> tuple[list[dict], list[dict] | None, str | None]:
    """``(messages, tools for the template, grammar or None)``: one request for a call, as every caller makes it.

    The agent's turns, the suite's items (agent_bench) and ``ondevice eval --suite function-calling`` all
    come through here, so the same item and model give the same prompt and grammar everywhere.
    """
    msgs, shown = call_prompt(model, messages, tools, parallel=parallel, allow_text=allow_text, system=system)
    grammar = (call_grammar(tools, parallel=parallel, allow_text=allow_text, wrapped=wraps_calls(model),
                            bounds=bounds) if constrained else None)
    return msgs, shown, grammar


def check_calls(calls: Sequence[Call], tools: Sequence[Tool]) -> str | None:
    """None when every call names an offered tool with arguments valid for it and none of them cut at the call
    grammar's bound, else what is wrong."""
    by_name = {t.name: t for t in tools}
    for c in calls:
        t = by_name.get(c.name)
        if t is None:
            return f"{c.name!r} is not one of the offered tools ({', '.join(by_name)})"
        try:
            t.validate(c.arguments)
        except ToolError as e:
            return str(e)
    return None


def cut_value(c: Call, bounds: tuple[int, int] = (MAX_CHARS, MAX_ITEMS)) -> str | None:
    """What in ``c``'s arguments reached the call grammar's ``bounds`` (so it was cut, not finished), else None."""
    if (where := at_bound(c.arguments, *bounds)) is None:
        return None
    return (f"{c.name}: {where} reached the call grammar's bound ({bounds[0]} characters per string, {bounds[1]} "
            f"items per list): the value was cut, not finished, so the call did not run; raise it with "
            f"--max-arg-chars / --max-arg-items")


def at_bound(value, max_chars: int, max_items: int, path: str = "the arguments") -> str | None:
    """Where in ``value`` a string or list is exactly as long as the call grammar lets it be (so it was likely cut;
    a longer one is a value the grammar did not bound: an enum, a pattern or a format's)."""
    if isinstance(value, str):
        return path if len(value) == max_chars else None
    if isinstance(value, list):
        if len(value) == max_items:
            return path
        return next((w for i, v in enumerate(value)
                     if (w := at_bound(v, max_chars, max_items, f"{path}[{i}]")) is not None), None)
    if isinstance(value, dict):
        return next((w for k, v in value.items() if (w := at_bound(
            v, max_chars, max_items, k if path == "the arguments" else f"{path}.{k}")) is not None), None)
    return None


def call_turn(model, messages: Sequence[dict], tools: Sequence[Tool], *, constrained: bool = True,
              parallel: bool = False, allow_text: bool = False, system: str = "", max_tokens: int = 256,
              bounds: tuple[int, int] = (MAX_CHARS, MAX_ITEMS)) -> Turn:
    """Ask ``model`` for a call to one of ``tools`` (or, with ``allow_text``, possibly a plain answer)."""
    msgs, shown, grammar = call_request(model, messages, tools, parallel=parallel, allow_text=allow_text,
                                        constrained=constrained, system=system, bounds=bounds)
    max_tokens = max(max_tokens, bounds[0] // 2 + 128)  # room for a whole value of the longest string allowed
    sampling = Sampling(temp=0.0, max_tokens=max_tokens, grammar=grammar)
    parts, last = [], None
    for g in model.stream(msgs, tools=shown, sampling=sampling):
        parts.append(g.text)
        last = g
    text = "".join(parts)
    calls, why = read_calls(text, lenient=not constrained)
    return Turn(text=text, calls=calls, constrained=constrained, parse_error=why,
                prompt_tokens=last.prompt_tokens if last else 0,
                generated_tokens=last.generation_tokens if last else 0, seconds=last.t if last else 0.0,
                meta={"cached_tokens": last.cached_tokens if last else 0})
