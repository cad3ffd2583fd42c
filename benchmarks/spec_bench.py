"""Speculative decoding: greedy output and decode speed with drafts vs plain decoding, same model, same process.

Sets: the rewriting items of assistant-en (output copies the input: fix, tone, shorten), a summarise/extract
set (assistant-en's notification summaries and event extraction), and free chat (open questions, where drafts
mostly miss and the generator must back off). Per item, plain and speculative runs alternate (order flipped
every item) so host drift hits both alike. Prints per set: items whose greedy text is byte-identical to plain,
decode tok/s of each (total generated tokens / total decode time, first token excluded), their ratio,
acceptance rate and tokens per target decode. With ``--draft lookup`` also the set's ceiling: the tokens per
decode step if every prompt-lookup draft (up to ``--draft-max``) along the plain output were verified for
free (an oracle that drafts exactly when the draft matches). No cost curve turns more than that into speed:
a speed-up above it needs drafts the text does not hold.

Usage: python benchmarks/spec_bench.py [--model NAME|PATH] [--threads 2] [--limit 16] [--max-tokens 96]
                                       [--draft lookup|MODEL] [--draft-max 16] [--sets rewrite,summarise,chat]
``--draft MODEL`` loads a draft model (it must share the target's vocabulary). No catalog pair shares one
(SmolLM2, Gemma 3 and Qwen2.5 each have their own), so the draft-model path is exercised with a quantized
variant of the same model, e.g. an F16 or Q8_0 target made by `ondevice quantize` with the Q4_1 draft.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources

FREE_CHAT = ["Write a short poem about autumn leaves.", "What are three tips for sleeping better?",
             "Tell me a fun fact about octopuses.", "Explain what a black hole is to a child.",
             "Suggest a name for a bakery and say why.", "Describe your ideal weekend in a few sentences.",
             "What should I pack for a beach holiday?", "Give me an idea for a birthday present for my dad.",
             "Why is the sky blue?", "Write a limerick about a cat.", "How do I make a cup of tea?",
             "What is the difference between weather and climate?", "Invent a new board game in three sentences.",
             "List some ways to save energy at home.", "What makes a good friend?", "Describe a sunset at sea."]


def items(which: str, limit: int) -> list[str]:
    if which == "chat":
        return FREE_CHAT[:limit]
    rows = [json.loads(line) for line in
            resources.files("ondevice.data").joinpath("assistant_en.jsonl").read_text().splitlines() if line]
    cats = {"rewrite": ("rewriting",), "summarise": ("notification_summary", "extraction")}[which]
    picked = [r for r in rows if r["category"] in cats]
    if which == "summarise":  # both kinds, interleaved
        a = [r for r in picked if r["category"] == cats[0]]
        b = [r for r in picked if r["category"] == cats[1]]
        picked = [x for pair in zip(a, b) for x in pair]
    else:  # the three rewrite tasks, interleaved
        by = {}
        for r in picked:
            by.setdefault(r["task"], []).append(r)
        picked = [x for group in zip(*by.values()) for x in group]
    return [r["input"] for r in picked[:limit]]


def lookup_ceiling(prompt_tokens: list[int], out: list[int], draft_max: int) -> tuple[int, int]:
    """``(tokens, steps)`` along ``out`` for an oracle verifying each prompt-lookup draft for free: every step
    yields its draft's matching prefix (at most ``draft_max``) plus the one token a plain step makes."""
    from ondevice.engine.drafters import PromptLookup

    look, t, steps = PromptLookup(prompt_tokens), 0, 0
    while t < len(out):
        d = look.draft(draft_max)
        m = 0
        while m < len(d) and t + m < len(out) and d[m] == out[t + m]:
            m += 1
        for tok in out[t:t + m + 1]:
            look.append(tok)
        t, steps = t + m + 1, steps + 1
    return len(out), steps


