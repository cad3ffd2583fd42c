"""`n` choices of one long prompt: `ondevice serve` vs llama-server, one request each, same model and threads.

A request with ``n`` > 1 should compute its prompt once: the other choices wait for that slot and copy its KV
and the logits after it (ondevice's generator; llama-server's ``n_cmpl`` children do the same). Each round
sends a fresh prompt (a random tag, then shop notes: ~600 tokens in all, so no cache helps), non-streamed,
``max_tokens`` tokens per choice at temperature 0.9, to each server in turn (order alternating), for n=1 and
n=``--n``. Printed: the median wall time per server and n, and ondevice / llama-server per round (median
[min, max]); n=K / n=1 shows what the extra choices cost (about K times the prompt if it were computed per
choice).

    python benchmarks/n_choices_bench.py [--n 4] [--rounds 5] [--tokens 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ensure_tool, kernel_match
from serve_bench import Server, default_model, free_port

NOTES = " ".join(f"Shelf {i} holds {i * 3} boxes of tea and {i % 7} tins of biscuits." for i in range(30))


def once(srv: Server, n: int, tokens: int) -> float:
    prompt = f"[{uuid.uuid4().hex[:8]}] Shop notes: {NOTES}\nSummary:"
    t0 = time.perf_counter()
    r = httpx.post(srv.url + "/v1/completions", timeout=600, json={
        "prompt": prompt, "n": n, "max_tokens": tokens, "temperature": 0.9, "seed": 1, **srv.extra})
    r.raise_for_status()
    assert len(r.json()["choices"]) == n, r.text[:300]
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    model = a.model or default_model()
    km = kernel_match(model)
    km.apply()
    par = str(max(4, a.n))
    p1, p2 = free_port(), free_port()
    servers = [Server("ondevice", [sys.executable, "-m", "ondevice.cli", "serve", "-m", model, "--port", str(p1),
                                   "-np", par, "-c", "1024", "-t", a.threads, "--no-embeddings"], p1, {}),
               Server("llama-server", [str(ensure_tool("llama-server")), "-m", model, "--port", str(p2), "-np", par,
                                       "-c", str(int(par) * 1024), "-t", a.threads, "-tb", a.threads,
                                       km.server_flag], p2, {})]
    walls: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        for srv in servers:
            stack.enter_context(srv)
            once(srv, 1, 2)  # warm-up
        for rnd in range(a.rounds):
            for srv in servers if rnd % 2 == 0 else servers[::-1]:
                for n in (1, a.n):
                    walls.setdefault((srv.name, n), []).append(once(srv, n, a.tokens))
    print(f"\nmodel {Path(model).name}, {a.threads} threads, a fresh ~600-token prompt per request, "
          f"{a.tokens} tokens per choice, {a.rounds} rounds")
    for n in (1, a.n):
        od, ls = walls[("ondevice", n)], walls[("llama-server", n)]
        ratios = [x / y for x, y in zip(od, ls)]
        print(f"  n={n}: ondevice {statistics.median(od) * 1e3:6.0f} ms, llama-server "
              f"{statistics.median(ls) * 1e3:6.0f} ms; ondevice / llama-server {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}]")
    for name in ("ondevice", "llama-server"):
        k = statistics.median(walls[(name, a.n)]) / statistics.median(walls[(name, 1)])
        print(f"  {name}: n={a.n} takes {k:.2f}x the time of n=1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
