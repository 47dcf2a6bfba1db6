import json
import math
import os

import pytest
from PIL import Image
from rich.console import Console

from convnext_fast.run_files import RunReporter, atomic_write_text, epoch_table, read_jsonl, render_eval_report

CLASSES = [f"class_{i}" for i in range(5)]
CONF = [[3, 1, 0, 0, 0], [0, 4, 0, 0, 0], [1, 0, 2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 2, 2]]
PER_CLASS = [75.0, 100.0, 50.0, math.nan, 50.0]


def _rows(n=3, ema=True):
    rows = []
    for e in range(n):
        row = {"epoch": e, "train_loss": 2.0 - 0.3 * e, "val_loss": 1.9 - 0.2 * e, "val_top1": 20.0 + 10 * e,
               "val_top5": 60.0 + 5 * e, "lr": 1e-3 / (e + 1)}
        if ema:
            row["ema_val_top1"] = 18.0 + 11 * e
        rows.append(row)
    return rows


def test_jsonl_lines_parse_and_nan_becomes_null(tmp_path):
    rep = RunReporter(tmp_path / "run", CLASSES)
    for row in _rows():
        rep.log_epoch(row)
    rep.log_epoch({"epoch": 3, "val_loss": math.nan})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    parsed = [json.loads(line) for line in lines]
    assert parsed[:3] == _rows() and parsed[3] == {"epoch": 3, "val_loss": None}
    assert rep.rows() == parsed


def test_torn_last_line_ignored_and_rewind(tmp_path):
    rep = RunReporter(tmp_path, CLASSES)
    for row in _rows(4):
        rep.log_epoch(row)
    with open(rep.metrics_path, "a") as f:
        f.write('{"epoch": 4, "val_lo')  # crash mid-write
    assert [r["epoch"] for r in read_jsonl(rep.metrics_path)] == [0, 1, 2, 3]
    assert [r["epoch"] for r in rep.rewind(2)] == [0, 1]
    rep.log_epoch(_rows(3)[2])
    assert [r["epoch"] for r in rep.rows()] == [0, 1, 2]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_summary_is_atomic(tmp_path, monkeypatch):
    rep = RunReporter(tmp_path, CLASSES)
    rep.write_summary({"best_top1": 80.0, "per_class_acc": PER_CLASS, "path": tmp_path})
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["best_top1"] == 80.0 and data["per_class_acc"][3] is None and data["path"] == str(tmp_path)

    # a crash between writing the temp file and the rename leaves the old summary intact
    def crash(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        rep.write_summary({"best_top1": 99.0})
    assert json.loads((tmp_path / "summary.json").read_text())["best_top1"] == 80.0
    monkeypatch.undo()
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_plots_are_valid_pngs(tmp_path):
    rep = RunReporter(tmp_path, CLASSES)
    paths = rep.make_plots(_rows(), PER_CLASS, CONF)
    names = {p.name for p in paths}
    assert names == {"loss.png", "accuracy.png", "lr.png", "per_class_accuracy.png", "confusion_matrix.png"}
    for p in paths:
        assert p.parent == tmp_path / "plots"
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            im.verify()
    # eval-only: no epoch rows -> only the per-class plots
    assert {p.name for p in RunReporter(tmp_path / "eval", CLASSES).make_plots([], PER_CLASS, CONF)} == {
        "per_class_accuracy.png", "confusion_matrix.png"}


def test_non_main_writes_nothing(tmp_path):
    rep = RunReporter(tmp_path / "run", CLASSES, is_main=False)
    rep.log_epoch(_rows(1)[0])
    assert rep.write_summary({"a": 1}) is None
    assert rep.make_plots(_rows(), PER_CLASS, CONF) == []
    assert rep.rewind(0) == [] and rep.rows() == []
    assert not (tmp_path / "run").exists()


def test_rich_tables_render(tmp_path):
    console = Console(record=True, width=200)
    metrics = {"top1": 11 / 18 * 100, "top5": 100.0, "count": 18, "per_class_acc": PER_CLASS, "confusion": CONF}
    render_eval_report(console, CLASSES, metrics)
    text = console.export_text()
    assert "class_2" in text and "61.11%" in text and "50.0" in text
    assert "class_0 (1)" in text  # class_2's worst confusion: class_0 (and class_3) with one image each
    render_eval_report(console, CLASSES, metrics, max_matrix_classes=2)
    assert "Top 4 confusions" in console.export_text()
    console.print(epoch_table(_rows()))
    out = console.export_text()
    assert "ema_val_top1" in out and "0.0005" in out


def test_epoch_table_prints_sizes_as_pixels():
    console = Console(record=True, width=120)
    console.print(epoch_table([{"epoch": 1, "img_size": 128, "val_top1": 20.0}], keys=["epoch", "img_size", "val_top1"]))
    out = console.export_text()
    assert " 128 " in out and "128.00" not in out and "20.00" in out
