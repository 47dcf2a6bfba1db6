"""Inline SVG charts of the tune report (hand-drawn like the error report's: a few lines of markup each, sharp,
no matplotlib import): lines over epochs or trials, and scatter plots of a parameter against top-1."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7ea4", "#d1242f", "#6e7781")


@dataclass
class Series:
    points: list[tuple[float, float]]
    label: str
    colour: str = "#0969da"
    dashed: bool = False  # a pruned / stopped trial: its curve visibly cut (dashed, ends in a cross)
    cut: bool = False
    width: float = 1.5
    markers: bool = False
    extra: dict = field(default_factory=dict)


def _scale(lo: float, hi: float, a: float, b: float, log: bool = False):
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5

    def f(v: float) -> float:
        v = math.log10(v) if log else v
        return a + (v - lo) / (hi - lo) * (b - a)
    return f


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [10.0 ** e for e in range(a, b + 1)]
        return [t for t in ticks if lo <= t <= hi] or [lo, hi]
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _num(v: float) -> str:
    return f"{v:.3g}"


def chart(series: list[Series], *, xlabel: str, ylabel: str, title: str, xlog: bool = False, width: int = 560,
          height: int = 300, scatter: bool = False, integer_x: bool = False) -> str:
    pad_l, pad_r, pad_t, pad_b = 52, 14, 24, 44
    pts = [p for s in series for p in s.points if all(math.isfinite(c) for c in p)]
    if xlog:
        pts = [p for p in pts if p[0] > 0]
    if not pts:
        return f'<p class="muted">{html.escape(title)}: no data yet.</p>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if not xlog and x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        y0, y1 = y0 - 1, y1 + 1
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    fx = _scale(x0, x1, pad_l, width - pad_r, xlog)
    fy = _scale(y0, y1, height - pad_b, pad_t)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{html.escape(title)}" class="chart">',
           f'<text x="{pad_l}" y="15" class="label">{html.escape(title)}</text>']
    for t in _ticks(y0, y1, False):
        out.append(f'<line x1="{pad_l}" y1="{fy(t):.1f}" x2="{width - pad_r}" y2="{fy(t):.1f}" class="grid"/>'
                   f'<text x="{pad_l - 6}" y="{fy(t) + 4:.1f}" class="tick" text-anchor="end">{_num(t)}</text>')
    xt = _ticks(x0, x1, xlog)
    if integer_x:  # epochs / trial numbers: every integer when few, else rounded evenly spaced ticks
        xt = [float(v) for v in range(math.ceil(x0), math.floor(x1) + 1)] if x1 - x0 <= 12 else \
            sorted({float(round(t)) for t in xt})
    for t in xt:
        out.append(f'<text x="{fx(t):.1f}" y="{height - pad_b + 16}" class="tick" text-anchor="middle">{_num(t)}</text>')
    out.append(f'<text x="{(pad_l + width - pad_r) / 2:.1f}" y="{height - 8}" class="label" '
               f'text-anchor="middle">{html.escape(xlabel)}</text>'
               f'<text x="12" y="{(pad_t + height - pad_b) / 2:.1f}" class="label" text-anchor="middle" '
               f'transform="rotate(-90 12 {(pad_t + height - pad_b) / 2:.1f})">{html.escape(ylabel)}</text>')
    for s in series:
        p = [(fx(x), fy(y)) for x, y in s.points if math.isfinite(x) and math.isfinite(y) and (x > 0 or not xlog)]
        if not p:
            continue
        tip = html.escape(s.label)
        if not scatter and len(p) > 1:
            dash = ' stroke-dasharray="4 3"' if s.dashed else ""
            out.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in p)}" fill="none" '
                       f'stroke="{s.colour}" stroke-width="{s.width}"{dash}><title>{tip}</title></polyline>')
        if scatter or s.markers or len(p) == 1:
            for a, b in p:
                out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{s.colour}" fill-opacity="0.75">'
                           f'<title>{tip}</title></circle>')
        if s.cut:
            a, b = p[-1]
            out.append(f'<path d="M{a - 4:.1f},{b - 4:.1f}L{a + 4:.1f},{b + 4:.1f}M{a - 4:.1f},{b + 4:.1f}'
                       f'L{a + 4:.1f},{b - 4:.1f}" stroke="{s.colour}" stroke-width="2" class="cut">'
                       f'<title>{tip}: stopped here</title></path>')
    out.append("</svg>")
    return "".join(out)
