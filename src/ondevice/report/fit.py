"""``ondevice report --fit``: the latest fits' fronts against the stock presets (``kind="fit"`` records).

A fit record (``fit.api``) holds the predicted Pareto front, the validated candidates (measured) and the
shipped file's speed; ``benchmarks/fit_bench.py`` adds the stock llama.cpp presets it measured from the
same F16 on the same held-out text (``stock``), so the two can be read side by side.
"""

from __future__ import annotations


def _row(label: str, m: dict) -> str:
    tg = f"{m['tg']:.1f}" if m.get("tg") is not None else "-"
    pp = f"{m['pp']:.1f}" if m.get("pp") is not None else "-"
    kld = f"{m['kld']:.4f}" if m.get("kld") is not None else "-"
    return f"| {label} | {m['size'] / 1e6:.1f} | {tg} | {pp} | {kld} |"


def fit_markdown(records: list[dict], limit: int = 3) -> str:
    """Markdown tables of the last ``limit`` fit records: measured candidates, stock presets, predicted front."""
    from ..fit.groups import BASE

    if not records:
        return ("no fit records stored yet; run `ondevice fit MODEL --budget ...` "
                "(or benchmarks/fit_bench.py for the front against the stock presets)\n")
    out = []
    for r in records[-limit:]:
        out.append(f"## {r['model']} (fit of {r.get('family')}, budget {r.get('budget')!r}, {r.get('threads')} "
                   f"threads)\n")
        out.append("| variant | size MB | tg t/s | pp t/s | KLD (held-out) |\n|---|---:|---:|---:|---:|")
        seen = set()
        for c in r.get("candidates", []):
            key = tuple(sorted(c["plan"].items()))
            if key in seen:  # one plan validated by several fits
                continue
            seen.add(key)
            plan = ", ".join(f"{g}={t}" for g, t in c["plan"].items() if t != BASE) or f"all {BASE}"
            chosen = " (chosen)" if c["plan"] == r.get("plan") else ""
            out.append(_row(f"fitted{chosen}: {plan}", c["measured"]))
        for name, m in sorted((r.get("stock") or {}).items(), key=lambda kv: kv[1]["size"]):
            out.append(_row(f"stock {name}", m))
        sh = r.get("shipped") or {}
        if sh.get("size"):
            out.append(_row(f"shipped {sh.get('model')}", {**sh, "kld": None}))
        front = r.get("front") or []
        if front:
            step = max(1, len(front) // 10)
            out.append(f"\npredicted front ({len(front)} plans, KLD on the calibration text), every {step}:\n")
            out.append("| size MB | tg t/s | pp t/s | KLD |\n|---:|---:|---:|---:|")
            for f in front[::step]:
                out.append(f"| {f['size'] / 1e6:.1f} | {f['tg']:.1f} | {f['pp']:.1f} | {f['kld']:.4f} |")
        out.append("")
    return "\n".join(out) + "\n"
