"""The error report's numbers against reference computations, its files, and its bad inputs (no model here:
a report is built from saved predictions)."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from convnext_fast.error_report import Predictions, build_report
from convnext_fast.error_report.analysis import (calibration, class_stats, confused_pairs, confusion_matrix,
                                                 per_sample, wilson_interval)

# Rows: true class, columns: predicted. Class 3 has no images; class 4 is never predicted.
CONF = np.array([[8, 1, 1, 0, 0],
                 [2, 5, 3, 0, 0],
                 [0, 0, 9, 0, 0],
                 [0, 0, 0, 0, 0],
                 [1, 2, 0, 0, 0]])


def test_precision_recall_f1_and_intervals_against_hand_computation():
    s = class_stats(CONF)
    tp = np.diag(CONF).astype(float)
    # by hand: recall = tp / row sum, precision = tp / column sum, F1 = 2PR / (P + R)
    assert s.support.tolist() == [10, 10, 9, 0, 3] and s.predicted.tolist() == [11, 8, 13, 0, 0]
    np.testing.assert_allclose(s.recall[[0, 1, 2, 4]], [0.8, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(s.precision[:3], [8 / 11, 5 / 8, 9 / 13])
    p, r = tp[:3] / CONF.sum(0)[:3], tp[:3] / CONF.sum(1)[:3]
    np.testing.assert_allclose(s.f1[:3], 2 * p * r / (p + r))
    assert math.isnan(s.recall[3]) and math.isnan(s.precision[3])  # no images: undefined, not 0 and no crash
    assert math.isnan(s.precision[4]) and s.recall[4] == 0.0  # never predicted: precision undefined
    # Wilson 95%: the textbook value for 8/10 (0.4902, 0.9433), and scipy's binomtest for every class
    assert s.recall_lo[0] == pytest.approx(0.4902, abs=1e-4) and s.recall_hi[0] == pytest.approx(0.9433, abs=1e-4)
    binomtest = pytest.importorskip("scipy.stats").binomtest

    for c in (0, 1, 2, 4):
        ci = binomtest(int(s.correct[c]), int(s.support[c])).proportion_ci(0.95, method="wilson")
        assert (s.recall_lo[c], s.recall_hi[c]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert np.isnan(s.recall_lo[3]) and np.isnan(s.recall_hi[3])
    # and scikit-learn's reference on the same matrix, expanded to (true, predicted) pairs
    metrics = pytest.importorskip("sklearn.metrics")
    true, pred = np.divmod(np.arange(25), 5)
    ref = metrics.precision_recall_fscore_support(true, pred, labels=np.arange(5), sample_weight=CONF.reshape(-1),
                                                  zero_division=np.nan)
    for ours, theirs in zip((s.precision, s.recall, s.f1, s.support), ref):
        np.testing.assert_allclose(ours, theirs)
    lo, hi = wilson_interval(np.array([150 * 0.8]), np.array([150]))  # the "about +-7 points"
    assert 0.06 < 0.8 - lo[0] < 0.08 and 0.05 < hi[0] - 0.8 < 0.07


def test_confusion_matrix_and_rates_match_sklearn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels, preds = rng.integers(0, 9, 400), rng.integers(0, 9, 400)
    labels[labels == 8] = 7  # class 8: no images, still predicted
    conf = confusion_matrix(labels, preds, 9)
    np.testing.assert_array_equal(conf, metrics.confusion_matrix(labels, preds, labels=np.arange(9)))
    s = class_stats(conf)
    ref = metrics.precision_recall_fscore_support(labels, preds, labels=np.arange(9), zero_division=np.nan)
    for ours, theirs in zip((s.precision, s.recall, s.f1, s.support), ref):
        np.testing.assert_allclose(ours, theirs)


def test_confused_pairs_both_directions():
    pairs = confused_pairs(CONF, top=3)
    assert pairs[0] == (1, 2, 3, 0)  # 3 images of class 1 predicted as 2; none the other way
    assert pairs[1] == (1, 0, 2, 1) and pairs[2] == (4, 1, 2, 0)  # ties: row-major order


def test_per_sample_loss_is_cross_entropy_and_ece_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 7, generator=g) * 3, torch.randint(0, 7, (500,), generator=g)
    sm = per_sample(logits.numpy(), labels.numpy())
    np.testing.assert_allclose(sm.loss, F.cross_entropy(logits.double(), labels, reduction="none").numpy(), rtol=1e-9)
    probs = logits.double().softmax(1)
    np.testing.assert_allclose(sm.confidence, probs.max(1).values.numpy(), rtol=1e-9)
    assert (sm.correct == (logits.argmax(1) == labels).numpy()).all()
    cal = calibration(sm.confidence, sm.correct)
    assert cal.count.sum() == 500 and len(cal.edges) == 16
    torchmetrics = pytest.importorskip("torchmetrics")
    ref = torchmetrics.classification.MulticlassCalibrationError(num_classes=7, n_bins=15, norm="l1")
    assert cal.ece == pytest.approx(ref(probs.float(), labels).item(), abs=1e-5)


def _images(root, n, bad=()):
    """n small JPEGs; indices in ``bad``: one missing file and one that is not an image."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / f"img{i:03d}.jpg"
        if i in bad and i % 2 == 0:
            p.write_bytes(b"this is not a jpeg")
        elif i not in bad:
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _predictions(tmp_path, num_classes=5, per_class=6, sizes=(32,), bad=(), empty=(3,), seed=0):
    """Predictions whose labels skip the ``empty`` classes; logits noisy around the truth."""
    labels = np.array([c for c in range(num_classes) if c not in empty for _ in range(per_class)])
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (len(sizes), len(labels), num_classes)).astype(np.float32)
    logits[:, np.arange(len(labels)), labels] += np.linspace(0.0, 3.0, len(sizes))[:, None] + 0.5
    paths = _images(tmp_path / "imgs", len(labels), bad=bad)
    meta = {"weights": "w.safetensors", "data": str(tmp_path / "imgs"), "model": "convnext_atto", "tta": True,
            "ema": True, "created": "2026-12-01 20:00:00 UTC", "trained_img_size": 32}
    return Predictions(classes=[f"class_{c}" for c in range(num_classes)], labels=labels, paths=paths,
                       img_sizes=list(sizes), logits=logits, meta=meta)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_top_loss_order_and_bad_inputs(tmp_path):
    preds = _predictions(tmp_path, bad=(4, 7))
    preds.save(tmp_path / "out" / "predictions.npz")
    page = build_report(Predictions.load(tmp_path / "out" / "predictions.npz"), tmp_path / "out", per_class_k=6)
    out = tmp_path / "out"
    for name in ("report.html", "per_class.csv", "top_losses.csv", "confusion_matrix.csv", "predictions.npz"):
        assert (out / name).is_file(), name
    html = page.read_text()
    # top_losses.csv: every image, highest cross-entropy first, with its path and labels
    rows = _rows(out / "top_losses.csv")
    ref = F.cross_entropy(torch.from_numpy(preds.logits[0]).double(), torch.from_numpy(preds.labels),
                          reduction="none").numpy()
    assert [r["path"] for r in rows] == [preds.paths[i] for i in np.argsort(-ref, kind="stable")]
    assert [float(r["loss"]) for r in rows] == pytest.approx(sorted(ref, reverse=True), abs=1e-4)
    first = int(np.argmax(ref))
    assert rows[0]["true"] == preds.classes[preds.labels[first]] and rows[0]["correct"] in ("0", "1")
    # per_class.csv: worst recall first, the class without images last with empty rates
    per_class = _rows(out / "per_class.csv")
    recalls = [float(r["recall"]) for r in per_class[:-1]]
    assert recalls == sorted(recalls) and per_class[-1]["class"] == "class_3"
    assert per_class[-1]["images"] == "0" and per_class[-1]["recall"] == "" and per_class[-1]["recall_lo95"] == ""
    assert "no validation images" in html and "class_3" in html
    # unreadable images: named in the page, the rest of the report still there
    for i in (4, 7):
        assert preds.paths[i] in html
    assert "2 image(s) could not be read" in html
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    assert "4.jpg" not in thumbs and "7.jpg" not in thumbs and len(thumbs) == len(preds.labels) - 2
    # the header says what was evaluated and when
    for text in ("w.safetensors", "convnext_atto", "flip", "EMA weights", "2026-12-01 20:00:00 UTC", "32 px"):
        assert text in html, text
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html