def step_costs(model, sizes=(1, 2, 4, 8), reps: int = 30) -> dict[int, float]:
    """What a decode of n tokens (each with logits, as a verification) costs in single-token steps: the median
    of ``reps`` rounds, sizes interleaved, after a 200-token context. Drafting k tokens pays only if the
    accepted ones outrun ``cost(k + 1)``."""
    import statistics

    eng = model.engine
    model.reset()
    ctx = eng.tokenize("The quick brown fox jumps over the lazy dog. " * 30)[:200]
    eng.prefill(ctx)
    spent: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(reps):
        for n in sizes:
            t0 = time.perf_counter()
            eng.decode_batch([(ctx[i], len(ctx) + i, 0, True) for i in range(n)])
            spent[n].append(time.perf_counter() - t0)
            eng.truncate(len(ctx), 0)
    model.reset()
    one = statistics.median(spent[sizes[0]])
    return {n: statistics.median(v) / one for n, v in spent.items()}


def run_set(model, prompts: list[str], draft: str, draft_max: int, max_tokens: int) -> dict:
    tot = {"plain": [0, 0.0], "spec": [0, 0.0]}
    same = drafted = accepted = steps = gen = 0
    oracle = [0, 0]
    for i, p in enumerate(prompts):
        res = {}
        order = ("plain", "spec") if i % 2 == 0 else ("spec", "plain")
        for kind in order:
            model.reset()  # both cold: the same prompt work, the decode is what differs
            kw = {"draft": draft, "draft_max": draft_max} if kind == "spec" else {}
            r = model.generate(p, temp=0, max_tokens=max_tokens, **kw)
            res[kind] = r
            g = r.last
            if g is not None and g.generation_tokens > 1:
                tot[kind][0] += g.generation_tokens - 1
                tot[kind][1] += g.t - g.ttft
        same += res["plain"].text == res["spec"].text
        if draft == "lookup":
            n, k = lookup_ceiling(model.tokenize_prompt(p), res["plain"].tokens, draft_max)
            oracle = [oracle[0] + n, oracle[1] + k]
        g = res["spec"].last
        drafted, accepted = drafted + g.draft_tokens, accepted + g.draft_accepted
        steps, gen = steps + g.decode_steps, gen + g.generation_tokens
    tps = {k: n / t if t else 0.0 for k, (n, t) in tot.items()}
    return {"items": len(prompts), "identical": same, "plain_tps": tps["plain"], "spec_tps": tps["spec"],
            "ratio": tps["spec"] / tps["plain"] if tps["plain"] else 0.0,
            "acceptance": accepted / drafted if drafted else 0.0, "tokens_per_step": gen / steps if steps else 0.0,
            "tokens": gen, "wasted": (drafted - accepted) / gen if gen else 0.0,
            "ceiling": oracle[0] / oracle[1] if oracle[1] else None}


def main(argv: list[str] | None = None) -> int:
    import ondevice

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=16, help="items per set")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft", default="lookup", help="lookup, or a draft MODEL sharing the vocabulary")
    ap.add_argument("--draft-max", type=int, default=16)
    ap.add_argument("--sets", default="rewrite,summarise,chat")
    a = ap.parse_args(argv)
    mode = "lookup" if a.draft == "lookup" else "model"
    model = ondevice.load(a.model, n_ctx=2048, n_threads=a.threads,
                          **({"draft_model": a.draft} if mode == "model" else {}))
    print(f"# spec_bench: {model.name}, draft {a.draft} (max {a.draft_max}), {a.threads} threads, "
          f"greedy, max {a.max_tokens} tokens; load average {os.getloadavg()[0]:.2f} at start")
    # wasted: drafted tokens the target rejected per generated token (what misses cost, whatever the load)
    cost = step_costs(model)
    print("# a decode of n tokens costs, in single-token steps: "
          + ", ".join(f"n={n} {c:.2f}" for n, c in cost.items()))
    # ceiling: tok/step of an oracle verifying every lookup draft for free (no speed-up can exceed it)
    print("| set | items | identical | plain tok/s | spec tok/s | ratio | acceptance | tok/step | wasted | ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    t0 = time.time()
    for which in a.sets.split(","):
        r = run_set(model, items(which, a.limit), mode, a.draft_max, a.max_tokens)
        print(f"| {which} | {r['items']} | {r['identical']}/{r['items']} | {r['plain_tps']:.1f} | "
              f"{r['spec_tps']:.1f} | {r['ratio']:.2f}x | {r['acceptance']:.0%} | {r['tokens_per_step']:.2f} | "
              f"{r['wasted']:.3f} | {'-' if r['ceiling'] is None else format(r['ceiling'], '.2f')} |",
              flush=True)
    print(f"# {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
