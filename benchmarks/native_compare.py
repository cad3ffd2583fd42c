"""llama-server's own routes (/completion, /apply-template, /props, /lora-adapters) on `ondevice serve` and on
llama-server: the same requests, greedy, one server of each (llama-server when built: ``python benchmarks/peers.py
build``). Prints one row per request and server: the reply's text, its token ids (count and a hash), stop_type and
stopping_word, tokens predicted / evaluated / cached, the ids of ``completion_probabilities``, and the top-level
fields the reply has (a hash of their names, and how many); streamed, the number of events and the last one's
``stop``. An error is a row too (status, type, message). /infill needs a model with fill-in-the-middle tokens:
``--model qwen2.5-coder-0.5b-instruct`` (the ``[coder]`` extra); SmolLM2 has none (both servers answer 501).

Usage: python benchmarks/native_compare.py [--model smollm2-135m-instruct] [--threads 1] [--skip llama-server]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import compare_table

PROMPT = "The three primary colors are"
CHAT = "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n"
G = {"temperature": 0, "n_predict": 12, "return_tokens": True}
CASES = [
    ("text", {"prompt": PROMPT, **G}),
    ("token ids", {"prompt": "IDS", **G}),
    ("ids then text", {"prompt": "MIXED", **G}),
    ("two prompts", {"prompt": [PROMPT, "Once upon a time"], **G}),
    ("stop word", {"prompt": PROMPT, **G, "stop": [" and"]}),
    ("end of text", {"prompt": CHAT, **G, "n_predict": 32}),
    ("n_probs 2", {"prompt": PROMPT, **G, "n_predict": 4, "n_probs": 2}),
    ("json_schema", {"prompt": "A color as JSON: ", **G, "n_predict": 24,
                     "json_schema": {"type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}}),
    ("grammar", {"prompt": PROMPT, **G, "grammar": 'root ::= " red" | " blue"'}),
    ("logit_bias text false", {"prompt": PROMPT, **G, "logit_bias": [[" red", False]]}),
    ("samplers top_k 1", {"prompt": PROMPT, **G, "temperature": 1.5, "top_k": 1, "seed": 1,
                          "samplers": ["top_k", "temperature"]}),
    ("response_fields", {"prompt": PROMPT, **G, "response_fields": ["content", "generation_settings/n_predict"]}),
    ("n_cmpl 2, seed", {"prompt": PROMPT, "n_predict": 6, "n_cmpl": 2, "seed": 5}),
    ("post_sampling_probs", {"prompt": PROMPT, **G, "n_probs": 2, "post_sampling_probs": True}),
    ("post_sampling_probs sampled", {"prompt": PROMPT, "n_predict": 6, "temperature": 0.8, "seed": 7, "n_probs": 3,
                                     "post_sampling_probs": True, "return_tokens": True}),
    ("/infill", {"input_prefix": "def fib(n):\n    ", "input_suffix": "\n    return a\n", **G, "n_predict": 32,
                 "input_extra": [{"filename": "util.py", "text": "def add(a, b):\n    return a + b\n"}]}),
    ("/infill llama.vscode", {"input_prefix": "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
                                              "    def push(self, x):\n        ", "input_suffix": "", "n_predict": 64,
                              "samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.99, "n_indent": 8,
                              "seed": 3, "t_max_predict_ms": 60000, "return_tokens": True}),
    ("/apply-template", {"messages": [{"role": "user", "content": "Name a color."}]}),
    ("/props", {}),
    ("/lora-adapters", {}),
]


def _short(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:6]


def _one(r: dict) -> str:
    if set(r) <= {"content", "generation_settings/n_predict"}:
        return f"response_fields {sorted(r)}"
    toks = r.get("tokens") or []
    probs = [(p["id"], round(p["prob"], 3)) if "prob" in p else p["id"]
             for p in r.get("completion_probabilities") or []]
    return (f"{json.dumps(r.get('content'))[:60]} | {len(toks)} ids {_short(toks)} | {r.get('stop_type')} "
            f"{json.dumps(r.get('stopping_word'))} | {r.get('tokens_predicted')}/{r.get('tokens_evaluated')}/"
            f"{r.get('tokens_cached')} | probs {probs} | {len(r)} fields {_short(sorted(r))}")


def ask(base: str, name: str, body: dict, stream: bool) -> str:
    with httpx.Client(base_url=base, timeout=600) as c:
        path = "/infill" if name.startswith("/infill") else "/completion"
        if name.startswith("/") and path != "/infill":
            if stream:
                return "—"
            r = c.post(name, json=body) if body else c.get(name)
            if r.status_code != 200:
                return f"error {r.status_code} | {r.text[:120]}"
            j = r.json()
            if name == "/props":
                d = j["default_generation_settings"]
                return (f"n_ctx {d['n_ctx']} | total_slots {j['total_slots']} | template {len(j['chat_template'])} "
                        f"chars | params {len(d['params'])} fields, n_predict {d['params']['n_predict']} | "
                        f"bos {j.get('bos_token')!r} eos {j.get('eos_token')!r}")
            return json.dumps(j)[:160]
        ids = c.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
        if body.get("prompt") == "IDS":
            body = {**body, "prompt": ids}
        elif body.get("prompt") == "MIXED":
            tail = c.post("/detokenize", json={"tokens": ids[2:]}).json()["content"]
            body = {**body, "prompt": [*ids[:2], tail]}
        if not stream:
            r = c.post(path, json=body)
            if r.status_code != 200:
                err = r.json().get("error", {})
                return f"error {r.status_code} {err.get('type')} | {str(err.get('message'))[:110]}"
            j = r.json()
            return " || ".join(_one(x) for x in j) if isinstance(j, list) else _one(j)
        with c.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return f"error {r.status_code} | {r.read()[:110]!r}"
            raw = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        evs = [e for e in raw if isinstance(e, dict)]
        if not evs:
            return f"{len(raw)} events, none an object"
        finals = [e for e in evs if e.get("stop")]
        text = {i: "".join(e.get("content", "") for e in evs if e.get("index", 0) == i and not e.get("stop"))
                for i in sorted({e.get("index", 0) for e in evs})}
        return (f"{json.dumps(list(text.values()))[:60]} | {len(raw)} events ({len(raw) - len(evs)} null), last stop {evs[-1].get('stop')} | "
                f"{' '.join(str(f.get('stop_type')) for f in finals)} | {len(finals[-1]) if finals else 0} fields "
                f"{_short(sorted(finals[-1])) if finals else '—'}")


def main(argv: list[str] | None = None) -> int:
    def row(openai_client, case, stream):
        base = str(openai_client.base_url).rstrip("/").removesuffix("/v1")
        return ask(base, case[0], case[1], stream)

    return compare_table(argv, __doc__, "smollm2-135m-instruct",
                         "text | token ids | stop_type stopping_word | predicted/evaluated/cached | probs | fields",
                         CASES, row)


if __name__ == "__main__":
    raise SystemExit(main())
