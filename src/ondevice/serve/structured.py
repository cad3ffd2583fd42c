"""Structured output: response_format and tools become a GBNF grammar that the native sampler enforces.

Tools go the way :mod:`ondevice.engine.toolcalls` (shared with the agent) says: to a chat template that
renders them (Qwen2.5), with the calls constrained in that template's format (``<tool_call>`` blocks), or
else described in a system note with bare JSON calls (SmolLM2). The reply is read back with the same
reader as the agent's and returned as OpenAI ``tool_calls``; :class:`ToolStream` holds a streamed reply
back while it may still be a call. Under ``tool_choice: auto`` a plain answer may end in calls (Qwen2.5 often
says what it is about to do, then writes the call, in a ``<tool_call>`` block, fenced or as bare JSON): the
text before them is the message's content and the calls its ``tool_calls``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass

from ..engine.grammar import fenced, json_object_grammar, schema_grammar
from ..engine.toolcalls import (
    CALL_OPEN,
    answer_decided,
    call_grammar,
    read_calls,
    template_shows_tools,
    tools_note,
    wraps_calls,
)
from ..errors import InvalidArgument
from .replies import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from .schemas import ChatCompletionRequest, NamedToolChoice, OllamaChatRequest

__all__ = ["FormatStream", "Plan", "ToolStream", "cut_reply", "json_object_grammar", "parse_tool_call", "partial_calls",
           "plan", "schema_grammar", "split_reply", "unfence"]


@dataclass(frozen=True)
class Plan:
    """What the sampler must enforce and how to read the reply back."""

    grammar: str | None = None
    tools: tuple[str, ...] = ()  # tool names when the reply may be a tool call
    tool_mode: str = "none"  # none | auto | required
    system_note: str | None = None  # tool descriptions for templates that do not render tools
    fenced: bool = False  # the reply may be the response_format's JSON in a ```json block (FormatStream reads it)
    answer_format: bool = False  # tool_choice auto beside a response_format: a reply may be JSON that is no call


def plan(req: ChatCompletionRequest, template: str | None = None) -> Plan:
    """The grammar and tool handling a chat request asks for, for a model with chat ``template`` (a 400
    when the request's parts contradict). A ``response_format`` reply may open a ```` ```json ```` block, as
    llama-server's may (:func:`ondevice.engine.grammar.fenced`); the chat route takes it off. Not on Ollama's
    routes (:class:`OllamaChatRequest`): Ollama's ``format`` grammar is the JSON alone, and there a fence taken off
    would still count in ``eval_count`` and ``num_predict`` and have ``logprobs`` that no part of ``response`` is."""
    fence = not isinstance(req, OllamaChatRequest)
    fmt = req.response_format
    choice = req.tool_choice
    tools = req.tools or []
    if choice is not None and choice != "none" and not tools:
        raise InvalidArgument("tool_choice is set but tools is empty; add tools or drop tool_choice")
    if tools and choice != "none":
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name")
            chosen = [t for t in tools if t.function.name == name]
            if not chosen:
                raise InvalidArgument(f"tool_choice names {name!r} but tools has "
                                      f"{[t.function.name for t in tools]}; name one of them")
            mode, use = "required", chosen
        else:
            mode, use = (choice or "auto"), tools
        # a named function is the one call OpenAI forces (clients read tool_calls[0]); the grammar ends after it
        parallel = req.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
        # auto: tool calls, or a plain answer whose first character cannot start a call
        # auto with a response_format: calls, or an answer in that format (required: calls only, no answer)
        answer = format_schema(fmt) if mode == "auto" else None
        grammar = call_grammar([(t.function.name, t.function.parameters) for t in use], parallel=parallel,
                               allow_text=mode == "auto", wrapped=wraps_calls(template), answer=answer)
        note = None if template_shows_tools(template) else tools_note(
            [t.function.model_dump() for t in tools], parallel, allow_text=mode == "auto")
        return Plan(grammar=grammar, tools=tuple(t.function.name for t in use), tool_mode=mode, system_note=note,
                    answer_format=answer is not None)
    schema = format_schema(fmt)
    if schema is None:
        return Plan()
    grammar = json_object_grammar() if schema == JSON_OBJECT else schema_grammar(schema, _FORMAT_FIELD[fmt.type])
    return Plan(grammar=fenced(grammar), fenced=True) if fence else Plan(grammar=grammar)


JSON_OBJECT = {"type": "object"}
_FORMAT_FIELD = {"json_schema": "response_format.json_schema.schema", "json_object": "response_format.schema"}


def format_schema(fmt) -> dict | None:
    """The JSON schema a ``response_format`` asks for: None for text, any object for ``json_object`` and for a
    ``json_schema`` without a schema or with ``{}`` (OpenAI's schema is optional)."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema is not None else fmt.schema_
    return schema or JSON_OBJECT  # json_object's own schema: llama-cpp-python's extension


# the start of one call as the grammar writes it: its name, then its arguments (the schema's key order)
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# a call's start up to its whole name (cut before its arguments)
_NAME_HEAD = re.compile(r'(?:<tool_call>\s*|```(?:json)?\s*)?\[?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_WRAPS = (CALL_OPEN, "```json", "```")  # what may open a call before its JSON


def parse_tool_call(text: str, plan_: Plan) -> list[ToolCall] | None:
    """OpenAI tool_calls when ``text`` is only calls to the plan's tools (bare JSON, ``<tool_call>`` blocks or
    fenced), else None (a plain answer, or a call cut short by max_tokens). A call that repeats an earlier one
    (same name and arguments) is dropped, as :class:`ToolStream` drops it."""
    if not plan_.tools:
        return None
    calls, _ = read_calls(text, lenient=False)
    if not calls or any(c.name not in plan_.tools for c in calls):
        return None
    calls = [c for i, c in enumerate(calls) if c not in calls[:i]]
    raw = written_arguments(text)
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(
        name=c.name, arguments=raw[i] if i < len(raw) and _same_json(raw[i], c.arguments)
        else json.dumps(c.arguments, ensure_ascii=False))) for i, c in enumerate(calls)]


def written_arguments(text: str) -> list[str]:
    """Each call's arguments as the model wrote them, white space and key order kept: what a stream sends
    (:class:`ToolStream`), so a reply's ``arguments`` are the same text streamed or not, as OpenAI's are."""
    return [c.function.arguments for c in partial_calls(text, Plan(tools=("",)))]


def _streamed(text: str, plan_: Plan) -> tuple[str, list[ToolCall], bool]:
    """(content, tool calls, whether a call was cut short) that a stream of the whole reply ``text`` sends."""
    stream = ToolStream(plan_)
    sent, deltas = stream.feed(text)
    _, held = stream.finish()
    calls: dict[int, list[str]] = {}
    for d in deltas + stream.rest():
        calls.setdefault(d.index, [d.function.name or "", ""])[1] += d.function.arguments or ""
    return (sent or "") + held, [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                                          function=FunctionCall(name=name, arguments=args))
                                 for name, args in (calls[i] for i in sorted(calls))], stream.cut


