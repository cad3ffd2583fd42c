"""Constrained decoding speed: json_object, json_schema and tools vs unconstrained chat on the same server.

One `ondevice serve` (and, when built, llama-server: `python benchmarks/peers.py build`) gets the same chat
request in each mode, rounds alternating the modes so host drift hits each alike. Per mode: the median
decode tok/s from the reply's llama-server ``timings`` (predicted_per_second), prompt tokens and tokens per
reply, and the ratio to unconstrained decoding on the same server (goal: >= 0.8x). Every constrained reply is
checked to parse.

A ``tools`` request decodes deeper in the KV cache than the plain one: the tool definitions are part of its
prompt (169 tokens on SmolLM2 against 51; at 135M parameters that alone costs ~11% of decode speed, on
llama-server too). So the plain request is also sent carrying the same tool description as a system message
(``plain+tools_prompt``: no tools, no grammar), to tell the grammar's own cost from the depth's: "vs plain at
depth" is against the plain request whose prompt is nearest in length (its prompt tokens in brackets). Each
server renders tools its own way: llama-server 0.3.36 adds nothing to SmolLM2's prompt (its template does
not show tools), so its tools decode at plain's depth. "vs plain" keeps both costs together; the goal is
met on it.

Usage: python benchmarks/constrained_bench.py [--model PATH] [--threads 2] [--rounds 5] [--tokens 64]
                                              [--skip llama-server]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import Server, default_model, one_of_each

PROMPT = ("Describe the city of Paris as a JSON object: its name, country, population and three famous "
          "landmarks.")
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
    "landmarks": {"type": "array", "items": {"type": "string"}}},
    "required": ["city", "country", "population", "landmarks"]}
TOOL = {"type": "function", "function": {
    "name": "get_city_facts", "description": "Look up facts about a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "facts": {"type": "array", "items": {"type": "string"}}},
                   "required": ["city"]}}}
MODES = {
    "plain": {},
    "plain+tools_prompt": {},  # plain, its prompt as deep as tools_auto's on ondevice: see ask()
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "city", "schema": SCHEMA}}},
    "tools_auto": {"tools": [TOOL], "tool_choice": "auto"},
    "tools_required": {"tools": [TOOL], "tool_choice": "required"},
}
PLAINS = ("plain", "plain+tools_prompt")


def ask(srv: Server, mode: str, tokens: int, seed: int) -> dict:
    messages = [{"role": "user", "content": PROMPT}]
    if mode == "plain+tools_prompt":  # the system note ondevice writes for a template that does not show tools
        from ondevice.engine.toolcalls import tools_note

        messages.insert(0, {"role": "system", "content": tools_note([TOOL["function"]], parallel=True,
                                                                    allow_text=True)})
    body = {"messages": messages, "max_tokens": tokens, "temperature": 0.7, "seed": seed, **MODES[mode]}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{srv.name} {mode}: HTTP {r.status_code} {r.text[:200]}")
    d = r.json()
    msg = d["choices"][0]["message"]
    finish = d["choices"][0]["finish_reason"]
    if mode.startswith("json") and finish == "stop":
        json.loads(msg["content"])  # a complete constrained reply must parse
    if msg.get("tool_calls"):
        for c in msg["tool_calls"]:
            json.loads(c["function"]["arguments"])
    t = d.get("timings") or {}
    return {"tps": t.get("predicted_per_second", 0.0), "n": t.get("predicted_n", 0), "finish": finish,
            "prompt": d["usage"]["prompt_tokens"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma list of servers to leave out (llama-server)")
    a = ap.parse_args(argv)
    model = a.model or default_model()
    servers = one_of_each(model, a.threads, a.skip)
    print(f"# constrained_bench: {Path(model).name}, {a.threads} threads, {a.tokens} tokens, temperature 0.7, "
          f"{a.rounds} rounds; load average {os.getloadavg()[0]:.2f} at start")
    results: dict[str, dict[str, list]] = {}
    started = []
    try:
        for s in servers:
            try:
                started.append(s.__enter__())
            except RuntimeError as e:
                print(f"# {s.name} missing: {e}")
        for s in started:
            ask(s, "plain", 8, 0)  # warm-up
        for rnd in range(a.rounds):
            modes = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
            for mode in modes:
                for s in started:
                    try:
                        r = ask(s, mode, a.tokens, rnd)
                    except RuntimeError as e:
                        print(f"# {e}")
                        continue
                    results.setdefault(s.name, {}).setdefault(mode, []).append(r)
    finally:
        for s in started:
            s.__exit__(None, None, None)
    print("| server | mode | prompt tokens | decode tok/s | tokens/reply | vs plain | vs plain at depth |")
    print("|---|---|---|---|---|---|---|")
    med = lambda rs, key: statistics.median(r[key] for r in rs) if rs else 0.0
    for name, by_mode in results.items():
        base = med(by_mode.get("plain"), "tps")
        plains = [(med(by_mode[m], "prompt"), med(by_mode[m], "tps")) for m in PLAINS if by_mode.get(m)]
        for mode, rs in by_mode.items():
            tps, prompt = med(rs, "tps"), med(rs, "prompt")
            at_depth = ""
            if mode not in PLAINS and plains:  # against the plain request whose prompt is nearest in length
                depth, ref = min(plains, key=lambda p: abs(p[0] - prompt))
                at_depth = f"{tps / ref:.2f}x ({depth:.0f})" if ref else ""
            print(f"| {name} | {mode} | {prompt:.0f} | {tps:.1f} | {med(rs, 'n'):.0f} | "
                  f"{tps / base if base else 0:.2f}x | {at_depth} |")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
