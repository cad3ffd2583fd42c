"""One model turn that may call tools: the prompt with the tools, the grammar, and the reply read back.

Tools are shown the way the model's own chat template shows them, as llama-server ``--jinja`` and Ollama
do: a template that renders ``tools`` gets them (Qwen2.5 lists them in ``<tools>`` and asks for
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks, its trained format); a template that
does not (SmolLM2) gets their description in the system message and is asked for a bare JSON call.

Constrained (the default), the reply is decoded under a grammar built from the tools' schemas, in the
model's own call format, so it is a call whose arguments match the tool's schema (or, when a plain answer
is allowed, text that does not start like a call). Unconstrained, the reply is free text: its
``<tool_call>`` blocks, or else the first JSON value in it, are read as the call(s) — how a small model
does without a grammar, for comparison.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine.grammar import TOOL_CALL_START, schema_grammar, tool_call_grammar, tool_call_schema, tools_note
from ..engine.records import Sampling
from .tools import Tool, ToolError

MAX_CALLS = 4  # calls in one parallel reply: a bound, so a run of calls cannot go on until max_tokens
NO_TOOL_NOTE = "If no tool fits the request, do not call one: answer in plain text instead."
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # Qwen2.5's / Hermes' call tags
# Under the call grammar a reply's first character decides: a call starts with "{" or "[" (JSON), "<" (a
# <tool_call> tag) or "`" (a fenced JSON block, which the unconstrained reader would read as a call too); a
# plain answer (when one is allowed) starts with none of them, nor with white space (then JSON).
CALL_FIRST_CHARS = "{[<`"
TEXT_RULE = "ondevice-text ::= [^{[<` \\t\\r\\n] .*"


def template_shows_tools(model) -> bool:
    """Whether ``model``'s chat template renders ``tools`` itself (the test Model.tokenize_prompt makes)."""
    return "tools" in (getattr(model, "template", None) or "")


def wraps_calls(model) -> bool:
    """Whether the template asks for calls inside ``<tool_call>`` tags (Qwen2.5, Hermes 2 Pro)."""
    return template_shows_tools(model) and CALL_OPEN in model.template


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


def _renamed_root(gbnf: str, name: str) -> str:
    return re.sub(r"(?m)^root ::=", f"{name} ::=", gbnf, count=1)


def call_grammar(tools: Sequence[Tool], *, parallel: bool, allow_text: bool, wrapped: bool = False) -> str:
    """The grammar of a reply that calls ``tools`` (bounded values; ``allow_text``: or a plain answer).

    A call is the JSON ``{"name", "arguments"}`` (with ``parallel``, or an array of up to MAX_CALLS), bare
    or in a fenced ```` ```json ```` block (how many models write one). ``wrapped`` (the template's own
    format): each call in a ``<tool_call>`` block, or fenced, one block per call (up to MAX_CALLS, one per
    line, when parallel).
    """
    fns = [(t.name, bounded(t.parameters)) for t in tools]
    if wrapped:
        one = _renamed_root(schema_grammar(tool_call_schema(fns, False), "tools[].function.parameters"),
                            "ondevice-json-call")
        more = f' ("\\n" ondevice-block){{0,{MAX_CALLS - 1}}}' if parallel else ""
        call = (f"{one}\nondevice-block ::= \"{CALL_OPEN}\\n\" ondevice-json-call \"\\n{CALL_CLOSE}\" | ondevice-fenced"
                f"\nondevice-tool-call ::= ondevice-block{more}")
    else:
        call = _renamed_root(tool_call_grammar(fns, parallel, "required", max_calls=MAX_CALLS), "ondevice-json-call")
        call += "\nondevice-tool-call ::= ondevice-json-call | ondevice-fenced"
    fence = 'ondevice-fenced ::= "```" "json"? "\\n" ondevice-json-call "\\n"? "```"'
    root = "root ::= ondevice-tool-call" + (" | ondevice-text\n" + TEXT_RULE if allow_text else "")
    return f"{call}\n{fence}\n{root}\n"


