"""Tool calls in the model's own format: how they are offered, constrained and read back.

One place for the agent (``ondevice.agent.calls``), the function-calling eval suite and the server's
``tools``. A chat template that renders ``tools`` gets them (Qwen2.5 lists them in ``<tools>`` and asks
for ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks, its trained format), as llama-server
``--jinja`` and Ollama present them; a template that does not (SmolLM2) gets :func:`tools_note` in its
system message and is asked for a bare JSON call.

The call grammar follows the template: ``<tool_call>`` blocks where the template wraps calls, else bare
JSON (one object, or with ``parallel`` an array); a fenced ```` ```json ```` call is allowed either way
(how many models write one). With ``allow_text`` (OpenAI's ``tool_choice: auto``) a plain answer is
allowed too, one whose first character cannot start a call, so that character decides what the reply is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from .grammar import check_shape, schema_grammar, schema_rules, tool_call_schema

MAX_CALLS = 4  # calls in one parallel reply: a bound, so a run of calls cannot go on until max_tokens
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # Qwen2.5's / Hermes' call tags
NO_TOOL_NOTE = "If no tool fits the request, do not call one: answer in plain text instead."
# A call starts with "{" or "[" (JSON), "<" (a <tool_call> tag) or "`" (a fenced JSON block); a plain
# answer starts with none of them, nor with white space (then JSON may follow).
CALL_FIRST_CHARS = "{[<`"
TEXT_RULE = "ondevice-text ::= [^{[<` \\t\\r\\n] .*"


def template_shows_tools(template: str | None) -> bool:
    """Whether a chat template renders ``tools`` itself (the test ``Model.tokenize_prompt`` makes)."""
    return "tools" in (template or "")


def wraps_calls(template: str | None) -> bool:
    """Whether the template asks for calls inside ``<tool_call>`` tags (Qwen2.5, Hermes 2 Pro)."""
    return template_shows_tools(template) and CALL_OPEN in (template or "")


def tools_note(functions: Sequence[dict], parallel: bool = False, allow_text: bool = False) -> str:
    """Tool descriptions and the call format, for a system message (templates that do not render tools).

    ``functions`` are OpenAI function objects: ``{"name", "description", "parameters"}``; ``allow_text``
    adds that a plain answer is fine when no tool fits.
    """
    lines = [("You can call these tools. To call one, reply with only a JSON object "
              '{"name": <tool name>, "arguments": <arguments object>}'
              + ("; to call several at once, a JSON array of such objects." if parallel else "."))]
    for f in functions:
        lines.append(json.dumps({"name": f["name"], "description": f.get("description") or "",
                                 "parameters": f.get("parameters") or {}}))
    return "\n".join(lines) + (f"\n\n{NO_TOOL_NOTE}" if allow_text else "")


def call_grammar(functions: Sequence[tuple[str, dict]], *, parallel: bool, allow_text: bool,
                 wrapped: bool = False, answer: dict | None = None) -> str:
    """GBNF of a reply that calls one of ``functions`` (``(name, parameters schema)`` pairs).

    A call is the JSON ``{"name", "arguments"}`` (with ``parallel``, or an array of up to MAX_CALLS), bare
    or in a fenced block. ``wrapped`` (the template's own format): each call in a ``<tool_call>`` block,
    fenced or bare, one block per call (up to MAX_CALLS, one per line, with ``parallel``). ``allow_text``: or a
    plain answer that does not start like a call; ``answer`` (a JSON schema: OpenAI's ``response_format``
    beside ``tools``): or an answer in that schema instead.
    """
    if not functions:
        raise InvalidArgument("a tool-call grammar needs at least one function; offer a tool")
    for name, params in functions:
        check_shape(params, f"tool {name!r}: parameters")
    parts = {"ondevice-json-call": tool_call_schema(functions, parallel and not wrapped, MAX_CALLS)}
    if answer is not None:
        schema_grammar(answer)  # an error that names the response format, not the tools
        parts["ondevice-text"] = answer
    call = schema_rules(parts, "tools[].function.parameters")
    if wrapped:
        more = f' ("\\n" ondevice-block){{0,{MAX_CALLS - 1}}}' if parallel else ""
        # bare JSON too: Qwen2.5, after calls and their results in the history, writes its next call bare;
        # refused, it was forced to some other first character (a stray ">" went to content before the call)
        call += (f"\nondevice-block ::= \"{CALL_OPEN}\\n\" ondevice-json-call \"\\n{CALL_CLOSE}\" | ondevice-fenced"
                 f" | ondevice-json-call\nondevice-tool-call ::= ondevice-block{more}")
    else:
        call += "\nondevice-tool-call ::= ondevice-json-call | ondevice-fenced"
    fence = 'ondevice-fenced ::= "```" "json"? "\\n" ondevice-json-call "\\n"? "```"'
    text = "" if answer is not None else "\n" + TEXT_RULE
    root = "root ::= ondevice-tool-call" + (" | ondevice-text" + text if allow_text or answer is not None else "")
    return f"{call}\n{fence}\n{root}\n"


# -- reading replies ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict


def answer_decided(text: str) -> bool:
    """Whether a reply under the call grammar is already known to be a plain answer (its first character)."""
    return bool(text) and text[0] not in CALL_FIRST_CHARS


def reply(model, tokens: list[int], sampling, *, stop_at_answer: bool = False) -> tuple[str, object, bool]:
    """``(text, last Generation record or None, cut)`` of ``model``'s reply to prompt ``tokens``.

    ``stop_at_answer`` (a call grammar that allows a plain answer): a reply whose first character makes it
    a plain answer is not generated further (``cut``) — its calls (none) cannot change, and a long answer
    would cost seconds per item in an eval.
    """
    parts: list[str] = []
    last, cut = None, False
    stream = model.stream_tokens(tokens, sampling)
    for g in stream:
        parts.append(g.text)
        last = g
        if stop_at_answer and not g.finish_reason and answer_decided("".join(parts)[:1]):
            cut = True
            stream.close()
            break
    return "".join(parts), last, cut


def starts_like_call(text: str) -> bool:
    """Whether a reply begins as a call does (JSON, a fence, a ``<tool_call>`` block), not as a plain answer."""
    return text.lstrip().startswith(("{", "[", CALL_OPEN, "```"))


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)


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
