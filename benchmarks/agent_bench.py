"""Agent figures: the function-calling suite constrained vs unconstrained, tool retrieval, the task graph.

1. suite: every request of ondevice's function-calling suite (``ondevice.agent.fcsuite``: single, choose,
   parallel, none) with its own offered tools, decoded under the tool-call grammar and without it. Per
   category and mode: accuracy (name + normalised arguments), parsed (a call or a plain answer could be
   read) and valid (calls validate against the offered schemas). Goal: 100% of constrained calls parse and
   validate.
2. retrieval: the 109-tool catalog indexed by BM25, by the model's own mean-pooled embeddings and by the
   hybrid of both (``ToolIndex``); top-k recall of the expected tools over the requests that need a call,
   then accuracy (constrained) with the top-k offered vs all 109 tools offered. Goals: top-5 recall >= 90%,
   accuracy with retrieval >= with all tools.
3. graph: multi-step tasks whose independent branches call tools that take real time (sleeps standing for
   I/O), run by the task graph in parallel and one step at a time, same results; once with given
   arguments and once with the actor model writing every step's arguments (model steps serialised on the
   one engine). Goal: parallel wall time <= 0.7x sequential.

    python benchmarks/agent_bench.py                                   # all parts, the default model
    python benchmarks/agent_bench.py --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
    python benchmarks/agent_bench.py --parts suite --limit 20          # a stratified quick look
    python benchmarks/agent_bench.py --parts suite,retrieval --cache runs.jsonl   # resumable: replies kept

Tools are offered the way each model's chat template shows them (``ondevice.agent.calls.call_prompt``).
With ``--cache`` every scored reply is appended to a JSON-lines file as it is made and read back on the
next run (keyed by model, part, mode, item and the offered tools), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import ondevice
from ondevice.agent import Agent, Embedder, Node, Toolbox, ToolIndex, fcsuite, run_graph


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def subset(items, limit: int | None):
    if not limit or limit >= len(items):
        return list(items)
    by_cat: dict[str, list] = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it)
    per = max(1, limit // len(by_cat))
    return [it for cat in by_cat.values() for it in cat[:per]]


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


class Cache:
    """Scored replies by key, appended to a JSON-lines file as they are made (a cut-off last line is skipped)."""

    def __init__(self, path: str | None):
        self.path, self.rows = path, {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.rows[r["key"]] = r["row"]

    def run(self, key: str, fn):
        if key in self.rows:
            return self.rows[key]
        row = self.rows[key] = fn()
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "row": row}, default=str) + "\n")
        return row


CACHE = Cache(None)


def run_item(model, it, *, constrained: bool, part: str, tools=None) -> dict:
    offered = ",".join(t.name for t in tools) if tools is not None else "own"
    key = f"{model.name}|{part}|{'c' if constrained else 'u'}|{it['id']}|{offered}"
    return CACHE.run(key, lambda: fcsuite.run_item(model, it, constrained=constrained, tools=tools))


# -- 1. the suite ------------------------------------------------------------------------------------------

def part_suite(model, items) -> dict:
    rows = []
    t0 = time.perf_counter()
    for i, it in enumerate(items, 1):  # both modes back to back: the second reuses the prompt's KV
        for mode in fcsuite.MODES:
            rows.append(run_item(model, it, constrained=mode == "constrained", part="suite"))
        if i % 4 == 0 or i == len(items):
            say(f"    {i}/{len(items)} items, both modes ({time.perf_counter() - t0:.0f} s)")
    s = fcsuite.summarize(rows)
    print(f"\n  {'category':10s} {'mode':14s} {'n':>4s} {'accuracy':>9s} {'parsed':>8s} {'valid':>8s}")
    for cat in [*fcsuite.CATEGORIES, "all"]:
        for mode in fcsuite.MODES:
            r = s.get(mode, {}).get(cat)
            if r:
                print(f"  {cat:10s} {mode:14s} {r['n']:4d} {pct(r['accuracy']):>9s} {pct(r['parsed']):>8s} "
                      f"{pct(r['valid']):>8s}")
    con = [r for r in rows if r["mode"] == "constrained" and r["calls"]]
    ok = sum(1 for r in con if r["valid"])
    print(f"  constrained replies that are calls: {len(con)}, parse and validate: {ok} ({pct(ok / max(1, len(con)))})")
    bad = [r for r in rows if r["mode"] == "constrained" and not r["valid"]]
    for r in bad[:5]:
        print(f"    not valid: {r['id']}: {r['problem']}: {r['text'][:120]!r}")
    return {"summary": s, "constrained_calls": len(con), "constrained_calls_valid": ok, "rows": rows}


# -- 2. retrieval --------------------------------------------------------------------------------------------

def recall(index: ToolIndex, need, k: int, mode: str | None = None) -> tuple[float, float]:
    """Mean share of the expected tools in the top k, and the share of requests with all of them there."""
    rec, full = [], 0
    for it in need:
        want = {e["name"] for e in it["expected"]}
        got = {t.name for t in index.search(it["query"], k, mode)}
        rec.append(len(want & got) / len(want))
        full += want <= got
    return statistics.fmean(rec), full / len(need)


def lexical_recall(k: int) -> dict:
    """BM25 recall over every request of the suite that needs a call (no model: quick)."""
    need = [it for it in fcsuite.items() if it["expected"]]
    index = ToolIndex(list(fcsuite.catalog().values()))
    r, full = recall(index, need, k)
    print(f"lexical (BM25) top-{k} recall over all {len(need)} requests that need a call, "
          f"{len(index.tools)} tools: {pct(r)}; every expected tool found {pct(full)}")
    return {"recall": r, "all_found": full, "n_items": len(need)}


def part_retrieval(model, items, k: int, threads: int | None, offer_mode: str, modes: list[str],
                   offers: list[str]) -> dict:
    tools = list(fcsuite.catalog().values())
    need = [it for it in items if it["expected"]]
    t0 = time.perf_counter()
    emb = Embedder(model.path, n_threads=threads) if modes != ["lexical"] else None
    try:
        index = ToolIndex(tools, emb)
        say(f"  indexed {len(tools)} tools in {time.perf_counter() - t0:.1f} s")
        out: dict = {"n_tools": len(tools), "n_items": len(need), "k": k, "recall": {}}
        print(f"\n  top-{k} recall over {len(need)} requests that need a call, {len(tools)} tools:")
        for mode in modes:
            r, full = recall(index, need, k, mode)
            out["recall"][mode] = {"recall": r, "all_found": full}
            print(f"    {mode:9s} recall {pct(r)}   every expected tool found {pct(full)}")
        acc = {}
        for label in offers:  # all: the same 109-tool prefix every time, its KV reused
            t1 = time.perf_counter()
            rows = []
            for i, it in enumerate(need, 1):
                offered = index.search(it["query"], k, offer_mode) if label == "retrieved" else tools
                rows.append(run_item(model, it, constrained=True, part=f"offer-{label}", tools=offered))
                if i % 10 == 0:
                    say(f"    {label}: {i}/{len(need)} ({time.perf_counter() - t1:.0f} s)")
            n = len(need)
            acc[label] = {"accuracy": sum(r["correct"] for r in rows) / n, "valid": sum(r["valid"] for r in rows) / n,
                          "calls": sum(1 for r in rows if r["calls"]) / n,
                          "prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in rows),
                          "cached_tokens": statistics.fmean(r.get("cached_tokens", 0) for r in rows),
                          "reply_seconds": statistics.fmean(r["seconds"] for r in rows)}
            a = acc[label]
            print(f"  constrained, {'top-' + str(k) + ' (' + offer_mode + ')' if label == 'retrieved' else 'all ' + str(len(tools))}"
                  f" offered: accuracy {pct(a['accuracy'])}, valid {pct(a['valid'])}, replies that call "
                  f"{pct(a['calls'])}; mean prompt {a['prompt_tokens']:.0f} tokens of which {a['cached_tokens']:.0f} "
                  f"reused from the previous request's KV, {a['reply_seconds']:.1f} s per reply")
        out["accuracy"] = acc
        return out
    finally:
        if emb is not None:
            emb.close()


# -- 3. the task graph ----------------------------------------------------------------------------------------

def _box() -> Toolbox:
    def fetch_weather(city: str) -> dict:
        """Weather in a city (a slow web service)."""
        time.sleep(0.4)
        return {"city": city, "temp_c": 10 + len(city)}

    def fetch_calendar(date: str) -> dict:
        """Events on a date (a slow calendar server)."""
        time.sleep(0.4)
        return {"date": date, "events": 3}

    def fetch_news(topic: str) -> dict:
        """Headlines on a topic (a slow news service)."""
        time.sleep(0.4)
        return {"topic": topic, "headlines": 5}

    def summarize(weather_c: int, events: int, headlines: int) -> str:
        """Combine the morning brief."""
        time.sleep(0.05)
        return f"{weather_c} C, {events} events, {headlines} headlines"

    return Toolbox([fetch_weather, fetch_calendar, fetch_news, summarize])


TASKS = [("Oslo", "2026-03-14", "science"), ("Lima", "2026-04-01", "sports"), ("Rome", "2026-05-20", "music"),
         ("Kyiv", "2026-06-30", "tech"), ("Pune", "2026-07-04", "food")]


def graph_nodes(city: str, date: str, topic: str, given: bool) -> list[Node]:
    """A morning brief: three independent fetches, then a join fed by their typed outputs."""
    def n(i, tool, args, task, deps=()):
        return Node(i, tool, args if given else None, task=task, depends_on=deps)
    return [n("w", "fetch_weather", {"city": city}, f"Get the weather in {city}."),
            n("c", "fetch_calendar", {"date": date}, f"Get my calendar for {date}."),
            n("h", "fetch_news", {"topic": topic}, f"Get the news about {topic}."),
            Node("s", "summarize", {"weather_c": "${w.temp_c}", "events": "${c.events}",
                                    "headlines": "${h.headlines}"}, depends_on=("w", "c", "h"))]


def part_graph(model) -> dict:
    box = _box()
    out = {}
    for label, given in (("given arguments", True), ("arguments written by the model", False)):
        walls = {"parallel": [], "sequential": []}
        same = True
        for city, date, topic in TASKS:
            results = {}
            for mode in ("sequential", "parallel"):
                agent = Agent(box, actor=model)
                fill = None if given else agent.fill(f"Morning brief for {city}", [])
                g = run_graph(graph_nodes(city, date, topic, given), box, fill=fill, parallel=mode == "parallel")
                walls[mode].append(g.seconds)
                results[mode] = g.outputs()
            same &= results["parallel"] == results["sequential"]
        par, seq = sum(walls["parallel"]), sum(walls["sequential"])
        print(f"  {label}: {len(TASKS)} tasks x 4 steps, parallel {par:.2f} s vs sequential {seq:.2f} s: "
              f"ratio {par / seq:.2f}x; same results: {same}")
        out[label] = {"parallel_s": par, "sequential_s": seq, "ratio": par / seq, "same_results": same}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m-instruct")
    ap.add_argument("--parts", default="suite,retrieval,graph")
    ap.add_argument("--limit", type=int, default=None, help="a stratified subset of the suite")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--retrieve-mode", default="lexical", choices=("lexical", "hybrid", "embedding"),
                    help="how the offered top-k is ranked in the accuracy-with-retrieval run")
    ap.add_argument("--recall-modes", default="lexical,embedding,hybrid",
                    help="rankings whose top-k recall is measured (lexical alone needs no embedding pass)")
    ap.add_argument("--offer", default="retrieved,all",
                    help="accuracy runs of the retrieval part: the top-k offered, all tools offered (one process "
                         "each can share a --cache file)")
    ap.add_argument("--cache", default=None, metavar="RUNS.jsonl", help="keep scored replies here; resume from it")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=8192,
                    help="context (all 109 tools offered: 7.5k prompt tokens for SmolLM2, 8.3k in Qwen2.5's template)")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    a = ap.parse_args()
    global CACHE
    CACHE = Cache(a.cache)
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured, also in a log file
    parts = set(a.parts.split(","))
    items = subset(fcsuite.items(), a.limit)
    report: dict = {"load_avg_start": os.getloadavg(), "items": len(items), "lexical_recall": lexical_recall(a.k)}
    for name in a.models.split(","):
        t0 = time.perf_counter()
        model = ondevice.load(name, n_ctx=a.ctx, n_threads=a.threads)
        print(f"\n== {model.name} ({model.path.stat().st_size / 1e6:.0f} MB, {model.engine.n_threads} threads, "
              f"load avg {os.getloadavg()[0]:.2f})")
        rep: dict = {}
        try:
            if "suite" in parts:
                rep["suite"] = part_suite(model, items)
            if "retrieval" in parts:
                rep["retrieval"] = part_retrieval(model, items, a.k, a.threads, a.retrieve_mode,
                                                  a.recall_modes.split(","), a.offer.split(","))
            if "graph" in parts:
                rep["graph"] = part_graph(model)
        finally:
            model.close()
        rep["seconds"] = time.perf_counter() - t0
        report[name] = rep
    report["load_avg_end"] = os.getloadavg()
    print(f"\nload average at start {report['load_avg_start'][0]:.2f}, at end {report['load_avg_end'][0]:.2f}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
