"""Structured output: response_format and tools become a GBNF grammar that the native sampler enforces.

Tools go the way :mod:`ondevice.engine.toolcalls` (shared with the agent) says: to a chat template that
renders them (Qwen2.5), with the calls constrained in that template's format (``<tool_call>`` blocks), or
else described in a system note with bare JSON calls (SmolLM2). The reply is read back with the same
reader as the agent's and returned as OpenAI ``tool_calls``; :class:`ToolStream` holds a streamed reply
back while it may still be a call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine.grammar import json_object_grammar, schema_grammar
from ..engine.toolcalls import (
    answer_decided,
    call_grammar,
    read_calls,
    template_shows_tools,
    tools_note,
    wraps_calls,
)
from ..errors import InvalidArgument
from .schemas import (
    ChatCompletionRequest,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)

__all__ = ["Plan", "ToolStream", "json_object_grammar", "parse_tool_call", "plan", "schema_grammar"]


@dataclass(frozen=True)
class Plan:
    """What the sampler must enforce and how to read the reply back."""

    grammar: str | None = None
    tools: tuple[str, ...] = ()  # tool names when the reply may be a tool call
    tool_mode: str = "none"  # none | auto | required
    system_note: str | None = None  # tool descriptions for templates that do not render tools


def plan(req: ChatCompletionRequest, template: str | None = None) -> Plan:
    """The grammar and tool handling a chat request asks for, for a model with chat ``template`` (a 400
    when the request's parts contradict)."""
    fmt = req.response_format
    choice = req.tool_choice
    tools = req.tools or []
    if choice is not None and choice != "none" and not tools:
        raise InvalidArgument("tool_choice is set but tools is empty; add tools or drop tool_choice")
    if tools and choice != "none":
        if fmt is not None and fmt.type != "text":
            raise InvalidArgument("response_format and tools cannot both constrain the reply; send one of them")
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name")
            chosen = [t for t in tools if t.function.name == name]
            if not chosen:
                raise InvalidArgument(f"tool_choice names {name!r} but tools has "
                                      f"{[t.function.name for t in tools]}; name one of them")
            mode, use = "required", chosen
        else:
            mode, use = (choice or "auto"), tools
        parallel = req.parallel_tool_calls is not False
        # auto: tool calls, or a plain answer whose first character cannot start a call
        grammar = call_grammar([(t.function.name, t.function.parameters) for t in use], parallel=parallel,
                               allow_text=mode == "auto", wrapped=wraps_calls(template))
        note = None if template_shows_tools(template) else tools_note(
            [t.function.model_dump() for t in tools], parallel, allow_text=mode == "auto")
        return Plan(grammar=grammar, tools=tuple(t.function.name for t in use), tool_mode=mode, system_note=note)
    if fmt is None or fmt.type == "text":
        return Plan()
    if fmt.type == "json_schema":
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise InvalidArgument("response_format json_schema needs json_schema.schema; add the schema")
        return Plan(grammar=schema_grammar(fmt.json_schema.schema_))
    if fmt.schema_:  # json_object with a schema (llama-cpp-python's extension)
        return Plan(grammar=schema_grammar(fmt.schema_, "response_format.schema"))
    return Plan(grammar=json_object_grammar())


def parse_tool_call(text: str, plan_: Plan) -> list[ToolCall] | None:
    """OpenAI tool_calls when ``text`` is only calls to the plan's tools (bare JSON, ``<tool_call>`` blocks or
    fenced), else None (a plain answer, or a call cut short by max_tokens)."""
    if not plan_.tools:
        return None
    calls, _ = read_calls(text, lenient=False)
    if not calls or any(c.name not in plan_.tools for c in calls):
        return None
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                     function=FunctionCall(name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)))
            for c in calls]


@dataclass
class ToolStream:
    """A streamed reply that may be tool calls: held back until it is known to be a plain answer (``auto``:
    its first character, which the grammar makes decisive) or until it ends and is read as calls."""

    plan: Plan
    held: list[str] = field(default_factory=list)
    holding: bool = False

    def __post_init__(self) -> None:
        self.holding = self.plan.tool_mode in ("required", "auto") and bool(self.plan.tools)

    def feed(self, text: str) -> str | None:
        """The text to send now (None while held)."""
        if not self.holding:
            return text
        self.held.append(text)
        so_far = "".join(self.held)
        if self.plan.tool_mode == "auto" and answer_decided(so_far):
            self.holding = False  # a plain answer after all: send what was held, then stream
            return so_far
        return None

    def finish(self) -> tuple[list[list[ToolCallDelta]], str]:
        """At the end: the tool-call deltas to send (one list per chunk) and any held text that is not calls.

        Each call goes as OpenAI streams it: a first delta with its index, id, type, name and empty
        arguments, then its arguments.
        """
        if not self.holding:
            return [], ""
        text = "".join(self.held)
        calls = parse_tool_call(text, self.plan)
        if not calls:
            return [], text
        out = []
        for i, c in enumerate(calls):
            out.append([ToolCallDelta(index=i, id=c.id, type="function",
                                      function=FunctionCallDelta(name=c.function.name, arguments=""))])
            out.append([ToolCallDelta(index=i, function=FunctionCallDelta(arguments=c.function.arguments))])
        return out, ""
