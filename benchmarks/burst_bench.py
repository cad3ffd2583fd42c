"""A burst of distinct prompts through the batch generator (no HTTP): TTFT and wall time per admission setting.

First what one ``llama_decode`` of k prompts costs (k = 1, 2, 4, 8; per prompt: equal means batching prompts
buys nothing), then bursts: one request alone for a step (as the first of a burst reaches a server), then
the other n - 1 at once; TTFT p50 / mean of the burst and the time until every request has its tokens, for
each admission setting: ``B`` is ``prefill_batch`` alone, ``B:S`` adds ``prefill_share`` S (the server's
default is ``32:0.5``), ``none`` takes all waiting prompts in one step. Settings alternate round by round so
host drift hits each alike.

Usage: python benchmarks/burst_bench.py [--streams 8] [--tokens 64] [--rounds 3] [--batches none,32,32:0.5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def main(argv: list[str] | None = None) -> int:
    from ondevice.engine.base import EngineConfig
    from ondevice.engine.generator import BatchGenerator, Request
    from ondevice.engine.llama import LlamaEngine
    from ondevice.engine.records import Generation, Sampling
    from ondevice.models import resolve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="none,32,32:0.5", help="admission settings: none, B or B:S (see above)")
    args = ap.parse_args(argv)
    n = args.streams
    batches = args.batches.split(",")
    eng = LlamaEngine(resolve(args.model).path, EngineConfig(n_ctx=1024 * n, n_threads=args.threads, n_batch=512,
                                                             n_seq_max=n))
    toks = eng.tokenize(f"(00000000) {PROMPT}")
    cost: dict[int, list[float]] = {}
    for _ in range(5):
        for k in (1, 2, 4, 8):
            eng.reset()
            t0 = time.perf_counter()
            eng.decode_batch([(t, j, s, j == len(toks) - 1) for s in range(k) for j, t in enumerate(toks)])
            cost.setdefault(k, []).append(time.perf_counter() - t0)
    print(f"one llama_decode of k prompts of {len(toks)} tokens (median of 5), ms per prompt: "
          + ", ".join(f"k={k}: {statistics.median(v) * 1e3 / k:.1f}" for k, v in cost.items()))

    def burst(setting: str):
        b, _, share = setting.partition(":")
        gen = BatchGenerator(eng, prefill_batch=None if b == "none" else int(b), prefill_share=float(share or 0))
        eng.reset()
        gen.reset()
        reqs = [Request(tokens=eng.tokenize(f"({uuid.uuid4().hex[:8]}) {PROMPT}"),
                        sampling=Sampling(temp=0, max_tokens=args.tokens, ignore_eos=True)) for _ in range(n)]
        t0, first = time.perf_counter(), {}
        gen.insert(reqs[0])
        events = gen.step()
        for r in reqs[1:]:
            gen.insert(r)
        while True:
            for r, ev in events:
                if isinstance(ev, Generation):
                    first.setdefault(id(r), time.perf_counter() - t0)
            if not gen.busy:
                break
            events = gen.step()
        tt = sorted(first.values())
        return tt[round(0.5 * (len(tt) - 1))], statistics.mean(tt), tt[-1], time.perf_counter() - t0

    res: dict = {b: [] for b in batches}
    for rnd in range(args.rounds):
        for b in batches if rnd % 2 == 0 else batches[::-1]:
            res[b].append(burst(b))
    print(f"\nburst of {n} distinct prompts, {args.tokens} tokens each, {args.threads} threads; per round:")
    print("| admission | TTFT p50 ms | TTFT mean ms | last TTFT ms | wall s |")
    print("|---|---|---|---|---|")
    for b, rows in res.items():
        col = [" / ".join(f"{r[i] * (1e3 if i < 3 else 1):.{0 if i < 3 else 2}f}" for r in rows) for i in range(4)]
        print(f"| {b if b != 'none' else 'none (all at once)'} | " + " | ".join(col) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
