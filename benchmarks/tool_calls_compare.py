"""Tool calls on `ondevice serve` and llama-server `--jinja`: the same requests through the official openai client.

Five chat requests with two tools (a call, two calls, no tool fits; ``tool_choice`` auto, required and a
named function), each non-streamed and streamed, greedy, to one server of each (llama-server when built:
``python benchmarks/peers.py build``). Prints one row per request and server: finish reason, content, the
calls read back (streamed: assembled from the deltas, with how many deltas came).

Usage: python benchmarks/tool_calls_compare.py [--model qwen2.5-coder-0.5b-instruct] [--threads 1]
                                               [--skip llama-server]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import compare_table

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object",
                                                     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                                     "required": ["a", "b"]}}},
]
CASES = [
    ("auto", "What is the weather in Paris?", "auto"),
    ("auto, two calls", "What is the weather in Paris and in Rome?", "auto"),
    ("auto, no tool fits", "Write a haiku about the sea.", "auto"),
    ("required", "What is the weather in Paris?", "required"),
    ("named add", "Please add 2 and 3.", {"type": "function", "function": {"name": "add"}}),
]


def ask(client: openai.OpenAI, q: str, choice, stream: bool) -> dict:
    kw = {"model": "m", "messages": [{"role": "user", "content": q}], "tools": TOOLS, "tool_choice": choice,
          "temperature": 0, "max_tokens": 100}
    if not stream:
        ch = client.chat.completions.create(**kw).choices[0]
        return {"finish": ch.finish_reason, "content": ch.message.content,
                "calls": [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]}
    content, calls, finish, n = "", {}, None, 0
    for k in client.chat.completions.create(stream=True, **kw):
        if not k.choices:
            continue
        d = k.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            n += 1
            e = calls.setdefault(tc.index, ["", ""])
            e[0] += (tc.function.name or "") if tc.function else ""
            e[1] += (tc.function.arguments or "") if tc.function else ""
        finish = k.choices[0].finish_reason or finish
    return {"finish": finish, "content": content or None, "calls": [tuple(v) for v in calls.values()], "deltas": n}


def row(client: openai.OpenAI, case: tuple, stream: bool) -> str:
    _, q, choice = case
    r = ask(client, q, choice, stream)
    calls = "; ".join(f"{n} {json.dumps(args)}" for n, args in r["calls"]) or "—"
    if stream:
        calls += f" ({r['deltas']} deltas)"
    return f"{r['finish']} | {calls} | {json.dumps(r['content'])[:90] if r['content'] else '—'}"


def main(argv: list[str] | None = None) -> int:
    return compare_table(argv, __doc__, "qwen2.5-coder-0.5b-instruct", "finish | tool_calls (name, arguments) | "
                         "content", CASES, row)


if __name__ == "__main__":
    raise SystemExit(main())
