"""report.html: a Jinja2 template filled from :class:`ReportData`; CSS, JS and SVG inline, thumbnails relative."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from convnext_fast.error_report.charts import recall_colour, reliability_svg
from convnext_fast.error_report.context import ReportData

MATRIX_CELLS_MAX = 30  # classes up to which the confusion matrix is an HTML table; beyond: a heat-map image


def _pct(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else 100.0 * v


def _tile(rd: ReportData, i: int, thumbs: dict, failed: dict) -> dict:
    sm, p = rd.samples, rd.preds
    path = p.paths[i]
    return {"thumb": thumbs.get(i), "failed": failed.get(i), "path": path, "name": os.path.basename(path),
            "href": Path(os.path.abspath(path)).as_uri(), "true": rd.classes[p.labels[i]],
            "pred": rd.classes[sm.pred[i]], "conf": 100 * sm.confidence[i], "p_true": 100 * sm.p_true[i],
            "loss": sm.loss[i], "correct": bool(sm.correct[i])}


def _class_rows(rd: ReportData, worst_n: int) -> list[dict]:
    s, rows = rd.stats, []
    for rank, c in enumerate(rd.order):
        c = int(c)
        recall = _pct(s.recall[c])
        rows.append({"rank": rank + 1, "idx": c, "name": rd.classes[c], "n": int(s.support[c]),
                     "correct": int(s.correct[c]), "predicted": int(s.predicted[c]), "recall": recall,
                     "lo": _pct(s.recall_lo[c]), "hi": _pct(s.recall_hi[c]), "precision": _pct(s.precision[c]),
                     "f1": _pct(s.f1[c]), "colour": recall_colour(s.recall[c]), "extra": rank >= worst_n,
                     "confused": [(rd.classes[j], n) for j, n in rd.confused_with(c)],
                     "by_size": [_pct(b["recall"][c]) for b in rd.by_size]})
    return rows


def _header(rd: ReportData) -> list[tuple[str, str]]:
    m = rd.preds.meta
    yes_no = {True: "yes", False: "no", None: "unknown"}
    sizes = ", ".join(f"{s} px" for s in rd.preds.img_sizes)
    if len(rd.preds.img_sizes) > 1:
        sizes += f" (details at {rd.preds.img_sizes[0]} px, the first listed)"
    rows = [("Weights", m.get("weights", "?")), ("Data", m.get("data", "?")), ("Model", m.get("model", "?")),
            ("Image size", sizes + (f"; trained at {m['trained_img_size']} px" if "trained_img_size" in m else "")),
            ("TTA", "flip (image + mirror)" if m.get("tta") else "none"), ("EMA weights", yes_no[m.get("ema")]),
            ("Images / classes", f"{len(rd.preds.labels):,} / {rd.preds.num_classes:,}"),
            ("Device", f"{m.get('device', '?')}, amp {m.get('amp', '?')}, loader {m.get('loader', '?')}"),
            ("Evaluated", m.get("created", "?")),
            ("Report built", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))]
    return rows


def _overlap_note(rd: ReportData) -> dict | None:
    if rd.overlap is None:
        return None
    best, worst, overlap = rd.overlap
    s = rd.stats

    def desc(c):
        return (f"{rd.classes[c]} {100 * s.recall[c]:.1f}% ({int(s.correct[c])}/{int(s.support[c])}, 95% interval "
                f"{100 * s.recall_lo[c]:.1f}-{100 * s.recall_hi[c]:.1f}%)")
    return {"overlap": overlap, "best": desc(best), "worst": desc(worst)}


def render(rd: ReportData, *, thumbs: dict, failed: dict, worst_n: int, confusion_png: str | None,
           files: list[str]) -> str:
    import jinja2
    from markupsafe import Markup

    from convnext_fast import __version__

    env = jinja2.Environment(loader=jinja2.PackageLoader("convnext_fast.error_report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v, d=1: "–" if v is None or not math.isfinite(v) else f"{v:.{d}f}"
    env.globals["colour"] = lambda v: recall_colour(None if v is None else v / 100)
    classes = _class_rows(rd, worst_n)
    galleries = []
    for row in classes:
        if row["n"]:
            galleries.append({**row, "tiles": [_tile(rd, i, thumbs, failed) for i in rd.per_class_top[row["idx"]]]})
    small = rd.preds.num_classes <= MATRIX_CELLS_MAX
    totals = rd.confusion.sum(axis=1)
    m = rd.preds.meta
    page = env.get_template("report.html.j2").render(
        title=f"Error report: {m.get('model', 'model')} on {_short_path(str(m.get('data', '')))}",
        header=_header(rd), rd=rd, classes=classes, galleries=galleries, worst_n=worst_n,
        empty=[r["name"] for r in classes if not r["n"]], overlap=_overlap_note(rd),
        pairs=[{"true": rd.classes[i], "pred": rd.classes[j], "n": n, "back": back,
                "share": 100 * n / max(int(totals[i]), 1)} for i, j, n, back in rd.pairs],
        wrong=[_tile(rd, i, thumbs, failed) for i in rd.top_wrong], failed=[(rd.preds.paths[i], why) for i, why in
                                                                              sorted(failed.items())],
        matrix=rd.confusion.tolist() if small else None, totals=totals.tolist(), confusion_png=confusion_png,
        reliability=Markup(reliability_svg(rd.calibration)), ece=100 * rd.calibration.ece,
        macro_f1=_pct(float(_nanmean(rd.stats.f1))), sizes=rd.by_size if len(rd.by_size) > 1 else [],
        files=files, version=__version__, css=Markup(_asset("report.css")), js=Markup(_asset("report.js")),
        wrong_count=int((~rd.samples.correct).sum()))
    return page


def _short_path(path: str) -> str:
    """The last two parts of a path (``demo/val``): enough to tell datasets apart in a title."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts else "?"


def _nanmean(a) -> float:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _asset(name: str) -> str:
    from importlib.resources import files

    return files("convnext_fast.error_report").joinpath("templates", name).read_text(encoding="utf-8")
