"""The Responses API (POST /v1/responses) on `ondevice serve` and on llama-server `--jinja`: the same requests
through the official openai client, greedy, one server of each (llama-server when built:
``python benchmarks/peers.py build``). Prints one row per request and server: status, output items, text, and
for a stream the event types in order (runs of one type collapsed to ``type xN``).

Usage: python benchmarks/responses_compare.py [--model smollm2-135m-instruct] [--threads 1] [--skip llama-server]
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import compare_table

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PERSON = {"type": "json_schema", "name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CASES = [
    ("text", {"instructions": "Answer in one short sentence.", "input": "Name a color."}),
    ("text, cut by max_output_tokens", {"input": "Tell me a story.", "max_output_tokens": 8}),
    ("tool required", {"input": ASK, "tools": [WEATHER], "tool_choice": "required"}),
    ("tool named", {"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}),
    ("tool output sent back", {"tools": [WEATHER], "input": [
        *ASK, {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]}),
    ("text.format json_schema", {"input": "Alice is 30. Give her name and age as JSON.", "text": {"format": PERSON}}),
    ("previous_response_id", {"input": "and then?", "previous_response_id": "resp_123"}),
]


def ask(client: openai.OpenAI, kw: dict, stream: bool) -> str:
    kw = {"model": "m", "temperature": 0, "max_output_tokens": 64, **kw}
    if not stream:
        r = client.responses.create(**kw)
        items = ", ".join(o.type + (f" {o.name} {o.arguments}" if o.type == "function_call" else "") for o in r.output)
        return f"{r.status} | {items or '—'} | {json.dumps(r.output_text)[:80]}"
    events = list(client.responses.create(stream=True, **kw))
    kinds = [(k, len(list(g))) for k, g in itertools.groupby(e.type.removeprefix("response.") for e in events)]
    last = events[-1]
    text = json.dumps(last.response.output_text)[:60] if hasattr(last, "response") else "—"
    return f"{getattr(getattr(last, 'response', None), 'status', '?')} | " \
           f"{' '.join(k + (f' x{n}' if n > 1 else '') for k, n in kinds)} | {text}"


def main(argv: list[str] | None = None) -> int:
    return compare_table(argv, __doc__, "smollm2-135m-instruct", "status | output items / events | text", CASES,
                         lambda client, case, stream: ask(client, case[1], stream))


if __name__ == "__main__":
    raise SystemExit(main())