def system_prompt(tools: Sequence[Tool], *, parallel: bool, allow_text: bool, extra: str = "") -> str:
    """The system message for a template that does not render tools: their description, the call format."""
    parts = [extra.strip()] if extra.strip() else []
    parts.append(tools_note([t.spec() for t in tools], parallel))
    if allow_text:
        parts.append(NO_TOOL_NOTE)
    return "\n\n".join(parts)


def call_prompt(model, messages: Sequence[dict], tools: Sequence[Tool], *, parallel: bool, allow_text: bool,
                system: str = "") -> tuple[list[dict], list[dict] | None]:
    """``(messages, tools for the template)`` that offer ``tools`` to ``model`` in its own template's way.

    A template that renders tools gets them as OpenAI tool objects and nothing else is added (``system``,
    e.g. SOPs, as a system message when given), as llama-server and Ollama send them; otherwise the tools'
    description (and, with ``allow_text``, that a plain answer is fine) goes into the system message. The
    tools come before the conversation either way, so requests offering the same tools share a prompt
    prefix whose KV the generator reuses.
    """
    if template_shows_tools(model):
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


_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)


def answer_decided(text: str) -> bool:
    """Whether a reply under the call grammar is already known to be a plain answer (its first character)."""
    return bool(text) and text[0] not in CALL_FIRST_CHARS


def starts_like_call(text: str) -> bool:
    """Whether a reply begins as a call does (JSON, a fence, a ``<tool_call>`` block), not as a plain answer."""
    return text.lstrip().startswith((*TOOL_CALL_START, CALL_OPEN, "```"))


def _strict_objs(s: str) -> tuple[list, str | None]:
    """The JSON values of a reply that is only calls (bare JSON, fenced or in ``<tool_call>`` blocks)."""
    dec, objs, pos = json.JSONDecoder(), [], 0
    while pos < len(s):
        for wrap in ((CALL_OPEN, CALL_CLOSE), ("```json", "```"), ("```", "```"), ("", "")):
            if s.startswith(wrap[0], pos):
                break
        start = pos + len(wrap[0])
        body = s[start:].lstrip()
        try:
            obj, used = dec.raw_decode(body)
        except json.JSONDecodeError as e:
            return [], f"not complete JSON ({e.msg})"
        pos = start + len(s[start:]) - len(body) + used
        rest = s[pos:].lstrip()
        if wrap[1]:
            if not rest.startswith(wrap[1]):
                return [], f"a call opened with {wrap[0]!r} but not closed with {wrap[1]!r}"
            rest = rest[len(wrap[1]):].lstrip()
        objs.append(obj)
        pos = len(s) - len(rest)
    return objs, None


def read_calls(text: str, *, lenient: bool) -> tuple[list[Call] | None, str | None]:
    """Calls from a reply, or ``(None, why)``.

    Strict: the reply must be only the call(s) — JSON, bare, fenced or in ``<tool_call>`` blocks. Lenient:
    the ``<tool_call>`` blocks anywhere in the reply, else its fenced JSON blocks, else the first JSON in it.
    """
    s = text.strip()
    if lenient:
        blocks = _BLOCK.findall(s)
        fenced = [o for o in map(first_json, _FENCE.findall(s)) if o is not None]
        objs = [first_json(b) for b in blocks] if blocks else fenced or [first_json(s)]
        if any(o is None for o in objs):
            return None, "a <tool_call> block without JSON" if blocks else "no JSON in the reply"
    elif starts_like_call(s):
        objs, why = _strict_objs(s)
        if why:
            return None, why
    else:
        return None, "a plain answer (no call)"
    objs = [x for o in objs for x in (o if isinstance(o, list) else [o])]
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
    msgs, shown = call_prompt(model, messages, tools, parallel=parallel, allow_text=allow_text, system=system)
    grammar = (call_grammar(tools, parallel=parallel, allow_text=allow_text, wrapped=wraps_calls(model))
               if constrained else None)
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
