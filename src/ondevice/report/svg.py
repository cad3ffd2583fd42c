"""Tiny inline-SVG charts (line, bar, scatter) with no dependency, for the self-contained HTML report.

Each chart is drawn in a fixed viewBox and scales to the width of its column in the page. Labels are
never cut: the legend column is as wide as its longest label, and bar labels wrap onto lines or turn
when they do not fit under their bar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
W, H = 720, 360  # the viewBox of the plot; taller when labels need room
ML, MT, MB = 64, 36, 52  # margins: left axis labels, title, bottom axis
CHAR_W = 6.2  # mean advance of an 11 px sans-serif character, for fitting text
LINE_H = 13


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


def text_width(s: str) -> float:
    return CHAR_W * len(s)


class _Frame:
    """Axes, scales and legend shared by the chart kinds.

    ``legend`` labels set the width of the legend column; ``bottom`` is the room under the x axis
    (more when bar labels take several lines or turn).
    """

    def __init__(self, title: str, xlabel: str, ylabel: str, xs: Sequence[float], ys: Sequence[float],
                 log_x: bool = False, y_zero: bool = True, legend: Sequence[str] = (), bottom: float = MB):
        self.mr = 40 + max((text_width(x) for x in legend), default=0) if legend else 24
        self.mr = min(self.mr, W * 0.5)
        self.mb = bottom
        self.h = max(H, MT + 220 + bottom, MT + 16 * len(legend) + bottom)
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
        self.right = W - self.mr  # x of the plot's right edge
        self.base = self.h - self.mb  # y of the x axis
        mid_x, mid_y = ML + (self.right - ML) / 2, MT + (self.base - MT) / 2
        self.parts = [
            (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {self.h:.0f}" '
             f'preserveAspectRatio="xMinYMin meet" style="width:100%;height:auto" '
             f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">'),
            (f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
             f'{escape(title)}</text>'),
            f'<text x="{mid_x:.1f}" y="{self.h - 8:.1f}" text-anchor="middle">{escape(xlabel)}</text>',
            (f'<text x="14" y="{mid_y:.1f}" text-anchor="middle" transform="rotate(-90 14 {mid_y:.1f})">'
             f'{escape(ylabel)}</text>'),
        ]
        for t in self.yt:
            y = self.py(t)
            self.parts.append(f'<line x1="{ML}" x2="{self.right:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                              f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        self.parts.append(f'<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{self.base:.1f}" stroke="#333"/>'
                          f'<line x1="{ML}" x2="{self.right:.1f}" y1="{self.base:.1f}" y2="{self.base:.1f}" '
                          f'stroke="#333"/>')

    def px(self, x: float) -> float:
        return ML + (self.fx(x) - self.x0) / (self.x1 - self.x0) * (self.right - ML)

    def py(self, y: float) -> float:
        return self.base - (y - self.y0) / ((self.y1 - self.y0) or 1) * (self.base - MT)

    def x_ticks(self, xs: Sequence[float]) -> None:
        for x in sorted(set(xs)):
            px = self.px(x)
            self.parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{self.base:.1f}" y2="{self.base + 4:.1f}" '
                              f'stroke="#333"/><text x="{px:.1f}" y="{self.base + 16:.1f}" '
                              f'text-anchor="middle">{_fmt(x)}</text>')

    def legend(self, labels: Sequence[str], marker: str = "line") -> None:
        x0 = self.right + 10
        for i, lab in enumerate(labels):
            y = MT + 8 + i * 16
            c = PALETTE[i % len(PALETTE)]
            shape = (f'<rect x="{x0:.1f}" y="{y - 6}" width="12" height="8" fill="{c}"/>' if marker == "bar"
                     else f'<line x1="{x0 - 2:.1f}" x2="{x0 + 14:.1f}" y1="{y - 2}" y2="{y - 2}" stroke="{c}" '
                          f'stroke-width="2"/><circle cx="{x0 + 6:.1f}" cy="{y - 2}" r="3" fill="{c}"/>')
            self.parts.append(shape + f'<text x="{x0 + 20:.1f}" y="{y + 2}">{escape(lab)}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def line_chart(series: dict[str, list[tuple[float, float, float | None]]], title: str, xlabel: str,
               ylabel: str, log_x: bool = False) -> str:
    """One line per series; points are (x, y, yerr or None); error bars drawn when given."""
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] + (p[2] or 0) for pts in series.values() for p in pts]
    f = _Frame(title, xlabel, ylabel, xs, ys, log_x=log_x, legend=list(series))
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


def _label_layout(categories: Sequence[str], slot: float) -> tuple[list[list[str]], bool, float]:
    """(lines per label, turned, room under the axis): words wrap onto lines under their bar; when a
    word is still wider than the bar the labels turn 40 degrees instead."""
    lines = [c.split(" ") for c in categories]
    widest = max((text_width(w) for ls in lines for w in ls), default=0)
    if widest <= slot - 4:
        n = max((len(ls) for ls in lines), default=1)
        return lines, False, 30 + LINE_H * n
    longest = max((text_width(c) for c in categories), default=0)
    return [[c] for c in categories], True, 34 + longest * math.sin(math.radians(40))


def bar_chart(categories: Sequence[str], groups: dict[str, Sequence[float | None]], title: str, ylabel: str,
              stacked: bool = False) -> str:
    """Grouped (or stacked) bars: one bar per group within each category."""
    n_cat, n_grp = len(categories), max(1, len(groups))
    vals = list(groups.values())
    if stacked:
        tops = [sum((g[i] or 0) for g in vals) for i in range(n_cat)]
    else:
        tops = [v or 0 for g in vals for v in g]
    legend = list(groups)
    probe = _Frame(title, "", ylabel, [0, 1], tops or [1.0], legend=legend)  # the plot's width, for the labels
    slot = (probe.right - ML) / max(1, n_cat)
    lines, turned, bottom = _label_layout(categories, slot)
    f = _Frame(title, "", ylabel, [0, 1], tops or [1.0], legend=legend, bottom=bottom)
    bw = min(slot * 0.7 / (1 if stacked else n_grp), 90.0)  # a lone bar stays a bar, not a wall
    for ci, cat in enumerate(categories):
        x0 = ML + ci * slot + (slot - bw * (1 if stacked else n_grp)) / 2
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
        cx = ML + ci * slot + slot / 2
        if turned:
            y = f.base + 14
            f.parts.append(f'<text x="{cx:.1f}" y="{y:.1f}" text-anchor="end" '
                           f'transform="rotate(-40 {cx:.1f} {y:.1f})">{escape(cat)}</text>')
        else:
            spans = "".join(f'<tspan x="{cx:.1f}" dy="{0 if i == 0 else LINE_H}">{escape(w)}</tspan>'
                            for i, w in enumerate(lines[ci]))
            f.parts.append(f'<text x="{cx:.1f}" y="{f.base + 14:.1f}" text-anchor="middle">{spans}</text>')
    f.legend(legend, marker="bar")
    return f.svg()


def scatter(points: Sequence[tuple[float, float, str, bool]], title: str, xlabel: str, ylabel: str) -> str:
    """Points (x, y, label, on_front); the Pareto front is joined by a dashed line and drawn filled."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    note = "filled, dashed: Pareto front"
    f = _Frame(title, xlabel, ylabel, xs, ys, y_zero=False, legend=[note])
    for t in nice_ticks(min(xs or [0]), max(xs or [1])):
        if f.x0 <= t <= f.x1:
            f.parts.append(f'<text x="{f.px(t):.1f}" y="{f.base + 16:.1f}" text-anchor="middle">{_fmt(t)}</text>')
    front = sorted((p for p in points if p[3]), key=lambda p: p[0])
    if len(front) > 1:
        d = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y, _, _ in front)
        f.parts.append(f'<polyline points="{d}" fill="none" stroke="#d62728" stroke-dasharray="5,3"/>')
    for x, y, label, on in points:
        fill = "#d62728" if on else "white"
        f.parts.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="5" fill="{fill}" stroke="#d62728">'
                       f'<title>{escape(label)}: {x:.4g}, {y:.4g}{" (Pareto front)" if on else ""}</title></circle>'
                       f'<text x="{f.px(x) + 7:.1f}" y="{f.py(y) - 6:.1f}" font-size="10">{escape(label)}</text>')
    f.parts.append(f'<text x="{f.right + 10:.1f}" y="{MT + 10}">{note}</text>')
    return f.svg()
