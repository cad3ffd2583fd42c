"""A long prompt's KV saved to a file and restored after a restart, vs computing it again: ondevice vs llama-server.

The case it is for: many requests begin with the same long text (a reference document, an agent's tool list, a
system prompt). In one run, same model file, threads and CPU kernels, for each server and round:
  A. a fresh server answers DOC + question 1, then saves its slot (``POST /slots/0?action=save``);
  B. a fresh server restores that file (``?action=restore``) and answers DOC + question 2;
  C. a fresh server answers DOC + question 2 from nothing (the cold figure).
It prints the prompt tokens each server computed (``timings.prompt_n``), its prompt time, the save and restore
times, the request's wall time cold against restore + request, and whether B's answer equals C's (greedy; where
not, the first token's top two probabilities: B computes the question's last tokens as a small batch, which
llama.cpp's CPU kernels compute along another path than C's larger one, as any reuse of a cached prefix does).
Ratios are ondevice / llama-server, medians over rounds; the file of each server is also restored by the other.

Usage: python benchmarks/slot_bench.py [--model PATH] [--threads 2] [--rounds 3] [--doc-tokens 1800]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import default_model, one_of_each

QUESTIONS = ("\n\nQuestion: which statement does this reference describe first?\nAnswer: The",
             "\n\nQuestion: which keyword does this reference explain last?\nAnswer: The")


def doc(n_tokens: int) -> str:
    """Python's own reference text (pydoc_data.topics), about ``n_tokens`` tokens of it (4 characters a token)."""
    from pydoc_data.topics import topics

    text = "Reference:\n\n" + "\n\n".join(topics[k] for k in sorted(topics))
    return text[:4 * n_tokens]


def ask(base: str, prompt: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = httpx.post(base + "/completion", json={"prompt": prompt, "n_predict": 16, "temperature": 0, "n_probs": 2},
                   timeout=600)
    r.raise_for_status()
    return r.json(), time.perf_counter() - t0


def _top2(reply: dict) -> str:
    """The first generated token's two most likely tokens and their probabilities (a near-tie flips greedily)."""
    top = reply["completion_probabilities"][0]["top_logprobs"][:2]
    return " / ".join(f"{t['token']!r} {math.exp(t['logprob']):.3f}" for t in top)


def action(base: str, what: str, filename: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/slots/0?action={what}", json={"filename": filename}, timeout=600)
    r.raise_for_status()
    return r.json(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=1800)
    a = ap.parse_args(argv)
    model = a.model or default_model()
    text = doc(a.doc_tokens)
    folder = Path(tempfile.mkdtemp(prefix="slot_bench_"))
    servers = one_of_each(model, a.threads, ctx=4096, flags=("--slot-save-path", str(folder)))
    names = [s.name for s in servers]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(1, a.rounds + 1):
        for srv in servers:
            file = f"{srv.name}.bin"
            with srv:
                ask(srv.url, text + QUESTIONS[0])
                saved, t_save = action(srv.url, "save", file)
            with srv:
                _, t_restore = action(srv.url, "restore", file)
                warm, t_warm = ask(srv.url, text + QUESTIONS[1])
            with srv:
                cold, t_cold = ask(srv.url, text + QUESTIONS[1])
            row = {"prompt_tokens": cold["tokens_evaluated"], "n_saved": saved["n_saved"],
                   "bytes": saved["n_written"], "cold_prompt_n": cold["timings"]["prompt_n"],
                   "warm_prompt_n": warm["timings"]["prompt_n"], "cold_prompt_ms": cold["timings"]["prompt_ms"],
                   "warm_prompt_ms": warm["timings"]["prompt_ms"], "save_ms": t_save * 1e3,
                   "restore_ms": t_restore * 1e3, "cold_ms": t_cold * 1e3, "warm_ms": (t_restore + t_warm) * 1e3,
                   "same": warm["content"] == cold["content"], "texts": (warm["content"], cold["content"]),
                   "first": [_top2(cold), _top2(warm)]}
            rows[srv.name].append(row)
            print(f"round {rnd} {srv.name}: prompt {row['prompt_tokens']} tokens, saved {row['n_saved']} "
                  f"({row['bytes'] / 2**20:.1f} MiB, {row['save_ms']:.0f} ms); cold: computed {row['cold_prompt_n']} "
                  f"in {row['cold_prompt_ms']:.0f} ms, request {row['cold_ms']:.0f} ms; restored in "
                  f"{row['restore_ms']:.0f} ms, then computed {row['warm_prompt_n']} in "
                  f"{row['warm_prompt_ms']:.0f} ms, "
                  f"restore + request {row['warm_ms']:.0f} ms; same answer as cold: {row['same']}", flush=True)
            if not row["same"]:
                print(f"  answers: restored {row['texts'][0]!r}, cold {row['texts'][1]!r}; first token's top two "
                      f"probabilities: cold {row['first'][0]}, restored {row['first'][1]}")
    if len(servers) == 2:  # each server restores the other's file
        for srv, other in ((servers[0], servers[1]), (servers[1], servers[0])):
            with srv:
                got, _ = action(srv.url, "restore", f"{other.name}.bin")
                warm, _ = ask(srv.url, text + QUESTIONS[1])
            print(f"{srv.name} restores {other.name}'s file: {got['n_restored']} tokens, then computed "
                  f"{warm['timings']['prompt_n']}; answer {warm['content']!r}")
    print("\nmedians over rounds:")
    skip = ("same", "texts", "first")
    med = {n: {k: statistics.median(r[k] for r in rows[n]) for k in rows[n][0] if k not in skip} for n in names}
    for n in names:
        m = med[n]
        print(f"  {n}: cold request {m['cold_ms']:.0f} ms, restore + request {m['warm_ms']:.0f} ms "
              f"({m['cold_ms'] / m['warm_ms']:.1f}x faster); restore {m['restore_ms']:.0f} ms, save {m['save_ms']:.0f} "
              f"ms; answers equal in {sum(r['same'] for r in rows[n])}/{len(rows[n])} rounds")
    if len(names) == 2:
        same = sum(x["texts"] == y["texts"] for x, y in zip(rows[names[0]], rows[names[1]], strict=True))
        print(f"  both servers gave the same restored and cold answers in {same}/{a.rounds} rounds")
        o, p = med[names[0]], med[names[1]]
        print(f"  ondevice / llama-server: cold request {o['cold_ms'] / p['cold_ms']:.2f}x, restore + request "
              f"{o['warm_ms'] / p['warm_ms']:.2f}x, restore {o['restore_ms'] / p['restore_ms']:.2f}x, save "
              f"{o['save_ms'] / p['save_ms']:.2f}x (below 1: ondevice faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
