"""The cascade's deferral curves in ``ondevice report``: quality vs share deferred, ours vs random vs oracle.

Reads the ``cascade:<suite>`` eval records that ``ondevice eval --cascade URL`` stores (see
``ondevice.eval.cascade_curve``); the newest per (device model, cloud model, suite, split) is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..store.record import created_time
from . import svg
from .formats import md_row


def latest(records: Sequence[dict]) -> list[dict]:
    """The newest cascade record per (device sha256, cloud model, test, split)."""
    best: dict[tuple, dict] = {}
    for r in records:
        if not str(r.get("test", "")).startswith("cascade:") or "curve" not in r:
            continue
        key = (r.get("model_sha256"), r.get("cloud_model"), r.get("test"), r.get("split"))
        if key not in best or created_time(r.get("created")) >= created_time(best[key].get("created")):
            best[key] = r
    return list(best.values())


def _title(r: dict) -> str:
    return f"{r['test']} ({r.get('split', 'all')}): {r.get('model')} -> {r.get('cloud_model')}"


def rows(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the summary table: one row per cascade record."""
    head = ["cascade", "n", "device", "cloud", "at 40% deferred", "of cloud", "AUC ours", "AUC random",
            "AUC oracle", "gain", "device ms", "cloud ms"]
    out = []
    for r in latest(records):
        c, a = r["curve"], r.get("at_40") or {}
        gain = "-" if c.get("auc_gain") is None else f"{c['auc_gain']:.2f}"
        out.append([_title(r), str(c["n"]), f"{c['device_score']:.3f}", f"{c['cloud_score']:.3f}",
                    f"{a.get('quality', 0):.3f}", "-" if a.get("of_cloud") is None else f"{a['of_cloud']:.1%}",
                    f"{c['auc']['confidence']:.3f}", f"{c['auc']['random']:.3f}", f"{c['auc']['oracle']:.3f}",
                    gain, f"{c['device_latency_s'] * 1e3:.0f}", f"{c['cloud_latency_s'] * 1e3:.0f}"])
    return head, out


def markdown(records: Sequence[dict]) -> str:
    head, cells = rows(records)
    if not cells:
        return ""
    lines = [md_row(head), md_row(["---"] * len(head)), *(md_row(c) for c in cells)]
    return "\n".join(lines) + "\n"


def plot(r: dict) -> str:
    """Quality vs % deferred: confidence, random and oracle orderings."""
    c = r["curve"]
    xs = [100 * s for s in c["shares"]]
    series = {f"{name} (AUC {c['auc'][name]:.3f})": [(x, q, None) for x, q in zip(xs, c[name]["quality"])]
              for name in ("confidence", "random", "oracle")}
    return svg.line_chart(series, _title(r), "% of requests deferred to the cloud", "mean item score")


def html(records: Sequence[dict]) -> str:
    """The report's cascade section ('' when there are no cascade records)."""
    recs = latest(records)
    if not recs:
        return ""
    head, cells = rows(recs)
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in row) + "</tr>" for row in cells)
    figs = "".join(f"<figure>{plot(r)}</figure>" for r in recs)
    return (f"<h2>Device → cloud cascade</h2><table><tr>{th}</tr>{body}</table><div class='plots'>{figs}</div>"
            "<p class='note'>Deferring the least confident items first (confidence), a random subset (its exact "
            "expectation) and the items where the cloud gains most (oracle). Gain = (AUC ours - random) / "
            "(oracle - random). Latency: the device answers every request; a deferred one adds the cloud's "
            "time. From <code>ondevice eval --cascade URL --suite ...</code>.</p>")


def run_report(store, args) -> int:
    """``ondevice report --cascade``: the table on stdout and an HTML page with the curves."""
    import sys

    from ..errors import InvalidArgument
    from ..models.store import atomic_write, home
    from .write import check_report_path, say_replaced

    recs = latest(store.records("eval"))
    if not recs:  # (the CLI says so first, as every report view says an empty store)
        raise InvalidArgument("no cascade records stored yet; run `ondevice eval --cascade URL --suite rewrite`")
    from pathlib import Path

    out = Path(home() / "reports" / "cascade.html" if not args.html_path else args.html_path)
    # a file there that is no ondevice page is kept (refused before the table); an earlier cascade page is replaced
    earlier = check_report_path(out, "--html" if args.html_path else None, "report")
    sys.stdout.write(markdown(recs))
    from .html import CSS, GENERATOR

    with atomic_write(out, "w", encoding="utf-8") as f:  # makes the folder, or names why it cannot
        f.write(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{GENERATOR}<title>ondevice cascade"
                f"</title><style>{CSS}</style></head><body><h1>ondevice cascade report</h1>{html(recs)}"
                f"</body></html>\n")
    if earlier:
        say_replaced(out, "report")
    print(f"\nreport: {out}")
    return 0
