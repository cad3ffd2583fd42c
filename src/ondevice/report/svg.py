"""Tiny inline-SVG charts (line, bar, scatter) with no dependency, for the self-contained HTML report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
W, H = 720, 360
ML, MR, MT, MB = 64, 230, 36, 52  # margins: left axis labels, right legend, title, bottom axis


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1-2-5 steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.4g}M"
    if a >= 1e4:
        return f"{v / 1e3:.4g}k"
    return f"{v:.4g}"


class _Frame:
    """Axes and scales shared by the chart kinds."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xs: Sequence[float], ys: Sequence[float],
                 log_x: bool = False, y_zero: bool = True):
        self.log_x = log_x and all(x > 0 for x in xs)
        fx = (lambda v: math.log2(v)) if self.log_x else (lambda v: v)
        self.fx = fx
        xv = [fx(x) for x in xs] or [0.0, 1.0]
        self.x0, self.x1 = min(xv), max(xv)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        ys = list(ys) or [0.0, 1.0]
        self.yt = nice_ticks(min(0.0, min(ys)) if y_zero else min(ys), max(ys))
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        mid_x, mid_y = ML + (W - ML - MR) / 2, MT + (H - MT - MB) / 2
        self.parts = [
            (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">'),
            (f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
             f'{escape(title)}</text>'),
            f'<text x="{mid_x}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
            (f'<text x="14" y="{mid_y}" text-anchor="middle" transform="rotate(-90 14 {mid_y})">'
             f'{escape(ylabel)}</text>'),
        ]
        for t in self.yt:
            y = self.py(t)
            self.parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                              f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        self.parts.append(f'<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{H - MB}" stroke="#333"/>'
                          f'<line x1="{ML}" x2="{W - MR}" y1="{H - MB}" y2="{H - MB}" stroke="#333"/>')

    def px(self, x: float) -> float:
        return ML + (self.fx(x) - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def py(self, y: float) -> float:
        return H - MB - (y - self.y0) / ((self.y1 - self.y0) or 1) * (H - MT - MB)

    def x_ticks(self, xs: Sequence[float]) -> None:
        for x in sorted(set(xs)):
            px = self.px(x)
            self.parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{H - MB}" y2="{H - MB + 4}" stroke="#333"/>'
                              f'<text x="{px:.1f}" y="{H - MB + 16}" text-anchor="middle">{_fmt(x)}</text>')

    def legend(self, labels: Sequence[str], marker: str = "line") -> None:
        for i, lab in enumerate(labels[:16]):
            y = MT + 8 + i * 16
            c = PALETTE[i % len(PALETTE)]
            shape = (f'<rect x="{W - MR + 10}" y="{y - 6}" width="12" height="8" fill="{c}"/>' if marker == "bar"
                     else f'<line x1="{W - MR + 8}" x2="{W - MR + 24}" y1="{y - 2}" y2="{y - 2}" stroke="{c}" '
                          f'stroke-width="2"/><circle cx="{W - MR + 16}" cy="{y - 2}" r="3" fill="{c}"/>')
            self.parts.append(shape + f'<text x="{W - MR + 30}" y="{y + 2}">{escape(lab[:30])}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def line_chart(series: dict[str, list[tuple[float, float, float | None]]], title: str, xlabel: str,
               ylabel: str, log_x: bool = False) -> str:
    """One line per series; points are (x, y, yerr or None); error bars drawn when given."""
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] + (p[2] or 0) for pts in series.values() for p in pts]
    f = _Frame(title, xlabel, ylabel, xs, ys, log_x=log_x)
    f.x_ticks(xs)
    for i, (_label, pts) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        if len(pts) > 1:
            d = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y, _ in pts)
            f.parts.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y, e in pts:
            if e:
                f.parts.append(f'<line x1="{f.px(x):.1f}" x2="{f.px(x):.1f}" y1="{f.py(y - e):.1f}" '
                               f'y2="{f.py(y + e):.1f}" stroke="{c}"/>')
            f.parts.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3.5" fill="{c}">'
                           f'<title>{_fmt(x)}: {y:.4g}</title></circle>')
    f.legend(list(series))
    return f.svg()


def bar_chart(categories: Sequence[str], groups: dict[str, Sequence[float | None]], title: str, ylabel: str,
              stacked: bool = False) -> str:
    """Grouped (or stacked) bars: one bar per group within each category."""
    n_cat, n_grp = len(categories), max(1, len(groups))
    vals = list(groups.values())
    if stacked:
        tops = [sum((g[i] or 0) for g in vals) for i in range(n_cat)]
    else:
        tops = [v or 0 for g in vals for v in g]
    f = _Frame(title, "", ylabel, [0, 1], tops or [1.0])
    slot = (W - ML - MR) / max(1, n_cat)
    bw = slot * 0.7 / (1 if stacked else n_grp)
    for ci, cat in enumerate(categories):
        x0 = ML + ci * slot + slot * 0.15
        base = 0.0
        for gi, (label, g) in enumerate(groups.items()):
            v = g[ci]
            if v is None:
                continue
            c = PALETTE[gi % len(PALETTE)]
            x = x0 if stacked else x0 + gi * bw
            y_top, y_bot = f.py(base + v), f.py(base)
            f.parts.append(f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bw:.1f}" height="{max(0.0, y_bot - y_top):.1f}" '
                           f'fill="{c}"><title>{escape(cat)} {escape(label)}: {v:.4g}</title></rect>')
            if stacked:
                base += v
        f.parts.append(f'<text x="{ML + ci * slot + slot / 2:.1f}" y="{H - MB + 14}" text-anchor="middle">'
                       f'{escape(cat[:max(4, int(slot / 6))])}</text>')
    f.legend(list(groups), marker="bar")
    return f.svg()


def scatter(points: Sequence[tuple[float, float, str, bool]], title: str, xlabel: str, ylabel: str) -> str:
    """Points (x, y, label, on_front); the Pareto front is joined by a dashed line and drawn filled."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    f = _Frame(title, xlabel, ylabel, xs, ys, y_zero=False)
    for t in nice_ticks(min(xs or [0]), max(xs or [1])):
        if f.x0 <= t <= f.x1:
            f.parts.append(f'<text x="{f.px(t):.1f}" y="{H - MB + 16}" text-anchor="middle">{_fmt(t)}</text>')
    front = sorted((p for p in points if p[3]), key=lambda p: p[0])
    if len(front) > 1:
        d = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y, _, _ in front)
        f.parts.append(f'<polyline points="{d}" fill="none" stroke="#d62728" stroke-dasharray="5,3"/>')
    for x, y, label, on in points:
        fill = "#d62728" if on else "white"
        f.parts.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="5" fill="{fill}" stroke="#d62728">'
                       f'<title>{escape(label)}: {x:.4g}, {y:.4g}{" (Pareto front)" if on else ""}</title></circle>'
                       f'<text x="{f.px(x) + 7:.1f}" y="{f.py(y) - 6:.1f}" font-size="10">{escape(label[:20])}</text>')
    f.parts.append(f'<text x="{W - MR + 10}" y="{MT + 10}">filled, dashed: Pareto front</text>')
    return f.svg()
