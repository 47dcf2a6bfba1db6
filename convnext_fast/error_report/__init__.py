"""The error report: why is this class weak? Built from saved predictions (``predictions.npz``), never by
running the model (DESIGN §6).

``build_report(preds, DIR)`` writes::

    DIR/report.html          self-contained page (inline CSS/JS/SVG, no network); thumbnails from DIR/thumbs/
    DIR/thumbs/<i>.jpg       the images the page shows (i = position in the evaluated index)
    DIR/per_class.csv        precision, recall, F1, Wilson 95% interval of recall, top confusions
    DIR/top_losses.csv       every image with its path, highest loss first
    DIR/confusion_matrix.csv counts, rows = true class
    DIR/confusion_matrix.png heat-map (only for more classes than fit a table in the page)
"""
from __future__ import annotations

from pathlib import Path

from convnext_fast.predictions import Predictions

__all__ = ["build_report", "Predictions"]

THUMBS_BUDGET = 2000  # thumbnails across all per-class galleries: 8 per class up to 250 classes, >= 2 beyond


def build_report(preds: Predictions, out_dir: str | Path, *, worst_n: int = 25, per_class_k: int | None = None,
                 top_wrong: int = 48) -> Path:
    """Write the report for ``preds`` into ``out_dir``; return the path of report.html.

    ``worst_n`` classes are shown first (the rest one click away); each class shows its ``per_class_k``
    highest-loss images (default: 8, fewer for many classes); ``top_wrong`` most confidently wrong images overall.
    Unreadable images are named in the page; the report is still written.
    """
    from convnext_fast.error_report import files as F
    from convnext_fast.error_report.charts import confusion_png
    from convnext_fast.error_report.context import analyse
    from convnext_fast.error_report.page import MATRIX_CELLS_MAX, render
    from convnext_fast.error_report.thumbs import make_thumbnails
    from convnext_fast.run_files import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = per_class_k or max(2, min(8, THUMBS_BUDGET // max(preds.num_classes, 1)))
    rd = analyse(preds, per_class_k=k, top_wrong=top_wrong)
    written = [F.write_per_class(rd, out_dir / "per_class.csv"), F.write_top_losses(rd, out_dir / "top_losses.csv"),
               F.write_confusion(rd, out_dir / "confusion_matrix.csv")]
    png = None
    if preds.num_classes > MATRIX_CELLS_MAX:
        png = confusion_png(rd.confusion, out_dir / "confusion_matrix.png").name
        written.append(out_dir / png)
    wanted = {i for top in rd.per_class_top for i in top} | set(rd.top_wrong)
    thumbs, failed = make_thumbnails(((i, preds.paths[i]) for i in wanted), out_dir / "thumbs")
    if (out_dir / "predictions.npz").is_file():
        written.insert(0, out_dir / "predictions.npz")
    html = render(rd, thumbs=thumbs, failed=failed, worst_n=worst_n, confusion_png=png,
                  files=[p.name for p in written])
    return atomic_write_text(out_dir / "report.html", html)
