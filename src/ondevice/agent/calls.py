"""One model turn that may call tools: the prompt with the tools, the grammar, and the reply read back.

Constrained (the default), the reply is decoded under :func:`ondevice.engine.grammar.tool_call_grammar`,
so it is a JSON call whose arguments match the tool's schema (or, when a plain answer is allowed, text
that does not start like JSON). Unconstrained, the reply is free text and the first JSON value in it is
read as the call(s) — how a small model does without a grammar, for comparison.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine.grammar import TOOL_CALL_START, tool_call_grammar, tools_note
from ..engine.records import Sampling
from .tools import Tool, ToolError

MAX_CALLS = 4  # calls in one parallel reply: a bound, so a run of calls cannot go on until max_tokens
NO_TOOL_NOTE = "If no tool fits the request, do not call one: answer in plain text instead."


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict


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


def bounded(schema: dict, max_chars: int = 80, max_items: int = 6) -> dict:
    """A copy of ``schema`` whose free strings and arrays have an upper bound, for the grammar only.

    Under a grammar a small model can still run away inside a value (an array that never closes, a string
    that never ends, extra keys) until ``max_tokens`` cuts the call short; with bounds every call the
    grammar allows ends. Validation still uses the tool's own schema.
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


def call_grammar(tools: Sequence[Tool], *, parallel: bool, allow_text: bool) -> str:
    """The grammar of a reply that calls ``tools`` (bounded values; ``allow_text``: or a plain answer)."""
    return tool_call_grammar([(t.name, bounded(t.parameters)) for t in tools], parallel,
                             "auto" if allow_text else "required", max_calls=MAX_CALLS)


def system_prompt(tools: Sequence[Tool], *, parallel: bool, allow_text: bool, extra: str = "") -> str:
    parts = [extra.strip()] if extra.strip() else []
    parts.append(tools_note([t.spec() for t in tools], parallel))
    if allow_text:
        parts.append(NO_TOOL_NOTE)
    return "\n\n".join(parts)


def with_system(messages: Sequence[dict], system: str) -> list[dict]:
    """``system`` as the first system message (merged into one that is already there)."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{system}"
        return msgs
    return [{"role": "system", "content": system}, *msgs]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def first_json(text: str) -> object | None:
    """The first JSON object or array in ``text`` (inside a code fence or tags too), or None."""
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    dec = json.JSONDecoder()
    for c in candidates:
        for i, ch in enumerate(c):
            if ch in "{[":
                try:
                    return dec.raw_decode(c[i:])[0]
                except json.JSONDecodeError:
                    continue
    return None


def read_calls(text: str, *, lenient: bool) -> tuple[list[Call] | None, str | None]:
    """Calls from a reply, or ``(None, why)``. Strict: the reply must be the JSON; lenient: the first JSON in it."""
    s = text.strip()
    if lenient:
        obj = first_json(s)
        if obj is None:
            return None, "no JSON in the reply"
    else:
        if not s.startswith(TOOL_CALL_START):
            return None, "a plain answer (no call)"
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            return None, f"not complete JSON ({e.msg})"
    objs = obj if isinstance(obj, list) else [obj]
    calls = []
    for o in objs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            return None, "JSON that is not {\"name\": ..., \"arguments\": {...}}"
        args = o.get("arguments", o.get("parameters", {}))
        if isinstance(args, str):  # OpenAI's wire form: arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None, "arguments are a string that is not JSON"
        calls.append(Call(o["name"], args if isinstance(args, dict) else {"_": args}))
    return (calls or None), (None if calls else "an empty list of calls")


def check_calls(calls: Sequence[Call], tools: Sequence[Tool]) -> str | None:
    """None when every call names an offered tool with arguments valid for it, else what is wrong."""
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


def call_turn(model, messages: Sequence[dict], tools: Sequence[Tool], *, constrained: bool = True,
              parallel: bool = False, allow_text: bool = False, system: str = "", max_tokens: int = 256) -> Turn:
    """Ask ``model`` for a call to one of ``tools`` (or, with ``allow_text``, possibly a plain answer)."""
    msgs = with_system(messages, system_prompt(tools, parallel=parallel, allow_text=allow_text, extra=system))
    grammar = call_grammar(tools, parallel=parallel, allow_text=allow_text) if constrained else None
    sampling = Sampling(temp=0.0, max_tokens=max_tokens, grammar=grammar)
    parts, last = [], None
    for g in model.stream(msgs, sampling=sampling):
        parts.append(g.text)
        last = g
    text = "".join(parts)
    calls, why = read_calls(text, lenient=not constrained)
    return Turn(text=text, calls=calls, constrained=constrained, parse_error=why,
                prompt_tokens=last.prompt_tokens if last else 0,
                generated_tokens=last.generation_tokens if last else 0, seconds=last.t if last else 0.0)
