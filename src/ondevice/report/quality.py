"""Quality vs speed: join eval and bench records on the model variant (sha256) and mark the Pareto front.

Eval records look like ``{model, model_sha256, test: "ppl:<corpus>" | "kld:<corpus>" | "suite:<name>", score |
kld_mean | ppl, file_size}``. Quality is ``score`` (higher is better), ``kld_mean`` for a ``kld:`` test (lower is
better; such a record also carries the model's own ``ppl``, which is not its figure) or ``ppl`` (lower is
better). Speed is the bench decode speed of the same file: the mean t/s of its ``tg`` tests at depth 0
(``tg128`` when there), else of any ok decode test.

``retention`` puts each quantized variant's suite score (per category, with its coverage) next to the F16
of the same family, as SmartBench reports what quantization costs on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bench.record import BenchRecord
from ..eval.record import EvalRecord
from ..store.record import created_time
from .formats import md_row


def _speed(bench: list[BenchRecord]) -> tuple[float | None, str | None]:
    ok = [r for r in bench if r.ok and r.tps_mean is not None]
    for pick in (lambda r: r.test == "tg128",
                 lambda r: r.workload == "tg" and not r.n_depth,
                 lambda r: r.decode_tps_mean is not None):
        rows = [r for r in ok if pick(r)]
        if rows:
            latest = max(reversed(rows), key=lambda r: created_time(r.created))  # a tie: the later record
            value = latest.tps_mean if latest.workload == "tg" else latest.decode_tps_mean
            return value, latest.test
    return None, None


def kld_lower_bound(exact: bool | None, tail_mass: float | None) -> bool:
    """Whether a ``kld:`` record's KLD is a lower bound: only the reference's top-k was kept (``kld_exact``
    False; records before that field: the reference had mass outside its top-k)."""
    return exact is False or (exact is None and bool(tail_mass))


def _quality(e: EvalRecord) -> tuple[float | None, str, bool]:
    """(value, metric name, higher is better)."""
    if e.score is not None:
        return float(e.score), "score", True
    if e.test.startswith("kld:") and e.kld_mean is not None:
        return float(e.kld_mean), "kld", False
    if e.ppl is not None:
        return float(e.ppl), "ppl", False
    return None, "", True


def pareto(points: Sequence[tuple[float, float]], higher_y_better: bool = True) -> list[bool]:
    """Which (speed, quality) points no other point beats on both (faster and better, one strictly)."""
    def better_eq(a, b):  # a at least as good as b on both axes
        qa, qb = (a[1], b[1]) if higher_y_better else (-a[1], -b[1])
        return a[0] >= b[0] and qa >= qb

    def strictly(a, b):
        qa, qb = (a[1], b[1]) if higher_y_better else (-a[1], -b[1])
        return a[0] > b[0] or qa > qb

    return [not any(better_eq(o, p) and strictly(o, p) for j, o in enumerate(points) if j != i)
            for i, p in enumerate(points)]


def quality_vs_speed(records: Sequence[BenchRecord | EvalRecord | dict]) -> list[dict]:
    """One point per (eval test, model variant) that has both an eval and a bench record (typed records or
    their stored dicts).

    Returns dicts: eval_test, model, model_sha256, quality, metric, higher_is_better, tps, speed_test,
    file_size, pareto (True on the front of its eval test), lower_bound (a KLD from the reference's top-k only).
    Eval records without a matching bench run are left out (nothing to plot them against).
    """
    bench: dict[str, list[BenchRecord]] = {}
    evals: list[EvalRecord] = []
    for r in records:
        kind = r.kind if isinstance(r, (BenchRecord, EvalRecord)) else r.get("kind")
        if kind == "eval":
            evals.append(EvalRecord.coerce([r])[0])
        elif kind == "bench" or (kind is None and "tps_mean" in r):
            b = BenchRecord.coerce([r])[0]
            bench.setdefault(b.model_sha256 or "", []).append(b)
    latest: dict[tuple[str, str], EvalRecord] = {}
    for e in evals:  # the newest eval per (test, variant)
        key = (e.test, e.model_sha256 or "")
        if key not in latest or created_time(e.created) >= created_time(latest[key].created):
            latest[key] = e
    points: list[dict] = []
    for (test, sha), e in sorted(latest.items()):
        q, metric, hib = _quality(e)
        tps, speed_test = _speed(bench.get(sha, []))
        if q is None or tps is None or not sha:
            continue
        size = e.file_size or next((b.model_size_bytes for b in bench[sha]), None)
        points.append({"eval_test": test, "model": e.model, "model_sha256": sha, "quality": q,
                       "metric": metric, "higher_is_better": hib, "tps": tps, "speed_test": speed_test,
                       "file_size": size, "pareto": False,
                       "lower_bound": metric == "kld" and kld_lower_bound(e.kld_exact, e.ref_tail_mass_mean)})
    for test in {p["eval_test"] for p in points}:
        group = [p for p in points if p["eval_test"] == test]
        for p, on in zip(group, pareto([(p["tps"], p["quality"]) for p in group], group[0]["higher_is_better"])):
            p["pareto"] = on
    return points


# --- retention against F16 -----------------------------------------------------------------------------

# Suite records compare only when they ran the same items the same way.
_SAME_RUN = ("test", "family_sha256", "limit", "seed", "max_tokens", "temp", "n_ctx")


def retention(records: Sequence[EvalRecord | dict]) -> list[dict]:
    """Each variant's suite score next to its family's F16, as SmartBench reports quantization's cost.

    Eval records of suites (``test`` "suite:*") that carry a lineage (``family_sha256``, written by
    ``ondevice eval``) are grouped by family and run settings (items, reply budget, context window); within
    a group the newest record per variant counts, and the reference is the variant made as ``F16`` (for a
    shipped quantized file: dequantized from it). Returns one dict per variant: eval_test, family, model,
    variant (its quantize type, or "shipped <quant>"), file_size, score, score_skipped_as_0, coverage,
    n_scored, n_items, categories, and retention / category_retention (score ÷ the F16's; None without one).
    """
    groups: dict[tuple, dict[str, EvalRecord]] = {}
    for r in EvalRecord.coerce(records):
        if r.kind != "eval" or not r.is_suite or not r.family_sha256 or r.score is None:
            continue
        key = tuple(getattr(r, k) for k in _SAME_RUN)
        latest = groups.setdefault(key, {})
        sha = r.model_sha256 or ""
        if sha not in latest or created_time(r.created) >= created_time(latest[sha].created):
            latest[sha] = r
    rows: list[dict] = []
    for _key, by_sha in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        refs = [r for r in by_sha.values() if r.variant_type == "F16"]
        ref = max(refs, key=lambda r: created_time(r.created)) if refs else None
        for r in sorted(by_sha.values(), key=lambda r: -(r.file_size or 0)):
            cats = r.categories or {}
            ref_cats = (ref.categories if ref else None) or {}
            rows.append({
                "eval_test": r.test, "family": r.family, "model": r.model,
                "variant": r.variant_type or f"shipped {str(r.quant or '').split(' ')[0]}".strip(),
                "file_size": r.file_size, "score": r.score, "score_skipped_as_0": r.score_skipped_as_0,
                "coverage": r.coverage, "n_scored": r.n_items if r.n_scored is None else r.n_scored,
                "n_items": r.n_items, "n_ctx": r.n_ctx, "limit": r.limit,
                "max_tokens": r.max_tokens, "categories": cats, "ref_model": ref.model if ref else None,
                "retention": _ratio(r.score, ref.score if ref else None),
                "category_retention": {c: _ratio(v, ref_cats.get(c)) for c, v in cats.items()},
            })
    return rows


def _ratio(x: float | None, ref: float | None) -> float | None:
    return None if x is None or not ref else x / ref


def retention_tables(rows: Sequence[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(suite test, header, cells)`` per suite: the one layout of the retention view (Markdown and HTML).
    Category cells read "score (% of the family's F16)"."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    tables = []
    for test in dict.fromkeys(r["eval_test"] for r in rows):
        group = [r for r in rows if r["eval_test"] == test]
        cats = list(dict.fromkeys(c for r in group for c in r["categories"]))
        head = ["family", "variant", "MB", "coverage", "score", "skipped as 0", "vs F16", *cats]
        cells = []
        for r in group:
            row = [str(r["family"]), r["variant"], f"{(r['file_size'] or 0) / 1e6:.0f}",
                   f"{r['n_scored']}/{r['n_items']} ({pct(r['coverage'])})", f"{r['score']:.3f}",
                   "-" if r["score_skipped_as_0"] is None else f"{r['score_skipped_as_0']:.3f}", pct(r["retention"])]
            row += ["-" if r["categories"].get(c) is None else
                    f"{r['categories'][c]:.3f} ({pct(r['category_retention'].get(c))})" for c in cats]
            cells.append(row)
        tables.append((test, head, cells))
    return tables


def retention_markdown(rows: Sequence[dict]) -> str:
    """The retention view as Markdown tables, one per suite."""
    out: list[str] = []
    for test, head, cells in retention_tables(rows):
        out += [f"{test}: retention vs F16 (category cells: score, then % of the family's F16)", "",
                md_row(head), md_row(["---" if i < 2 else "---:" for i in range(len(head))])]
        out += [md_row(row) for row in cells] + [""]
    return "\n".join(out)