def partial_calls(text: str, plan_: Plan) -> list[ToolCall]:
    """The calls of a reply cut short (max_tokens, a stop string) as far as they were written: each one whose
    name is complete, with its arguments' text so far (what a stream of it sent, as OpenAI's cut calls)."""
    return _streamed(text, Plan(tools=plan_.tools, tool_mode="required"))[1]


def cut_reply(text: str, plan_: Plan) -> tuple[str | None, list[ToolCall] | None, bool]:
    """``(content, tool_calls, cut)`` of a reply with tools that :func:`split_reply` does not read as calls, as
    a stream of it sends them: once the reply started a call (under ``auto`` too: the grammar decided), the
    calls so far, never their JSON as content (``cut``: a call was cut short); a plain answer stays ``text``."""
    content, calls, cut = _streamed(text, plan_)
    if not calls and content == text:
        return text, None, False
    return content or None, calls or None, cut


def _json_or(raw: str):
    """The JSON value of ``raw``, or ``raw`` itself when it is not JSON."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _same_json(raw: str, value) -> bool:
    try:
        return json.loads(raw) == value
    except json.JSONDecodeError:
        return False


def split_reply(text: str, plan_: Plan) -> tuple[str | None, list[ToolCall] | None]:
    """``(content, tool_calls)`` of a finished reply: only calls; under ``auto``, text that ends in calls to
    the plan's tools (the text is the content); else the whole text as content."""
    calls = parse_tool_call(text, plan_)
    if calls:
        return None, calls
    if plan_.tool_mode == "auto":
        for m in _CALL_HEAD.finditer(text):  # each place a call may start, with its wrapper if any
            before = text[:m.start()].rstrip()
            i = next((len(before) - len(w) for w in _WRAPS if before.endswith(w)), m.start())
            if i > 0 and (calls := parse_tool_call(text[i:], plan_)):
                return text[:i].strip() or None, calls
    return text, None


