"""A self-contained HTML report of bench (and eval) records: tables and inline-SVG plots, no dependency."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from .. import __version__
from ..bench.record import BenchRecord
from . import machines, svg
from .cascade import html as cascade_html
from .formats import ROOF_NOTE, columns, energy_notes, fp32_compute, noise_note
from .quality import quality_vs_speed, retention, retention_tables

# what marks a page as ondevice's own: an existing file that has it (or the head of the pages written before it was
# added: write.is_report) is replaced by a new report; any other file at the path is refused (write.check_report_path)
GENERATOR_MARK = '<meta name="generator" content="ondevice'
GENERATOR = f'{GENERATOR_MARK} {__version__}">'
CSS = """body{font-family:sans-serif;margin:2em;max-width:1600px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
.note{color:#666;font-size:12px}figure{margin:0;min-width:0}code{background:#f3f3f3;padding:1px 3px}
.summary{font-size:15px;background:#f6f8fa;border-left:4px solid #1f77b4;padding:8px 12px}
.warn{border-left-color:#d62728}tr.noisy td{background:#fdecea}"""


def _ok(records: Sequence[BenchRecord | dict]) -> list[BenchRecord]:
    return [r for r in BenchRecord.coerce(records) if r.ok]


def _series_label(r: BenchRecord, with_threads: bool = True) -> str:
    return f"{r.model}" + (f" t={r.threads}" if with_threads else "")


def _curves(series: dict[str, list]) -> bool:
    """Whether any series has two x values: a single point per line is a number, not a curve."""
    return any(len({p[0] for p in pts}) > 1 for pts in series.values())


def plot_prompt_length(records: Sequence[BenchRecord | dict]) -> str | None:
    """Prefill tok/s vs prompt length, one line per model and thread count.

    Only pp and pg tests: their prompts have one length each. The chat test's prompts vary in length
    (its average is not a prompt length) and it prefills on top of a conversation, so it is left out.
    """
    series: dict[str, list] = {}
    for r in _ok(records):
        if r.prefill_tps_mean is None or r.n_depth or r.workload not in ("pp", "pg"):
            continue
        if r.n_prompt:
            series.setdefault(_series_label(r), []).append((r.n_prompt, r.prefill_tps_mean, r.prefill_tps_std))
    if not _curves(series):
        return None
    return svg.line_chart(series, "Prefill throughput vs prompt length", "prompt tokens", "prefill tok/s",
                          log_x=True)


def plot_threads(records: Sequence[BenchRecord | dict]) -> str | None:
    series: dict[str, list] = {}
    for r in _ok(records):
        if r.tps_mean is None:
            continue
        series.setdefault(f"{r.model} {r.test}", []).append((r.threads, r.tps_mean, r.tps_std))
    if not _curves(series):
        return None
    return svg.line_chart(series, "Thread scaling", "threads", "tok/s (test's t/s)")


def plot_memory(records: Sequence[BenchRecord | dict]) -> str | None:
    """Peak RSS per model: the model file's mapped pages, other file-backed pages (shared libraries:
    llama.cpp, numpy, Python) and anonymous memory. Records made before the model's own pages were
    measured show file-backed memory as one part, labelled as what it holds."""
    best: dict[str, BenchRecord] = {}
    for r in _ok(records):
        if r.rss_file_bytes is None:
            continue
        m = str(r.model)
        if m not in best or (r.peak_rss_bytes or 0) > (best[m].peak_rss_bytes or 0):
            best[m] = r
    if not best:
        return None
    cats = list(best)
    mib = 1 << 20
    anon = {"anonymous (KV cache, compute buffers, Python)": [(best[c].rss_anon_bytes or 0) / mib for c in cats]}
    if all(best[c].rss_model_bytes is not None for c in cats):
        model = [best[c].rss_model_bytes / mib for c in cats]
        parts = {"model file (mmap)": model,
                 "other files (shared libraries)": [max(0.0, best[c].rss_file_bytes / mib - m)
                                                    for c, m in zip(cats, model)]}
    else:
        parts = {"file-backed (model mmap + shared libraries)": [best[c].rss_file_bytes / mib for c in cats]}
    return svg.bar_chart(cats, parts | anon, "Memory per model (RSS at peak)", "MiB", stacked=True)


def plot_roofline(records: Sequence[BenchRecord | dict]) -> str | None:
    rows = [r for r in _ok(records) if r.roofline_pct is not None]
    if not rows:
        return None
    cats = [f"{r.test} t={r.threads}" + (" (fp32 compute)" if fp32_compute(r) else "") for r in rows]
    models = sorted({str(r.model) for r in rows})
    groups = {m: [r.roofline_pct if str(r.model) == m else None for r in rows] for m in models}
    return svg.bar_chart(cats, groups, "Share of the roofline bound achieved", "% of roofline (compute: of fp32 roof)")


def plot_quality(points: list[dict]) -> list[str]:
    out = []
    for test in sorted({p["eval_test"] for p in points}):
        group = [p for p in points if p["eval_test"] == test]
        metric = group[0]["metric"]
        arrow = "higher is better" if group[0]["higher_is_better"] else "lower is better"
        # a KLD from the reference's top-k only is a lower bound: its label says so
        out.append(svg.scatter([(p["tps"], p["quality"], str(p["model"]) + " (KLD >=)" * bool(p.get("lower_bound")),
                                 p["pareto"]) for p in group],
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


def _table(records: Sequence[BenchRecord]) -> str:
    cols = columns(records)
    head = "".join(f"<th>{escape(c[0])}</th>" for c in cols)

    def row(r: BenchRecord) -> str:
        attrs = f" class='noisy' title='{escape('; '.join(r.noise), quote=True)}'" if r.noisy else ""
        return f"<tr{attrs}>" + "".join(f"<td>{escape(c[1](r))}</td>" for c in cols) + "</tr>"

    return f"<table><tr>{head}</tr>{''.join(row(r) for r in records)}</table>"


def summary(records: Sequence[BenchRecord | dict]) -> tuple[str, bool]:
    """(one line per model: its headline figures and the machine; whether to mark it: a record is noisy, or
    the records come from several machines or llama.cpp builds, each line then naming its own)."""
    records = BenchRecord.coerce(records)
    ok = _ok(records)
    lines = []
    mixed = len(machines.distinct(records)) > 1
    group = (lambda r: (str(r.model), machines.identity(r))) if mixed else (lambda r: (str(r.model), None))
    for m, ident in dict.fromkeys(group(r) for r in ok):
        rs = [r for r in ok if group(r) == (m, ident)]
        bits = []
        for wl, what in (("tg", "decode"), ("pp", "prefill")):
            cand = [r for r in rs if r.workload == wl and not r.n_depth and r.tps_mean]
            if cand:
                b = max(cand, key=lambda r: r.tps_mean)
                bits.append(f"{what} {b.tps_mean:.1f} tok/s ({b.test}, t={b.threads})")
        chat = [r for r in rs if r.workload == "chat" and r.ttft_s_mean is not None]
        if chat:
            bits.append(f"chat TTFT {min(r.ttft_s_mean for r in chat) * 1e3:.0f} ms")
        rss = [r.peak_rss_bytes for r in rs if r.peak_rss_bytes]
        if rss:
            bits.append(f"peak RSS {max(rss) / 2**20:.0f} MiB")
        on = f" on {ident[0]}, {ident[1]}" if ident else ""
        lines.append(f"<b>{escape(m)}</b>{escape(on)}: " + escape(", ".join(bits) or "no throughput figures"))
    meta = next((r.meta for r in records if r.meta), None) or {}
    where = f" on {meta.get('cpu_model')} ({meta.get('physical_cores')} cores)" if meta.get("cpu_model") else ""
    if mixed:
        where = (f" on {len(machines.distinct(records))} different machines or llama.cpp builds (each line names "
                 f"its own; figures from different ones measure the machines, not only the configurations)")
    noisy = [r for r in ok if r.noisy]
    head = f"{len(ok)} of {len(records)} runs ok{escape(where)}."
    failed = {f"{r.test}: {r.error}" for r in records if r.status == "error" and r.error}
    if failed:  # the cause, once per distinct one (a failed load fails every test of its configuration alike)
        head += "<br>Failed: " + "; ".join(escape(f) for f in sorted(failed)[:5]) + (
            f" (and {len(failed) - 5} more)" if len(failed) > 5 else "")
    if noisy:
        loads = [r.load for r in noisy if r.load is not None]
        head += (f" <b>{len(noisy)} noisy</b> (marked (!) below"
                 + (f"; other processes kept up to {max(loads):.2f} cores busy" if loads else "")
                 + "): rerun on a quiet machine or with <code>--wait-idle</code>.")
    return head + "<br>" + "<br>".join(lines), bool(noisy) or mixed


def _device(records: Sequence[BenchRecord]) -> str:
    """The machine and build the records ran on: one column per distinct one (and the records each holds)."""
    found = machines.distinct(records)
    metas = [m for m in found.values() if m] or [{}]
    items = [("CPU", lambda m: m.get("cpu_model")), ("flags", lambda m: " ".join(m.get("cpu_flags") or [])),
             ("cores", lambda m: f"{m.get('physical_cores')} physical / {m.get('logical_cores')} logical"),
             ("memory", lambda m: f"{(m.get('memory_total_bytes') or 0) / 2**30:.1f} GiB"),
             ("kernel", lambda m: m.get("kernel")), ("governor", lambda m: m.get("governor")),
             ("load average before the first run (1, 5, 15 min)",
              lambda m: " / ".join(f"{x:.2f}" for x in m.get("load_avg_before") or [])),
             ("ondevice", lambda m: m.get("ondevice")),
             ("llama.cpp", lambda m: m.get("llama_build") if isinstance(m.get("llama_build"), str)
              else json.dumps(m.get("llama_build")))]
    if len(metas) > 1:
        count = {k: sum(machines.key(r) == k for r in records) for k in found}
        items.insert(0, ("records", lambda m: f"{count[machines.key({'meta': m})]} ({machines.build_short(m)})"))
    cell = "<td style='text-align:left'>{}</td>"
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th>" + "".join(cell.format(escape(str(f(m)))) for m in metas)
                               + "</tr>" for k, f in items) + "</table>"


def build_html(records: Sequence[BenchRecord | dict], eval_records: Sequence[dict] = (),
               title: str = "ondevice bench report", sessions: Sequence[str] = ()) -> str:
    """The whole page as a string (write it with an atomic write)."""
    bench = [r for r in BenchRecord.coerce(records) if r.kind == "bench"]
    plots = [plot_prompt_length(bench), plot_threads(bench), plot_memory(bench), plot_roofline(bench)]
    points = quality_vs_speed([*bench, *({**e, "kind": "eval"} for e in eval_records)])
    qplots = plot_quality(points)
    notes = []
    notes += [escape(n) for n in energy_notes(bench)]  # what (est.), (sys.) and (rail) cells mean
    if any(r.workload in ("pp", "tg", "pg") for r in bench):
        notes.append("pp/tg/pg tests use random token ids, as llama-bench does; chat uses real prompts.")
    if noise := noise_note(bench):
        notes.append(escape(noise))
    if plots[0] is None and any(r.workload in ("pp", "pg") for r in bench):
        notes.append("Prefill vs prompt length: one prompt length per model here; sweep it with "
                     "<code>-p 128,512,2048</code> to draw the curve.")
    if plots[1] is None and bench:
        notes.append("Thread scaling: one thread count per test here; sweep it with <code>-t 1,2,4</code>.")
    plots = [p for p in plots if p]
    if any(r.roofline for r in bench):
        r0 = next(r.roofline for r in bench if r.roofline)
        notes.append(f"Roofline from the built-in probe: {r0['bandwidth_gbs']:.1f} GB/s "
                     f"({escape(r0['probe']['bandwidth_method'])}), {r0['peak_gflops']:.1f} GFLOP/s "
                     f"({escape(r0['probe']['compute_method'])}). % = time at the bound / measured time.")
        if any(r.roofline_pct is not None and fp32_compute(r) for r in bench):
            notes.append(escape(ROOF_NOTE) + ".")
    quality = ("<h2>Quality vs speed</h2><div class='plots'>" + "".join(f"<figure>{q}</figure>" for q in qplots)
               + "</div>") if qplots else (
        "<h2>Quality vs speed</h2><p class='note'>No eval records share a model sha256 with these bench runs; "
        "run <code>ondevice eval</code> on the same model files to fill this view.</p>")
    quality += retention_html(retention(eval_records))
    quality += cascade_html(eval_records)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    headline, noisy = summary(bench) if bench else ("No bench records.", False)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{escape(title)}</title><style>{CSS}</style></head>
<body><h1>{escape(title)}</h1>
<p class="summary{' warn' if noisy else ''}">{headline}</p>
<p class="note">Generated {when} from {len(bench)} bench records; sessions: {escape(', '.join(sessions) or '-')}</p>
<h2>Device</h2>{_device(bench)}
<h2>Results</h2>{_table(bench) if bench else '<p>No bench records.</p>'}
{''.join(f'<p class="note">{n}</p>' for n in notes)}
<h2>Plots</h2><div class="plots">{''.join(f'<figure>{p}</figure>' for p in plots) or '<p>Nothing to plot.</p>'}</div>
{quality}
</body></html>
"""
