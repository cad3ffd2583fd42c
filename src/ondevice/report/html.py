"""A self-contained HTML report of bench (and eval) records: tables and inline-SVG plots, no dependency."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from . import svg
from .cascade import html as cascade_html
from .formats import columns
from .quality import quality_vs_speed, retention, retention_tables

CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:16px}
.note{color:#666;font-size:12px}figure{margin:0}code{background:#f3f3f3;padding:1px 3px}"""


def _ok(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def _series_label(r: dict, with_threads: bool = True) -> str:
    return f"{r.get('model')}" + (f" t={r.get('threads')}" if with_threads else "")


def plot_prompt_length(records: Sequence[dict]) -> str | None:
    """Prefill tok/s vs prompt length, one line per model and thread count (pp, pg and chat prompts)."""
    series: dict[str, list] = {}
    for r in _ok(records):
        if r.get("prefill_tps_mean") is None or r.get("n_depth"):
            continue
        if r.get("workload") == "chat" and r.get("prompt_lengths"):
            n = sum(r["prompt_lengths"]) / len(r["prompt_lengths"])
        elif r.get("n_prompt"):
            n = r["n_prompt"]
        else:
            continue
        series.setdefault(_series_label(r), []).append((n, r["prefill_tps_mean"], r.get("prefill_tps_std")))
    if not series:
        return None
    return svg.line_chart(series, "Prefill throughput vs prompt length", "prompt tokens", "prefill tok/s",
                          log_x=True)


def plot_threads(records: Sequence[dict]) -> str | None:
    series: dict[str, list] = {}
    for r in _ok(records):
        if r.get("tps_mean") is None:
            continue
        series.setdefault(f"{r.get('model')} {r.get('test')}", []).append(
            (r["threads"], r["tps_mean"], r.get("tps_std")))
    if not series:
        return None
    return svg.line_chart(series, "Thread scaling", "threads", "tok/s (test's t/s)")


def plot_memory(records: Sequence[dict]) -> str | None:
    """Peak RSS per model, split into file-backed (mostly the mmapped model) and anonymous memory."""
    best: dict[str, dict] = {}
    for r in _ok(records):
        if r.get("rss_file_bytes") is None:
            continue
        m = str(r.get("model"))
        if m not in best or (r.get("peak_rss_bytes") or 0) > (best[m].get("peak_rss_bytes") or 0):
            best[m] = r
    if not best:
        return None
    cats = list(best)
    mib = 1 << 20
    return svg.bar_chart(cats, {"file-backed (model mmap)": [best[c]["rss_file_bytes"] / mib for c in cats],
                                "anonymous (KV, buffers, runtime)": [best[c]["rss_anon_bytes"] / mib for c in cats]},
                         "Memory per model (RSS at peak)", "MiB", stacked=True)


def plot_roofline(records: Sequence[dict]) -> str | None:
    rows = [r for r in _ok(records) if r.get("roofline_pct") is not None]
    if not rows:
        return None
    cats = [f"{r['test']} t={r['threads']}" for r in rows]
    models = sorted({str(r["model"]) for r in rows})
    groups = {m: [r["roofline_pct"] if str(r["model"]) == m else None for r in rows] for m in models}
    return svg.bar_chart(cats, groups, "Share of the roofline bound achieved", "% of roofline")


def plot_quality(points: list[dict]) -> list[str]:
    out = []
    for test in sorted({p["eval_test"] for p in points}):
        group = [p for p in points if p["eval_test"] == test]
        metric = group[0]["metric"]
        arrow = "higher is better" if group[0]["higher_is_better"] else "lower is better"
        out.append(svg.scatter([(p["tps"], p["quality"], str(p["model"]), p["pareto"]) for p in group],
                               f"Quality vs speed: {test}", "decode tok/s", f"{metric} ({arrow})"))
    return out


def retention_html(rows: list[dict]) -> str:
    """Suite scores per category next to the family's F16 (see ``quality.retention``), one table per suite."""
    out = []
    for test, head, cells in retention_tables(rows):
        th = "".join(f"<th>{escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        out.append(f"<h3>{escape(test)}: retention vs F16</h3><table><tr>{th}</tr>{body}</table>")
    return "".join(out) + ("<p class='note'>Score over the items that fit the context window (coverage); "
                           "'skipped as 0' scores the others 0. Category cells: score (% of the family's F16).</p>"
                           if out else "")


def _table(records: Sequence[dict]) -> str:
    cols = columns(records)
    head = "".join(f"<th>{escape(c[0])}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{escape(c[1](r))}</td>" for c in cols) + "</tr>" for r in records)
    return f"<table><tr>{head}</tr>{body}</table>"


def _device(records: Sequence[dict]) -> str:
    meta = next((r.get("meta") for r in records if r.get("meta")), None) or {}
    build = meta.get("llama_build")
    items = [("CPU", meta.get("cpu_model")), ("flags", " ".join(meta.get("cpu_flags") or [])),
             ("cores", f"{meta.get('physical_cores')} physical / {meta.get('logical_cores')} logical"),
             ("memory", f"{(meta.get('memory_total_bytes') or 0) / 2**30:.1f} GiB"),
             ("kernel", meta.get("kernel")), ("governor", meta.get("governor")),
             ("load before first run", meta.get("load_avg_before")), ("ondevice", meta.get("ondevice")),
             ("llama.cpp", build if isinstance(build, str) else json.dumps(build))]
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td style='text-align:left'>{escape(str(v))}</td></tr>"
                               for k, v in items) + "</table>"


