"""`convnext-fast eval --img-size A,B --report DIR` and `train --report` through the CLI, with bad inputs.

Tiny: convnext_atto with random weights at 32/40 px on 3 classes x 3 validation images (torchvision loader)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_fast.checkpoint import export_safetensors
from convnext_fast.cli import main
from convnext_fast.error_report import Predictions

CLASSES = ["blue", "green", "red"]
CPU = ["--loader", "torchvision", "--workers", "0", "--device", "cpu", "--batch-size", "4"]


def _folder(root: Path, per_class: int, classes=CLASSES, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = rng.integers(0, 90, (36, 36, 3))
            px[..., c % 3] += 150
            Image.fromarray(px.astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _folder(root / "train", 8)
    _folder(root / "val", 3, seed=1)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from convnext_fast.model import create_model

    torch.manual_seed(0)
    model = create_model("convnext_atto", len(CLASSES), device="cpu")
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    export_safetensors(model.state_dict(), path, {"model_name": "convnext_atto", "num_classes": 3,
                                                  "classes": CLASSES, "img_size": 32, "crop_pct": 0.875})
    return path


def test_eval_at_several_sizes_prints_a_table_and_writes_the_report(weights, data, tmp_path, capsys):
    out, js = tmp_path / "rep", tmp_path / "m.json"
    assert main(["eval", str(weights), str(data), "--img-size", "32,40", "--report", str(out), "--json", str(js),
                 *CPU]) == 0
    shown = capsys.readouterr().out
    assert "Accuracy by test size" in shown and "32 (trained)" in shown and f"report: {out / 'report.html'}" in shown
    result = json.loads(js.read_text())
    assert [r["img_size"] for r in result["by_img_size"]] == [32, 40] and result["img_size"] == 32
    preds = Predictions.load(out / "predictions.npz")  # the saved pass is what the report shows
    assert preds.logits.shape == (2, 9, 3) and preds.img_sizes == [32, 40]
    assert preds.paths[0].endswith("val/blue/0.jpg") and preds.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    for s, row in enumerate(result["by_img_size"]):
        top1 = 100 * (preds.logits[s].argmax(1) == preds.labels).mean()
        assert row["top1"] == pytest.approx(top1) and row["count"] == 9
    html = (out / "report.html").read_text()
    assert "Per-class recall by test size" in html and "40 px" in html
    header = (out / "per_class.csv").read_text().splitlines()[0]
    assert header.endswith("recall_at_32,recall_at_40")
    # one size as before: the same numbers as the default (trained) size, no size table
    single = tmp_path / "one.json"
    assert main(["eval", str(weights), str(data), "--img-size", "32", "--json", str(single), *CPU]) == 0
    assert "Accuracy by test size" not in capsys.readouterr().out
    one = json.loads(single.read_text())
    assert one["top1"] == pytest.approx(result["top1"]) and "by_img_size" not in one


@pytest.mark.parametrize("sizes", ["32,x", "32,32", "4"])
def test_bad_size_list_is_one_line(weights, data, sizes, capsys):
    assert main(["eval", str(weights), str(data), "--img-size", sizes, *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert "--img-size" in err and len(err.splitlines()) == 1


def test_report_dir_that_is_a_file_fails_before_the_evaluation(weights, data, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["eval", str(weights), str(data), "--report", str(tmp_path / "taken"), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert "--report" in err and "not a directory" in err and len(err.splitlines()) == 1


def test_class_count_mismatch_names_both(weights, tmp_path, capsys):
    other = _folder(tmp_path / "four", 1, classes=CLASSES + ["yellow"])
    assert main(["eval", str(weights), str(other), "--report", str(tmp_path / "r"), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err and str(other) in err
    assert "3 classes" in err and "4 classes" in err and "yellow" in err
    assert not (tmp_path / "r").exists()  # nothing written before the check


def test_class_without_validation_images_is_shown_as_such(weights, tmp_path):
    val = _folder(tmp_path / "val", 2)
    shutil.rmtree(val / "green")
    (val / "green").mkdir()  # an empty class folder: a class with no validation images
    out = tmp_path / "rep"
    assert main(["eval", str(weights), str(val), "--report", str(out), *CPU]) == 0
    html = (out / "report.html").read_text()
    assert "1 class(es) have no validation images" in html and "green" in html
    last = (out / "per_class.csv").read_text().splitlines()[-1].split(",")
    assert last[1:4] == ["green", "0", "0"] and last[6] == ""  # recall empty, not 0 and not a crash


def test_train_report_writes_into_the_run_directory(data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--model", "convnext_atto", "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3",
             "--model-ema", "--model-ema-decay", "0.5", "--log-every", "1", "--loader", "torchvision",
             "--workers", "0", "--device", "cpu"]
    assert main(["train", str(data), "--out", str(run), *flags, "--report"]) == 0
    page = run / "report" / "report.html"
    assert page.is_file() and f"report: {page}" in capsys.readouterr().out
    html = page.read_text()
    assert str(run / "model.safetensors") in html and "EMA weights</th><td>yes" in html
    preds = Predictions.load(run / "report" / "predictions.npz")
    assert preds.logits.shape == (1, 9, 3) and preds.classes == CLASSES
