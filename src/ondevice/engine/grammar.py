"""JSON schema and tool calls as GBNF grammars that llama.cpp's native sampler enforces.

One place for the server's ``response_format`` and the agent's plans; tool calls build on it in
:mod:`ondevice.engine.toolcalls`. JSON schema -> GBNF uses llama-cpp-python's converter
(``llama_cpp.llama_grammar``), the one its own server uses. A tool call is the JSON object
``{"name": ..., "arguments": {...}}`` constrained to the tools' parameter schemas; with ``parallel``
(OpenAI's ``parallel_tool_calls``) a JSON array of such objects is allowed too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import InvalidArgument


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
