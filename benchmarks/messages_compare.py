"""Anthropic's Messages API (POST /v1/messages) on `ondevice serve` and on llama-server `--jinja`: the same requests
through the official anthropic client, greedy, one server of each (llama-server when built:
``python benchmarks/peers.py build``). Prints one row per request and server: stop_reason and stop_sequence, the
content blocks, text, and for a stream the event types in order (runs of one type collapsed to ``type xN``) as the
client's stream helper reads them, with the message it assembles.

Usage: python benchmarks/messages_compare.py [--model smollm2-135m-instruct] [--threads 1] [--skip llama-server]
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import anthropic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import compare_table

WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
CASES = [
    ("text + system", {"system": "Answer in one short sentence.", "messages": [{"role": "user", "content": "Name a color."}]}),
    ("cut by max_tokens", {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8}),
    ("stop_sequences", {"messages": COUNT, "stop_sequences": ["zebra", "5"]}),
    ("tool_choice any", {"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "any"}}),
    ("tool_choice tool", {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER],
                          "tool_choice": {"type": "tool", "name": "get_weather"}}),
    ("tool_result sent back", {"tools": [WEATHER], "messages": [
        *ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                 "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}]}]}),
    ("count_tokens", {"messages": ASK, "tools": [WEATHER], "count": True}),
    ("no max_tokens", {"messages": ASK, "max_tokens": None}),
    ("image block", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}),
    ("thinking enabled", {"messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
]


def _blocks(m) -> str:
    out = []
    for b in m.content:
        out.append(f"tool_use {b.name} {json.dumps(b.input)}" if b.type == "tool_use" else b.type)
    text = "".join(b.text for b in m.content if b.type == "text")
    return f"{m.stop_reason} {json.dumps(m.stop_sequence)} | {', '.join(out) or '—'} | {json.dumps(text)[:70]} " \
           f"| in {m.usage.input_tokens} out {m.usage.output_tokens}"


def ask(client: anthropic.Anthropic, kw: dict, stream: bool) -> str:
    kw = {"model": "m", "max_tokens": 64, **kw}
    try:
        if kw.pop("count", False):
            if stream:
                return "— | — | — | —"
            kw.pop("max_tokens")
            return f"— | — | — | input_tokens {client.messages.count_tokens(**kw).input_tokens}"
        body = {k: v for k, v in kw.items() if v is not None}
        if "max_tokens" not in body:  # the client refuses it itself: sent as it is
            r = client.post("/v1/messages", body={**body, "stream": stream}, cast_to=object)
            return f"accepted | {str(r)[:110]!r}"
        if not stream:
            return _blocks(client.messages.create(**body, extra_body={"temperature": 0}))
        with client.messages.stream(**body, extra_body={"temperature": 0}) as st:
            events = list(st)
            final = st.get_final_message()
        kinds = [(k, len(list(g))) for k, g in itertools.groupby(
            e.type + (f".{e.delta.type}" if e.type == "content_block_delta" else "") for e in events
            if e.type not in ("text", "input_json"))]  # the helper's own derived events
        return f"{_blocks(final)} | {' '.join(k + (f' x{n}' if n > 1 else '') for k, n in kinds)}"
    except anthropic.APIStatusError as e:
        err = e.body.get("error", {}) if isinstance(e.body, dict) else {}
        return f"error {e.status_code} {err.get('type')} | {str(err.get('message'))[:110]}"
    except (anthropic.AnthropicError, TypeError) as e:
        return f"error | {type(e).__name__}: {str(e)[:110]}"


def main(argv: list[str] | None = None) -> int:
    def row(openai_client, case, stream):  # the anthropic client on the server compare_table opened
        base = str(openai_client.base_url).rstrip("/").removesuffix("/v1")
        client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=600)
        return ask(client, case[1], stream)

    return compare_table(argv, __doc__, "smollm2-135m-instruct",
                         "stop_reason stop_sequence | content blocks | text | usage (| stream events)", CASES, row)


if __name__ == "__main__":
    raise SystemExit(main())