def _head_ahead(s: str) -> bool | None:
    """Whether ``s`` (from a possible opener on) is a whole call head: True; may still become one: False
    (hold it back); cannot: None (send it as text)."""
    for w in _WRAPS:
        if w.startswith(s):
            return False
        if s.startswith(w):
            s = s[len(w):]
            break
    i = 0
    for piece in ("{", '"name"', ":", '"', None, ",", '"arguments"', ":"):
        while i < len(s) and s[i].isspace():
            i += 1
        if piece is None:  # the name: to its closing quote
            while i < len(s) and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
            if i >= len(s):
                return False
            i += 1
            continue
        rest = s[i:i + len(piece)]
        if not piece.startswith(rest):
            return None
        if len(rest) < len(piece):
            return False
        i += len(piece)
    return True




@dataclass
class ToolStream:
    """A streamed reply that may be tool calls, sent as OpenAI streams them.

    While the reply may be calls it is held back as text (``auto``: until its first character shows a plain
    answer, which the grammar makes decisive); the first call goes out as it is generated: a first delta with
    its index, id, type, name and empty arguments once the name is complete, then its arguments' JSON text
    in pieces as the tokens arrive. A later call goes out (the same two deltas) once its arguments are
    complete, unless it repeats an earlier call of the reply (same name and arguments): then it is dropped.
    """

    plan: Plan
    text: str = ""  # the reply so far, while held
    holding: bool = False
    watch: str | None = None  # auto, a plain answer so far: its unsent tail that may begin a <tool_call> tag
    pos: int = 0  # where the next call may start in ``text``
    args: int | None = None  # where the current call's arguments start (None: between calls)
    sent: int = 0  # how far the current arguments are sent
    depth: int = 0
    in_str: bool = False
    escaped: bool = False
    n_calls: int = 0  # call heads read
    name: str = ""  # the current call's
    cut: bool = False  # at the end: the reply was a call cut short (max_tokens, a stop string)
    begin: int = 0  # where the current call's arguments start (their opening brace)
    done: list = dataclasses.field(default_factory=list)  # (name, arguments, their text) of each call sent

    def __post_init__(self) -> None:
        self.holding = self.plan.tool_mode in ("required", "auto") and bool(self.plan.tools)

    def feed(self, piece: str) -> tuple[str | None, list[ToolCallDelta]]:
        """``(text to send as content now or None, tool-call deltas to send)`` after one token's text."""
        if self.watch is not None:
            return self._watch(piece)
        if not self.holding:
            return piece, []
        self.text += piece
        if not self.n_calls and self.plan.tool_mode == "auto" and answer_decided(self.text):
            # a plain answer after all: send what was held, then stream it, watching for calls after it
            self.holding, self.watch, held, self.text = False, "", self.text, ""
            return self._watch(held)
        return None, self._calls()

    def _watch(self, piece: str) -> tuple[str, list[ToolCallDelta]]:
        """A plain answer streams on, except a tail that may begin a call; from a whole call head on, the
        reply is held and read as calls (:meth:`finish` says whether they were)."""
        buf = self.watch + piece
        for i, ch in enumerate(buf):
            if ch in "<`{" and (whole := _head_ahead(buf[i:])) is not None:
                if whole:  # the white space before a call is not content (as split_reply strips it)
                    self.watch, self.holding, self.text, self.pos = None, True, buf[i:], 0
                    return buf[:i].rstrip(), self._calls()
                break
        else:
            i = len(buf)
        j = len(buf[:i].rstrip())  # trailing white space waits too: a call may follow it
        self.watch = buf[j:]
        return buf[:j], []

    def _calls(self) -> list[ToolCallDelta]:
        out = []
        while True:
            if self.args is None:
                m = _CALL_HEAD.search(self.text, self.pos)
                if not m:
                    return out
                self.name = json.loads(f'"{m.group(1)}"')
                self.n_calls += 1
                self.args = self.sent = self.pos = m.end()
                if self.n_calls == 1:  # the first call goes out as it is generated
                    out.append(self._head())
            end = self._scan()  # the arguments' end (one past their closing brace), or None: not yet
            upto = len(self.text) if end is None else end
            if self.n_calls == 1 and upto > self.sent:
                out.append(ToolCallDelta(index=0, function=FunctionCallDelta(arguments=self.text[self.sent:upto])))
                self.sent = upto
            if end is None:
                return out
            out += self._ended(end)
            self.args, self.pos = None, end

    def _head(self) -> ToolCallDelta:
        return ToolCallDelta(index=len(self.done), id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                             function=FunctionCallDelta(name=self.name, arguments=""))

    def _ended(self, end: int) -> list[ToolCallDelta]:
        """A call's arguments are complete: the first call's are out; a later one goes out whole unless it
        repeats an earlier call (a small model's repetition loop is not another call to run)."""
        raw = self.text[self.begin:end]
        value = _json_or(raw)
        if self.n_calls > 1 and any(n == self.name and v == value for n, v, _ in self.done):
            return []
        out = [] if self.n_calls == 1 else self._release(raw)
        self.done.append((self.name, value, raw))
        return out

    def _release(self, raw: str) -> list[ToolCallDelta]:
        head = self._head()
        return [head, ToolCallDelta(index=head.index, function=FunctionCallDelta(arguments=raw))] if raw else [head]

    def rest(self) -> list[ToolCallDelta]:
        """After :meth:`finish`: a later call cut short, held back while it might repeat an earlier one, as far
        as it was written (nothing when it is the start of a call already sent); a first call cut before its
        arguments began, by its name once that is whole, with empty arguments (the call so far)."""
        if not self.n_calls and self.cut and (m := _NAME_HEAD.match(self.text.lstrip())):
            self.name = json.loads(f'"{m.group(1)}"')
            return [self._head()]
        if self.args is None or self.n_calls < 2 or not self.holding:
            return []
        raw = self.text[self.begin:] if self.depth else ""
        if any(n == self.name and r.startswith(raw) for n, _, r in self.done):
            return []
        return self._release(raw)

    def _scan(self) -> int | None:
        """Walk the arguments' JSON from where the last walk stopped; the index past its end when complete."""
        for i in range(self.pos, len(self.text)):
            ch = self.text[i]
            if self.in_str:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_str = False
            elif self.depth == 0 and ch.isspace():  # before the opening brace: not part of the arguments
                self.sent = max(self.sent, i + 1)
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                if not self.depth:
                    self.begin = i
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i + 1
                    return i + 1
        self.pos = len(self.text)
        return None

    def finish(self) -> tuple[bool, str]:
        """At the end: ``(the reply was tool calls, held text to send as content)``.

        A reply whose calls were streamed but that does not read back as calls (cut short by max_tokens)
        sends no content: its deltas are out, as OpenAI's are when a call is cut.
        """
        if self.watch is not None:
            return False, self.watch
        if not self.holding:
            return False, ""
        if self.n_calls:
            whole = parse_tool_call(self.text, self.plan) is not None
            self.cut = not whole
            return whole, ""
        if self.plan.tool_mode != "required" and (self.plan.answer_format  # JSON that may be the format's answer
                                                  or _head_ahead(self.text.lstrip()) is None):  # no call's start
            return False, self.text
        self.cut = bool(self.text)  # the start of a call (the grammar decided at its first character): not text
        return False, ""


