"""Quality next to speed for the embedded models and variants made by ``ondevice quantize``.

SmolLM2-135M-Instruct: the shipped Q4_1, and F16 (dequantized from that Q4_1: the reference for KLD),
Q8_0, Q4_0, Q4_K_M made from the F16. Gemma-3-270M (base): its shipped Q4_K_M, and F16/Q8_0 made from it.
For each: PPL and KLD vs the F16 of the same family (llama-perplexity conventions, ``ondevice.evaluate``),
the assistant-en score (``--limit`` items, stated), decode tok/s (tg greedy through the engine, after a
short prompt) and file size. Every measurement is also recorded in the store (kind "eval").

    python benchmarks/quality_table.py --quick        # ctx 128 x 4 chunks, 14 suite items, tg32
    python benchmarks/quality_table.py                # ctx 512 x 20 chunks, 42 suite items, tg64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import ondevice
from ondevice.errors import OndeviceError
from ondevice.eval.api import evaluate
from ondevice.models import resolve
from ondevice.quant import quantize

FAMILIES = {
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct-f16", ["Q8_0", "Q4_0", "Q4_K_M"]),
    "gemma": ("gemma3-270m", "gemma3-270m-f16", ["Q8_0"]),
}


def ensure_variant(source: str, type_name: str, name: str, allow_requantize: bool = False) -> str:
    """The stored variant ``name``, made now unless one made from ``source`` as ``type_name`` exists."""
    try:
        ref = resolve(name)
        prov = (ref.provenance or {}).get("provenance", {})
        if prov.get("type") == type_name and prov.get("source") == source:
            return name
    except OndeviceError:
        pass
    t0 = time.perf_counter()
    quantize(source, type_name, name=name, allow_requantize=allow_requantize, force=True)
    print(f"  made {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return name


def decode_tps(name: str, n: int, threads: int | None, reps: int = 3) -> tuple[float, float]:
    """tg<n>: greedy decode tok/s after a short prompt, mean and std over ``reps`` runs."""
    model = ondevice.load(name, n_ctx=256, n_threads=threads)
    try:
        rates = []
        for _ in range(reps):
            model.reset()
            res = model.generate("The history of", chat_template=False, temp=0, max_tokens=n, ignore_eos=True)
            rates.append(res.last.generation_tps)
        return statistics.fmean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0
    finally:
        model.close()


def _row(v: str, by: dict, tps: float, sd: float) -> str:
    p, k, s = by["ppl"], by["kld"], by["suite"]
    return (f"| {v:30s} | {p.file_size / 1e6:7.1f} | {p.ppl:7.3f} ± {p.ppl_err:6.3f} | {k.dppl:+8.3f} "
            f"| {k.kld_mean:.5f} ± {k.kld_err:.5f} | {k.kld_p99:7.4f} | {100 * k.top1_agree:7.2f} "
            f"| {s.score:7.3f} | {tps:6.1f} ± {sd:4.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", default="smollm2,gemma")
    ap.add_argument("--corpus", default="pydoc")
    ap.add_argument("--ctx", type=int)
    ap.add_argument("--chunks", type=int)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--tg", type=int)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    ctx = a.ctx or (128 if a.quick else 512)
    chunks = a.chunks or (4 if a.quick else 20)
    limit = a.limit or (14 if a.quick else 42)
    max_tokens = a.max_tokens or (64 if a.quick else 128)
    tg = a.tg or (32 if a.quick else 64)
    session = f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for fam in a.families.split(","):
        shipped, f16, types = FAMILIES[fam]
        try:
            resolve(shipped)
        except OndeviceError as e:
            print(f"skip {fam}: {e}", file=sys.stderr)
            continue
        print(f"{fam}: preparing variants", file=sys.stderr)
        variants = [shipped, ensure_variant(shipped, "F16", f16, allow_requantize=True)]
        base = f16.removesuffix("-f16")
        variants += [ensure_variant(f16, t, f"{base}-{t.lower()}") for t in types]
        for v in variants:
            print(f"{fam}: {v}", file=sys.stderr)
            recs = evaluate(v, ref=f16, corpus=a.corpus, ctx=ctx, chunks=chunks, suite="assistant-en", limit=limit,
                            max_tokens=max_tokens, threads=a.threads, session=session)
            by = {r.test.split(":")[0]: r for r in recs}
            tps, tps_sd = decode_tps(v, tg, a.threads)
            rows.append((fam, v, by, tps, tps_sd))
            print(f"  {_row(v, by, tps, tps_sd)}", file=sys.stderr, flush=True)  # partial results as they come
    k, s = rows[0][2]["kld"], rows[0][2]["suite"]  # EvalRecords
    print(f"\ncorpus {k.corpus['name']} (sha256 {k.corpus['sha256'][:12]}, {k.corpus['chars']} chars, "
          f"{k.corpus_tokens} SmolLM2 tokens); {k.n_chunks} chunks x ctx {k.n_ctx} = {k.n_scored} "
          f"scored tokens; KLD vs the family's F16 from its top-{k.topk} (lower bound); assistant-en "
          f"--limit {s.limit} ({s.n_items} items, greedy, max {max_tokens} tokens); tg{tg} greedy decode")
    hdr = (f"| {'model':30s} | {'size MB':>7s} | {'PPL':>16s} | {'ΔPPL':>8s} | {'KLD mean':>17s} | {'KLD p99':>7s} "
           f"| {'top-1 %':>7s} | {'assist.':>7s} | {'tg tok/s':>12s} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for _fam, v, by, tps, sd in rows:
        print(_row(v, by, tps, sd))
    print(f"\nstored in session {session}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
