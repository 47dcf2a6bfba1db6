"""The compare page: one self-contained HTML file (inline CSS, JS and SVG; nothing fetched, nothing beside it).

The error report's stylesheet, table script (sorting, filtering, paging) and recall colours are reused as they
are, so both pages look and behave alike.
"""
from __future__ import annotations

import math
import os
import time
from importlib.resources import files
from pathlib import Path

from convnext_fast.runs.compare import Comparison

SHOWN_CLASSES = 25  # per-class rows shown before "Show all"


def render_compare(cmp: Comparison) -> str:
    import jinja2
    from markupsafe import Markup

    from convnext_fast import __version__
    from convnext_fast.error_report.charts import recall_colour
    from convnext_fast.runs.curves import curve_svgs

    env = jinja2.Environment(loader=jinja2.PackageLoader("convnext_fast.runs", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v, d=1: "–" if v is None or not math.isfinite(v) else f"{v:.{d}f}"
    env.globals["colour"] = lambda v: recall_colour(None if v is None else v / 100)
    shared = files("convnext_fast.error_report").joinpath("templates")
    curves = [{**c, "by_epoch": Markup(c["by_epoch"]), "by_time": Markup(c["by_time"])}
              for c in curve_svgs(cmp.runs, cmp.labels)]
    return env.get_template("compare.html.j2").render(
        title=f"Runs compared: {' vs '.join(cmp.labels)}", version=__version__,
        built=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), runs=list(zip(cmp.runs, cmp.labels)),
        labels=cmp.labels, notes=cmp.notes, config_diff=cmp.config_diff, metrics=cmp.metrics, curves=curves,
        classes=cmp.classes, change_label=cmp.change_label, two=len(cmp.runs) == 2, shown=SHOWN_CLASSES,
        css=Markup(shared.joinpath("report.css").read_text(encoding="utf-8")),
        js=Markup(shared.joinpath("report.js").read_text(encoding="utf-8")))


def write_compare_page(cmp: Comparison, path: str | os.PathLike) -> Path:
    """Write the page to ``path`` (its folder is created); return the path."""
    from convnext_fast.run_files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, render_compare(cmp))
