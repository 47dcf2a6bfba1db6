"""The data files beside the page: per_class.csv, top_losses.csv, confusion_matrix.csv."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from convnext_fast.error_report.context import ReportData
from convnext_fast.run_files import atomic_write_text


def _num(v: float, digits: int = 4) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _write_csv(path: Path, header: list[str], rows) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def write_per_class(rd: ReportData, path: Path) -> Path:
    """One row per class in recall order (worst first; classes without images last, their rates empty).

    Rates are fractions in [0, 1]; ``recall_lo95``/``recall_hi95`` the Wilson 95% interval; ``confused_with``
    the top classes its images were predicted as, ``name:count`` joined by ``; ``.
    """
    s, classes = rd.stats, rd.classes
    sizes = rd.by_size if len(rd.by_size) > 1 else []
    header = ["class_index", "class", "images", "correct", "predicted_as", "precision", "recall", "f1",
              "recall_lo95", "recall_hi95", "confused_with"] + [f"recall_at_{b['img_size']}" for b in sizes]
    rows = []
    for c in rd.order:
        confused = "; ".join(f"{classes[j]}:{n}" for j, n in rd.confused_with(int(c)))
        rows.append([int(c), classes[c], int(s.support[c]), int(s.correct[c]), int(s.predicted[c]),
                     _num(s.precision[c]), _num(s.recall[c]), _num(s.f1[c]), _num(s.recall_lo[c]),
                     _num(s.recall_hi[c]), confused] + [_num(b["recall"][c]) for b in sizes])
    return _write_csv(path, header, rows)


def write_top_losses(rd: ReportData, path: Path) -> Path:
    """Every image, highest loss (cross-entropy of the true class) first: the head is the top losses."""
    sm, classes, preds = rd.samples, rd.classes, rd.preds
    rows = ([rank + 1, preds.paths[i], classes[preds.labels[i]], classes[sm.pred[i]], _num(sm.confidence[i]),
             _num(sm.p_true[i]), _num(sm.loss[i]), int(sm.correct[i])] for rank, i in enumerate(rd.loss_rank))
    return _write_csv(path, ["rank", "path", "true", "predicted", "confidence", "p_true", "loss", "correct"], rows)


def write_confusion(rd: ReportData, path: Path) -> Path:
    """Rows: true class, columns: predicted class, counts."""
    return _write_csv(path, ["true \\ predicted", *rd.classes],
                      ([name, *map(int, row)] for name, row in zip(rd.classes, rd.confusion)))