def build_html(records: Sequence[dict], eval_records: Sequence[dict] = (), title: str = "ondevice bench report",
               sessions: Sequence[str] = ()) -> str:
    """The whole page as a string (write it with an atomic write)."""
    bench = [r for r in records if r.get("kind", "bench") == "bench"]
    plots = [p for p in (plot_prompt_length(bench), plot_threads(bench), plot_memory(bench), plot_roofline(bench))
             if p]
    points = quality_vs_speed([*bench, *({**e, "kind": "eval"} for e in eval_records)])
    qplots = plot_quality(points)
    notes = []
    if any(r.get("energy_method") == "estimated" for r in bench):
        notes.append("Energy is <b>estimated</b> (CPU seconds x watts per core), not measured: RAPL counters "
                     "are not readable here. Cells marked (est.).")
    if any(r.get("workload") in ("pp", "tg", "pg") for r in bench):
        notes.append("pp/tg/pg tests use random token ids, as llama-bench does; chat uses real prompts.")
    if any(r.get("roofline") for r in bench):
        r0 = next(r["roofline"] for r in bench if r.get("roofline"))
        notes.append(f"Roofline from the built-in probe: {r0['bandwidth_gbs']:.1f} GB/s "
                     f"({escape(r0['probe']['bandwidth_method'])}), {r0['peak_gflops']:.1f} GFLOP/s "
                     f"({escape(r0['probe']['compute_method'])}). % = time at the bound / measured time.")
    quality = ("<h2>Quality vs speed</h2><div class='plots'>" + "".join(f"<figure>{q}</figure>" for q in qplots)
               + "</div>") if qplots else (
        "<h2>Quality vs speed</h2><p class='note'>No eval records share a model sha256 with these bench runs; "
        "run <code>ondevice eval</code> on the same model files to fill this view.</p>")
    quality += retention_html(retention(eval_records))
    quality += cascade_html(eval_records)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{CSS}</style></head>
<body><h1>{escape(title)}</h1>
<p class="note">Generated {when} from {len(bench)} bench records; sessions: {escape(', '.join(sessions) or '-')}</p>
<h2>Device</h2>{_device(bench)}
<h2>Results</h2>{_table(bench) if bench else '<p>No bench records.</p>'}
{''.join(f'<p class="note">{n}</p>' for n in notes)}
<h2>Plots</h2><div class="plots">{''.join(f'<figure>{p}</figure>' for p in plots) or '<p>Nothing to plot.</p>'}</div>
{quality}
</body></html>
"""
