"""Everything the report shows, computed once from saved predictions: the CSV files and the page both read it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from convnext_fast.error_report import analysis as A
from convnext_fast.predictions import Predictions


@dataclass
class ReportData:
    preds: Predictions
    confusion: np.ndarray
    stats: A.ClassStats
    samples: A.Samples
    order: np.ndarray  # classes with images by recall (worst first), then classes without images
    loss_rank: np.ndarray  # image indices, highest loss first
    per_class_top: list[list[int]]  # per class: its highest-loss images
    top_wrong: list[int]  # the most confidently wrong images across classes (highest loss first)
    pairs: list[tuple[int, int, int, int]]
    calibration: A.Calibration
    overlap: tuple[int, int, bool] | None
    top1: float
    top5: float
    loss: float
    top1_interval: tuple[float, float]
    by_size: list[dict] = field(default_factory=list)  # per size: img_size, top1, top5, recall (array)

    @property
    def classes(self) -> list[str]:
        return self.preds.classes

    def confused_with(self, c: int, top: int = 3) -> list[tuple[int, int]]:
        return A.top_confused_with(self.confusion, c, top)


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    if not len(labels):
        return math.nan
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def analyse(preds: Predictions, *, per_class_k: int, top_wrong: int, pairs: int = 20) -> ReportData:
    """Metrics of the first size in ``preds`` (and top-1/top-5/recall at every size)."""
    labels, c = preds.labels, preds.num_classes
    by_size = []
    for s, size in enumerate(preds.img_sizes):
        pred_s = preds.logits[s].argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
        conf_s = A.confusion_matrix(labels, pred_s, c)
        by_size.append({"img_size": int(size), "confusion": conf_s,
                        "top1": float(100.0 * (pred_s == labels).mean()) if len(labels) else math.nan,
                        "top5": _topk_hits(preds.logits[s], labels, 5),
                        "recall": A.class_stats(conf_s).recall})
    first = by_size[0]
    samples = A.per_sample(preds.logits[0], labels)
    stats = A.class_stats(first["confusion"])
    has = stats.support > 0
    with_images = np.flatnonzero(has)
    # worst first; among equal recall the class with more images (the surer verdict) first
    order = np.concatenate([with_images[np.lexsort((-stats.support[with_images], stats.recall[with_images]))],
                            np.flatnonzero(~has)])
    loss_rank = A.loss_order(samples.loss)
    wrong = [int(i) for i in loss_rank if not samples.correct[i]][:top_wrong]
    n = len(labels)
    lo, hi = A.wilson_interval(np.array([samples.correct.sum()]), np.array([n]))
    return ReportData(
        preds=preds, confusion=first["confusion"], stats=stats, samples=samples, order=order,
        loss_rank=loss_rank, per_class_top=A.top_losses_per_class(samples.loss, labels, c, per_class_k),
        top_wrong=wrong, pairs=A.confused_pairs(first["confusion"], pairs),
        calibration=A.calibration(samples.confidence, samples.correct), overlap=A.intervals_overlap(stats),
        top1=first["top1"], top5=first["top5"], loss=float(samples.loss.mean()) if n else math.nan,
        top1_interval=(float(lo[0]) * 100, float(hi[0]) * 100), by_size=by_size)
