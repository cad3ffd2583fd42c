"""Quality vs speed: join eval and bench records on the model variant (sha256) and mark the Pareto front.

Eval records look like ``{model, model_sha256, test: "ppl:<corpus>" | "suite:<name>", score | ppl,
file_size}``. Quality is ``score`` (higher is better) or ``ppl`` (lower is better). Speed is the bench
decode speed of the same file: the mean t/s of its ``tg`` tests at depth 0 (``tg128`` when there), else
of any ok decode test.
"""

from __future__ import annotations

from collections.abc import Sequence


def _speed(bench: list[dict]) -> tuple[float | None, str | None]:
    ok = [r for r in bench if r.get("status", r.get("_status")) == "ok" and r.get("tps_mean") is not None]
    for pick in (lambda r: r.get("test") == "tg128",
                 lambda r: r.get("workload") == "tg" and not r.get("n_depth"),
                 lambda r: r.get("decode_tps_mean") is not None):
        rows = [r for r in ok if pick(r)]
        if rows:
            latest = max(rows, key=lambda r: r.get("created") or "")
            value = latest["tps_mean"] if latest.get("workload") == "tg" else latest["decode_tps_mean"]
            return value, latest["test"]
    return None, None


def _quality(e: dict) -> tuple[float | None, str, bool]:
    """(value, metric name, higher is better)."""
    if e.get("score") is not None:
        return float(e["score"]), "score", True
    if e.get("ppl") is not None:
        return float(e["ppl"]), "ppl", False
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


def quality_vs_speed(records: Sequence[dict]) -> list[dict]:
    """One point per (eval test, model variant) that has both an eval and a bench record.

    Returns dicts: eval_test, model, model_sha256, quality, metric, higher_is_better, tps, speed_test,
    file_size, pareto (True on the front of its eval test). Eval records without a matching bench run
    are left out (nothing to plot them against).
    """
    bench: dict[str, list[dict]] = {}
    evals: list[dict] = []
    for r in records:
        kind = r.get("kind")
        if kind == "eval":
            evals.append(r)
        elif kind == "bench" or (kind is None and "tps_mean" in r):
            bench.setdefault(r.get("model_sha256") or "", []).append(r)
    latest: dict[tuple[str, str], dict] = {}
    for e in evals:  # the newest eval per (test, variant)
        key = (e.get("test", ""), e.get("model_sha256") or "")
        if key not in latest or (e.get("created") or "") >= (latest[key].get("created") or ""):
            latest[key] = e
    points: list[dict] = []
    for (test, sha), e in sorted(latest.items()):
        q, metric, hib = _quality(e)
        tps, speed_test = _speed(bench.get(sha, []))
        if q is None or tps is None or not sha:
            continue
        size = e.get("file_size") or next((b.get("model_size_bytes") for b in bench[sha]), None)
        points.append({"eval_test": test, "model": e.get("model"), "model_sha256": sha, "quality": q,
                       "metric": metric, "higher_is_better": hib, "tps": tps, "speed_test": speed_test,
                       "file_size": size, "pareto": False})
    for test in {p["eval_test"] for p in points}:
        group = [p for p in points if p["eval_test"] == test]
        for p, on in zip(group, pareto([(p["tps"], p["quality"]) for p in group], group[0]["higher_is_better"])):
            p["pareto"] = on
    return points
