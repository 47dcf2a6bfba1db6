"""Error analysis from saved predictions (logits, labels): numbers only, no model, no rendering.

Per-class precision/recall/F1, the confusion matrix, the Wilson score interval of recall and the expected
calibration error over equal-width bins. Written in numpy rather than taken from scikit-learn/scipy: each is a
few lines on a confusion matrix, while importing sklearn.metrics (with scipy.stats) takes 2.4 s on an idle
2-core CPU and 17 s under load, more than the whole report may add to a 3,000-image evaluation (<= 20%). The
tests check every function against scikit-learn, scipy and torchmetrics (dev dependencies).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
ECE_BINS = 15


def wilson_interval(successes, totals, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (no continuity correction) for ``successes`` out of ``totals``, element-wise.

    ``totals == 0`` gives ``nan`` bounds. Equal to ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.
    """
    from statistics import NormalDist

    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(totals, dtype=np.float64)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        lo, hi = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    return np.where(n > 0, lo, np.nan), np.where(n > 0, hi, np.nan)


@dataclass
class ClassStats:
    """Per-class arrays of length C (nan where undefined: no images, or never predicted)."""

    support: np.ndarray  # validation images of the class
    correct: np.ndarray  # of them predicted right
    predicted: np.ndarray  # images predicted as the class
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    recall_lo: np.ndarray
    recall_hi: np.ndarray


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def class_stats(confusion: np.ndarray) -> ClassStats:
    """Precision, recall, F1 and the Wilson interval of recall from a C x C confusion matrix (rows = true).

    As scikit-learn's ``precision_recall_fscore_support(..., zero_division=np.nan)``: a rate whose denominator
    is 0 is nan; F1 is 2 TP / (2 TP + FP + FN).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    correct = np.diagonal(confusion).copy()
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    lo, hi = wilson_interval(correct, support)
    return ClassStats(support, correct, predicted, precision=_ratio(correct, predicted),
                      recall=_ratio(correct, support), f1=_ratio(2 * correct, support + predicted),
                      recall_lo=lo, recall_hi=hi)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C counts, rows = true class (as ``sklearn.metrics.confusion_matrix`` with ``labels=range(C)``)."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confused_pairs(confusion: np.ndarray, top: int = 20) -> list[tuple[int, int, int, int]]:
    """The ``top`` largest off-diagonal cells as (true, predicted, count, count the other way), largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.flatnonzero(off)
    order = flat[np.lexsort((flat, -off.reshape(-1)[flat]))][:top]  # count desc, then row-major: stable
    c = confusion.shape[0]
    return [(int(i // c), int(i % c), int(off.flat[i]), int(off[i % c, i // c])) for i in order]


def top_confused_with(confusion: np.ndarray, cls: int, top: int = 3) -> list[tuple[int, int]]:
    """(predicted class, count) of the ``top`` classes images of ``cls`` were mistaken for, largest first."""
    row = confusion[cls].copy()
    row[cls] = 0
    order = np.lexsort((np.arange(row.size), -row))
    return [(int(j), int(row[j])) for j in order[:top] if row[j] > 0]


@dataclass
class Samples:
    """Per-image arrays of length N from logits [N, C] and labels [N]."""

    pred: np.ndarray  # argmax class
    confidence: np.ndarray  # softmax probability of the predicted class
    p_true: np.ndarray  # softmax probability of the true class
    loss: np.ndarray  # cross-entropy -log p_true (from log-softmax, finite for confident mistakes)
    correct: np.ndarray  # bool: pred == label


def per_sample(logits: np.ndarray, labels: np.ndarray) -> Samples:
    """Prediction, confidence, true-class probability, loss and correctness of each image."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))  # log-softmax
    pred = logp.argmax(axis=1)
    rows = np.arange(len(labels))
    log_true = logp[rows, labels]
    return Samples(pred=pred, confidence=np.exp(logp[rows, pred]), p_true=np.exp(log_true), loss=-log_true,
                   correct=pred == labels)


def loss_order(loss: np.ndarray) -> np.ndarray:
    """Indices by loss, highest first; ties by index (a stable, testable order)."""
    return np.lexsort((np.arange(loss.size), -loss))


def top_losses_per_class(loss: np.ndarray, labels: np.ndarray, num_classes: int, k: int) -> list[list[int]]:
    """For each class, the indices of its ``k`` highest-loss images, highest first."""
    out: list[list[int]] = [[] for _ in range(num_classes)]
    for i in loss_order(loss):
        bucket = out[labels[i]]
        if len(bucket) < k:
            bucket.append(int(i))
    return out


@dataclass
class Calibration:
    ece: float  # expected calibration error, in [0, 1]
    edges: np.ndarray  # bin edges, length bins + 1
    count: np.ndarray  # images per bin
    accuracy: np.ndarray  # accuracy per bin (nan where empty)
    confidence: np.ndarray  # mean confidence per bin (nan where empty)


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Calibration:
    """ECE with ``bins`` equal-width bins over (0, 1], as torchmetrics' ``MulticlassCalibrationError(norm="l1")``.

    Written here because the reliability diagram needs the per-bin accuracy and confidence, which torchmetrics
    does not return; the test checks the ECE against torchmetrics.
    """
    edges = np.linspace(0, 1, bins + 1)
    # bins [lo, hi) as torchmetrics' bucketize(right=True) - 1; a confidence of exactly 1 joins the last bin
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc, conf = acc_sum / count, conf_sum / count
    n = max(int(count.sum()), 1)
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / n) if count.sum() else float("nan")
    return Calibration(ece, edges, count, acc, conf)


def intervals_overlap(stats: ClassStats) -> tuple[int, int, bool] | None:
    """(best class, worst class, do their recall intervals overlap?) over classes with images; None if < 2."""
    have = np.flatnonzero(stats.support > 0)
    if have.size < 2:
        return None
    # best: highest recall, then more images (a tighter interval); worst: lowest recall, then more images
    best = have[np.lexsort((-stats.support[have], -stats.recall[have]))[0]]
    worst = have[np.lexsort((-stats.support[have], stats.recall[have]))[0]]
    return int(best), int(worst), bool(stats.recall_hi[worst] >= stats.recall_lo[best])
