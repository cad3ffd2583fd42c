"""``ondevice report --fit``: the latest fits' fronts against the stock presets (``kind="fit"`` records).

A fit record (``fit.api``) holds the predicted Pareto front, the validated candidates (measured) and the
shipped file's speed; ``benchmarks/fit_bench.py`` adds the stock llama.cpp presets it measured from the
same F16 on the same held-out text (``stock``), so the two can be read side by side.
"""

from __future__ import annotations

from .formats import md_row


def _row(label: str, m: dict, quality: str | None = None) -> str:
    from ..bench.noise import NOISY_MARK

    mark = f" {NOISY_MARK}" if m.get("noisy") else ""  # measured while the machine was busy or the runs spread
    tg = f"{m['tg']:.1f}{mark}" if m.get("tg") is not None else "-"
    pp = f"{m['pp']:.1f}{mark}" if m.get("pp") is not None else "-"
    kld = f"{m['kld']:.4f}" if m.get("kld") is not None else "-"
    size = f"{m['size'] / 1e6:.1f}" if m.get("size") else "-"
    rss = f"{m['mem'] / 2**20:.0f}" if m.get("mem") else "-"  # peak RSS at the fit's bench shapes (fit.memory)
    row = [label, size, rss, tg, pp, kld]
    if quality:  # the fit's --quality figure: held-out perplexity or the suite's score
        v = m.get(quality)
        row.append(f"{v:.3f}" if v is not None else "-")
    return md_row(row)


def _quality(r: dict) -> tuple[str | None, str]:
    """The measured key of a fit record's ``--quality`` and its column's title."""
    q = r.get("quality") or {}
    if q.get("kind") == "ppl":
        return "ppl", "ppl (held-out)"
    if q.get("kind") == "suite":
        return "score", f"{q.get('suite')} score ({q.get('limit') or 'all'} items)"
    return None, ""


def fit_markdown(records: list[dict], limit: int = 3) -> str:
    """Markdown tables of the last ``limit`` fit records: measured candidates, stock presets, predicted front."""
    from ..fit.groups import BASE
    from ..fit.measure import NOISY_NOTE

    if not records:
        return ("no fit records stored yet; run `ondevice fit MODEL --budget ...` "
                "(or benchmarks/fit_bench.py for the front against the stock presets)\n")
    out = []
    for r in records[-limit:]:
        prof = (r.get("profile") or {}).get("name")
        n = r.get("threads")
        out.append(f"## {r['model']} (fit of {r.get('family')}, budget {r.get('budget')!r}, {n} "
                   f"thread{'' if n == 1 else 's'}" + (f", device profile {prof}" if prof else "") + ")\n")
        qkey, qtitle = _quality(r)
        if r.get("shipped_chosen"):
            out.append(f"chosen: the shipped {(r.get('shipped') or {}).get('model')} (no variant was better: none "
                       f"stored)\n")
        extra = 1 if qkey else 0
        out.append(md_row(["variant", "size MB", "peak RSS MiB", "tg t/s", "pp t/s", "KLD (held-out)"]
                          + [qtitle] * extra) + "\n" + md_row(["---"] + ["---:"] * (5 + extra)))
        seen = set()
        for c in r.get("candidates", []):
            key = tuple(sorted(c["plan"].items()))
            if key in seen:  # one plan validated by several fits
                continue
            seen.add(key)
            plan = ", ".join(f"{g}={t}" for g, t in c["plan"].items() if t != BASE) or f"all {BASE}"
            chosen = " (chosen)" if c["plan"] == r.get("plan") and not r.get("shipped_chosen") else ""
            out.append(_row(f"fitted{chosen}: {plan}", c["measured"], qkey))
        if qkey and (ref := (r.get("quality") or {}).get("reference")):
            out.append(_row("reference (F16)", {"kld": 0.0, **ref}, qkey))
        for name, m in sorted((r.get("stock") or {}).items(), key=lambda kv: kv[1]["size"]):
            out.append(_row(f"stock {name}", m, qkey))
        sh = r.get("shipped") or {}
        if sh.get("size"):
            # its tok/s benched with the candidates (``validation``); fits logged before every fit did that hold
            # only the speed table's, of another moment than the rows above: said so
            notes = ["chosen"] * bool(r.get("shipped_chosen")) + ["tok/s: speed table, earlier"] * (
                not sh.get("validation"))
            out.append(_row(f"shipped {sh.get('model')}" + (f" ({'; '.join(notes)})" if notes else ""),
                            {**sh, **(sh.get("validation") or {}), "kld": None}, qkey))
        front = r.get("front") or []
        if front:
            step = max(1, len(front) // 10)
            every = "" if step == 1 else f", every {step}th"
            out.append(f"\npredicted front ({len(front)} plan{'' if len(front) == 1 else 's'}, KLD on the "
                       f"calibration text){every}:\n")
            out.append(md_row(["size MB", "tg t/s", "pp t/s", "KLD"]) + "\n" + md_row(["---:"] * 4))
            for f in front[::step]:
                out.append(md_row([f"{f['size'] / 1e6:.1f}", f"{f['tg']:.1f}", f"{f['pp']:.1f}", f"{f['kld']:.4f}"]))
        if any((c.get("measured") or {}).get("noisy") for c in r.get("candidates", [])) or sh.get("noisy"):
            out.append(f"\n{NOISY_NOTE}")  # as the fit said it
        out.append("")
    return "\n".join(out) + "\n"
