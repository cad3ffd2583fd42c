"""JSON schema and tool calls as GBNF grammars that llama.cpp's native sampler enforces.

One place for the server's ``response_format``/``tools`` and the agent's plans and calls. JSON schema ->
GBNF uses llama-cpp-python's converter (``llama_cpp.llama_grammar``), the one its own server uses. A tool
call is the JSON object ``{"name": ..., "arguments": {...}}`` constrained to the tools' parameter schemas;
with ``parallel`` (OpenAI's ``parallel_tool_calls``) a JSON array of such objects is allowed too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ..errors import InvalidArgument

TOOL_CALL_START = ("{", "[")  # how a reply that is tool calls begins


def schema_grammar(schema: dict, what: str = "response_format.json_schema.schema") -> str:
    """GBNF for a JSON schema (an error naming ``what`` when the converter cannot express it)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises assorted errors on schemas it cannot express
        raise InvalidArgument(f"{what} cannot be turned into a grammar ({e}); simplify the schema") from e


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF  # root ::= object


def tool_call_schema(functions: Sequence[tuple[str, dict]], parallel: bool, max_calls: int | None = None) -> dict:
    """JSON schema of one call (or, with ``parallel``, also an array of up to ``max_calls`` calls) to
    ``(name, parameters)``."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False} for name, params in functions]
    one = calls[0] if len(calls) == 1 else {"oneOf": calls}
    many = {"type": "array", "items": one, "minItems": 1, **({"maxItems": max_calls} if max_calls else {})}
    return {"anyOf": [one, many]} if parallel else one


def tool_call_grammar(functions: Sequence[tuple[str, dict]], parallel: bool = False, mode: str = "required",
                      max_calls: int | None = None) -> str:
    """GBNF for a call to one of ``functions``; ``mode="auto"`` also allows a plain-text reply instead
    (text that does not start with ``{`` or ``[``, so a reply is either a whole call or no call)."""
    if not functions:
        raise InvalidArgument("a tool-call grammar needs at least one function; offer a tool")
    call = schema_grammar(tool_call_schema(functions, parallel, max_calls), "tools[].function.parameters")
    if mode != "auto":
        return call
    call = re.sub(r"(?m)^root ::=", "ondevice-tool-call ::=", call, count=1)
    return call + "\nroot ::= ondevice-tool-call | [^{[] .*\n"


def tools_note(functions: Sequence[dict], parallel: bool = False) -> str:
    """Tool descriptions and the call format, for a system message (templates that do not render tools).

    ``functions`` are OpenAI function objects: ``{"name", "description", "parameters"}``.
    """
    lines = [("You can call these tools. To call one, reply with only a JSON object "
              '{"name": <tool name>, "arguments": <arguments object>}'
              + ("; to call several at once, a JSON array of such objects." if parallel else "."))]
    for f in functions:
        lines.append(json.dumps({"name": f["name"], "description": f.get("description") or "",
                                 "parameters": f.get("parameters") or {}}))
    return "\n".join(lines)
