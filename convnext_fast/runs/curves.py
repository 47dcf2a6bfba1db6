"""The curves of several runs overlaid (loss, top-1, lr, image size), by epoch and by wall time, as inline SVG.

matplotlib (already a dependency, for the run's own PNGs) draws them: axes, ticks and legends of line charts are
its job. SVG with text kept as text (``svg.fonttype: none``): sharp, small, in the page's font; each figure gets
its own hash salt so the ids of its clip paths cannot clash with another figure's in the same page.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from convnext_fast.runs.scan import RunRecord

# (title, y label, [(metrics.jsonl key, line style)])
CURVES = [
    ("Loss", "loss", [("train_loss", "-"), ("val_loss", "--")]),
    ("Validation top-1", "top-1 (%)", [("val_top1", "-"), ("ema_val_top1", "--")]),
    ("Learning rate", "lr (end of epoch)", [("lr", "-")]),
    ("Training image size", "pixels", [("img_size", "-")]),
]


def elapsed(rows: Sequence[dict]) -> list[float]:
    """Wall time in seconds at the end of each epoch (the sum of the rows' epoch_time_s)."""
    out, t = [], 0.0
    for r in rows:
        t += r.get("epoch_time_s") or 0.0
        out.append(t)
    return out


def _time_unit(runs: Sequence[RunRecord]) -> tuple[str, float]:
    longest = max((elapsed(r.rows)[-1] for r in runs if r.rows), default=0.0)
    return ("s", 1.0) if longest < 120 else ("min", 60.0) if longest < 7200 else ("h", 3600.0)


def curve_svgs(runs: Sequence[RunRecord], labels: Sequence[str]) -> list[dict]:
    """One entry per curve drawn: {"title", "by_epoch", "by_time"} (SVG markup); curves no run has are left out."""
    out = []
    unit, scale = _time_unit(runs)
    for n, (title, ylabel, keys) in enumerate(CURVES):
        if not any(k in r for run in runs for r in run.rows for k, _ in keys):
            continue
        out.append({"title": title,
                    "by_epoch": _svg(runs, labels, keys, ylabel, "epoch", f"c{n}e"),
                    "by_time": _svg(runs, labels, keys, ylabel, f"wall time ({unit})", f"c{n}t", scale)})
    return out


def _svg(runs, labels, keys, ylabel: str, xlabel: str, salt: str, scale: float = 1.0) -> str:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.0, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"].colors
    for i, (run, label) in enumerate(zip(runs, labels)):
        xs_all = [r.get("epoch", j + 1) for j, r in enumerate(run.rows)] if xlabel == "epoch" else \
            [t / scale for t in elapsed(run.rows)]
        for key, style in keys:
            pts = [(x, r[key]) for x, r in zip(xs_all, run.rows)
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                name = label if len(keys) == 1 else f"{label} {key}"
                ax.plot(*zip(*pts), linestyle=style, marker="o", markersize=2.5, color=colours[i % 10], label=name)
    if xlabel == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)  # lr 1e-6 is not "0.0000"
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML declaration and doctype: the markup goes inline