_FENCE_OPEN = re.compile(r"```(?:json)?\n")
_FENCE_TAIL = re.compile(r"\n?`{0,3}\Z")  # what may be (the start of) the closing fence


@dataclass
class FormatStream:
    """A ``response_format`` reply as content: the JSON value, without the ```` ```json ```` block the grammar
    lets the model put it in (:attr:`Plan.fenced`), as llama-server's content is. Fed token texts, it sends
    what is surely the value's and holds back what may be the fence (its opening, a closing newline and
    backticks), so a streamed reply and a whole one read the same (:func:`unfence`)."""

    held: str = ""
    state: str = "start"  # start (nothing read yet) | fenced | plain (no fence: the text as it comes)

    def feed(self, piece: str) -> str:
        if self.state == "plain":
            return piece
        self.held += piece
        if self.state == "start":
            if not self.held:  # a token whose text is not whole yet (part of a character)
                return ""
            if not self.held.startswith("`"):  # the grammar opens the fence with its first character or never
                self.state, out, self.held = "plain", self.held, ""
                return out
            m = _FENCE_OPEN.match(self.held)
            if m is None:
                return ""
            self.state, self.held = "fenced", self.held[m.end():]
        cut = _FENCE_TAIL.search(self.held).start()
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def finish(self) -> str:
        """What is left at the end: nothing but (part of) the fence, or an opening cut short, which is not
        the value's."""
        self.held = ""
        return ""


def unfence(text: str) -> str:
    """A whole ``response_format`` reply's content (see :class:`FormatStream`)."""
    s = FormatStream()
    return s.feed(text) + s.finish()
