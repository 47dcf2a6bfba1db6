"""Charts of the report as inline SVG (reliability diagram) and a PNG heat-map (large confusion matrices).

Hand-drawn SVG rather than matplotlib: a 15-bar chart is a few lines of markup, stays sharp, inherits the page's
fonts, and keeps matplotlib's ~1 s import out of the report's time budget.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from convnext_fast.error_report.analysis import Calibration


def recall_colour(r: float | None) -> str:
    """A red -> amber -> green colour for a recall in [0, 1]; grey when undefined."""
    if r is None or not math.isfinite(r):
        return "#9aa0a6"
    hue = 120 * max(0.0, min(1.0, r)) ** 3  # most of the scale for the high end, where classes sit: 73% is orange
    return f"hsl({hue:.0f}, 62%, 42%)"


def reliability_svg(cal: Calibration, width: int = 420) -> str:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration; bin counts below."""
    pad_l, pad_r, pad_t, plot_h, hist_h = 44, 12, 12, 200, 34
    plot_w = width - pad_l - pad_r
    hist_top = pad_t + plot_h + 50
    height = hist_top + hist_h + 18
    x = lambda v: pad_l + v * plot_w  # noqa: E731
    y = lambda v: pad_t + (1 - v) * plot_h  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="Reliability diagram">'
             '<defs><pattern id="gap-hatch" width="5" height="5" patternUnits="userSpaceOnUse" '
             'patternTransform="rotate(45)"><rect width="2.5" height="5" fill="#c62828" opacity="0.7"/></pattern>'
             '</defs>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(0):.1f}" y1="{y(t):.1f}" x2="{x(1):.1f}" y2="{y(t):.1f}" class="grid"/>'
                     f'<text x="{x(0) - 6:.1f}" y="{y(t) + 4:.1f}" class="tick" text-anchor="end">{t:.2f}</text>'
                     f'<text x="{x(t):.1f}" y="{y(0) + 16:.1f}" class="tick" text-anchor="middle">{t:.2f}</text>')
    peak = max(int(cal.count.max()) if cal.count.size else 0, 1)
    for lo, hi, n, acc, conf in zip(cal.edges[:-1], cal.edges[1:], cal.count, cal.accuracy, cal.confidence):
        w = (hi - lo) * plot_w - 2
        hb = hist_h * n / peak
        parts.append(f'<rect x="{x(lo) + 1:.1f}" y="{hist_top + hist_h - hb:.1f}" width="{w:.1f}" '
                     f'height="{hb:.1f}" class="hist"><title>{lo:.2f}-{hi:.2f}: {int(n)} images</title></rect>')
        if n == 0:
            continue
        gap_top, gap_bottom = (conf, acc) if conf > acc else (acc, conf)
        parts.append(f'<rect x="{x(lo) + 1:.1f}" y="{y(acc):.1f}" width="{w:.1f}" height="{y(0) - y(acc):.1f}" '
                     f'class="bar"><title>confidence {lo:.2f}-{hi:.2f}: accuracy {acc:.3f}, mean confidence '
                     f'{conf:.3f}, {int(n)} images</title></rect>'
                     f'<rect x="{x(lo) + 1:.1f}" y="{y(gap_top):.1f}" width="{w:.1f}" '
                     f'height="{y(gap_bottom) - y(gap_top):.1f}" class="gap"/>')
    parts.append(f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(1):.1f}" y2="{y(1):.1f}" class="diag"/>'
                 f'<text x="{x(0.5):.1f}" y="{y(0) + 34:.1f}" class="label" text-anchor="middle">confidence</text>'
                 f'<text x="12" y="{y(0.5):.1f}" class="label" text-anchor="middle" '
                 f'transform="rotate(-90 12 {y(0.5):.1f})">accuracy</text>'
                 f'<text x="{x(0):.1f}" y="{height - 3:.1f}" class="tick">images per bin (max {peak})</text></svg>')
    return "".join(parts)


def confusion_png(confusion: np.ndarray, path: Path, max_px: int = 1000) -> Path:
    """Row-normalized confusion matrix as a heat-map PNG (white = 0, dark = the whole row); one cell >= 1 px."""
    from PIL import Image

    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(totals > 0, confusion / np.maximum(totals, 1), 0.0)
    # off-diagonal cells are what the reader looks for: a square-root scale makes a 2% confusion visible
    level = np.sqrt(frac)
    rgb = np.empty(confusion.shape + (3,), dtype=np.uint8)
    off = np.array([178, 34, 34], dtype=np.float64)  # firebrick: mistakes
    diag = np.array([46, 125, 50], dtype=np.float64)  # green: the diagonal
    colour = np.where(np.eye(confusion.shape[0], dtype=bool)[..., None], diag, off)
    rgb[:] = (255 - level[..., None] * (255 - colour)).round().astype(np.uint8)
    scale = max(1, max_px // confusion.shape[0])
    img = Image.fromarray(rgb).resize((confusion.shape[1] * scale, confusion.shape[0] * scale), Image.NEAREST)
    img.save(path)
    return path
