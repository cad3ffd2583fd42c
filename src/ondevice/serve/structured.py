"""Structured output: response_format and tools become a GBNF grammar that the native sampler enforces.

The grammars come from :mod:`ondevice.engine.grammar` (shared with the agent). The reply is parsed back
into OpenAI ``tool_calls``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..engine.grammar import (TOOL_CALL_START, json_object_grammar, schema_grammar, tool_call_grammar,
                              tools_note)
from ..errors import InvalidArgument
from .schemas import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

__all__ = ["TOOL_CALL_START", "Plan", "json_object_grammar", "parse_tool_call", "plan", "schema_grammar"]


@dataclass(frozen=True)
class Plan:
    """What the sampler must enforce and how to read the reply back."""

    grammar: str | None = None
    tools: tuple[str, ...] = ()  # tool names when the reply may be a tool call
    tool_mode: str = "none"  # none | auto | required
    system_note: str | None = None  # tool descriptions for templates that do not render tools


def plan(req: ChatCompletionRequest) -> Plan:
    """The grammar and tool handling a chat request asks for (a 400 when its parts contradict)."""
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
        # auto: either tool calls (start with "{" or "[") or free text that does not start with either
        grammar = tool_call_grammar([(t.function.name, t.function.parameters) for t in use], parallel, mode)
        return Plan(grammar=grammar, tools=tuple(t.function.name for t in use), tool_mode=mode,
                    system_note=tools_note([t.function.model_dump() for t in tools], parallel))
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
    """OpenAI tool_calls when ``text`` is one call or an array of calls to the plan's tools, else None."""
    if not plan_.tools or not text.lstrip().startswith(TOOL_CALL_START):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut short (max_tokens): not a complete call
    objs = obj if isinstance(obj, list) else [obj]
    if not objs or not all(isinstance(o, dict) and o.get("name") in plan_.tools for o in objs):
        return None
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                     function=FunctionCall(name=o["name"], arguments=json.dumps(o.get("arguments", {}))))
            for o in objs]
