"""A response_format grammar with and without the ```json block llama-server's grammar allows: how many greedy
replies are whole, valid JSON within max_tokens, per grammar, on the same prompts (the server takes the block off the
content, serve/structured.py).

    python benchmarks/json_fence_bench.py [--model smollm2-135m-instruct] [--max-tokens 32,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

PROMPTS = ["Give a JSON with name", "Give a person", "Describe a user of our app", "Make up a character for a story",
           "List three fruits", "What is the capital of France?", "Return a JSON object describing a cat",
           "Who wrote Hamlet?", "Summarise: the meeting moved to Friday at 3pm.", "Extract the city: I live in Oslo."]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def whole(reply) -> bool:
    from ondevice.serve.structured import unfence

    if reply.finish_reason != "stop":
        return False
    try:
        json.loads(unfence(reply.text))
    except ValueError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", default="32,64")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ondevice
    from ondevice.engine.grammar import fenced, json_object_grammar, schema_grammar

    m = ondevice.load(args.model, n_threads=args.threads)
    print(f"{args.model}, greedy, {len(PROMPTS)} prompts: replies whole and valid JSON within max_tokens")
    print(f"{'format':12s} {'max_tokens':>10s} {'bare':>6s} {'block allowed':>14s}")
    for name, base in (("json_object", json_object_grammar()), ("name+age", schema_grammar(PERSON))):
        for n in (int(x) for x in args.max_tokens.split(",")):
            counts = [sum(whole(m.generate([{"role": "user", "content": p}], temp=0, max_tokens=n, grammar=g))
                          for p in PROMPTS) for g in (base, fenced(base))]
            print(f"{name:12s} {n:10d} {counts[0]:6d} {counts[1]:14d}", flush=True)
    m.close()


if __name__ == "__main__":
    main()