def test_overlap_note_says_whether_the_gap_may_be_noise(tmp_path):
    preds = _predictions(tmp_path, per_class=4, empty=())
    assert "The gap may be noise" in build_report(preds, tmp_path / "small").read_text()  # 4 images per class
    big = _predictions(tmp_path, num_classes=2, per_class=200, empty=())
    big.logits[0, big.labels == 1] = np.array([0.0, 5.0])  # class 1 always right
    big.logits[0, np.flatnonzero(big.labels == 0)[:100]] = np.array([0.0, 5.0])  # class 0 right half the time
    assert "larger than the noise" in build_report(big, tmp_path / "big").read_text()


def test_many_classes_show_the_worst_first_and_a_heat_map(tmp_path):
    c = 1000
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(c), 3)
    logits = rng.normal(0, 1, (1, len(labels), c)).astype(np.float32)
    logits[0, np.arange(len(labels)), labels] += rng.uniform(0, 4, len(labels)).astype(np.float32)
    img = tmp_path / "one.jpg"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    preds = Predictions(classes=[f"c{i:04d}" for i in range(c)], labels=labels, paths=[str(img)] * len(labels),
                        img_sizes=[32], logits=logits)
    page = build_report(preds, tmp_path / "r", worst_n=25)
    html = page.read_text()
    assert (tmp_path / "r" / "confusion_matrix.png").is_file() and 'class="matrix"' not in html
    assert html.count('<tr class="" data-name=') == 25  # the worst 25 shown, the rest collapsed
    assert html.count('<tr class="extra" data-name=') == c - 25
    assert page.stat().st_size < 8_000_000
