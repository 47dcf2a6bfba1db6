"""`convnext-fast predict` through the CLI: the same numbers as `eval` (one size, several, TTA, an ensemble), rows
that do not depend on batch size, listing order or loader, bad files that move no other row, sample submissions,
and one-line errors before any work.

Tiny: convnext_atto at 32 px with perturbed weights (an untrained ConvNeXt is near the identity: its layer scales
start at 1e-6), 3 classes x 4 images of varied shapes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_fast.checkpoint import export_safetensors
from convnext_fast.cli import main
from convnext_fast.predictions import Predictions

CLASSES = ["blue", "green", "red"]
TV = ["--loader", "torchvision", "--workers", "0", "--device", "cpu"]
SHAPES = [(36, 36), (44, 36), (36, 50), (40, 40)]


def make_weights(path: Path, seed: int, classes=CLASSES, **meta) -> Path:
    """A freshly built convnext_atto with its layer scales and head perturbed, in the weights format (``meta``:
    more metadata, e.g. mean/std)."""
    from convnext_fast.model import create_model

    torch.manual_seed(seed)
    model = create_model("convnext_atto", len(classes), device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0.3, 0.1)
            elif name.startswith("head.fc"):
                p.normal_(0.0, 0.5)
    export_safetensors(model.state_dict(), path, {"model_name": "convnext_atto", "num_classes": len(classes),
                                                  "classes": list(classes), "img_size": 32, "crop_pct": 0.875,
                                                  **meta})
    return path


def make_folder(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SHAPES[i % len(SHAPES)]
            px = rng.integers(0, 120, (h, w, 3))
            px[..., c] += 120
            Image.fromarray(px.astype(np.uint8)).save(root / name / f"{c}{i}.jpg")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("w")
    return make_weights(d / "a.safetensors", 0), make_weights(d / "b.safetensors", 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"))


def _eval_logits(weights: Path, data: Path, out: Path, *extra: str) -> Predictions:
    assert main(["eval", str(weights), str(data), "--report", str(out), *TV, "--batch-size", "5", *extra]) == 0
    return Predictions.load(out / "predictions.npz")


def _predict_npz(tmp: Path, *args: str) -> Predictions:
    out = tmp / f"p{len(list(tmp.glob('p*.npz')))}.npz"
    assert main(["predict", *args, "-o", str(out), *TV]) == 0
    return Predictions.load(out)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _aligned(ref: Predictions, got: Predictions, logits: np.ndarray) -> np.ndarray:
    """`logits` (rows in ref's path order) re-ordered into got's rows."""
    where = {p: i for i, p in enumerate(ref.paths)}
    assert sorted(got.paths) == sorted(ref.paths)
    return logits[[where[p] for p in got.paths]]


def test_predict_gives_evals_logits_for_sizes_tta_and_an_ensemble(weights, data, tmp_path):
    a, b = weights
    plain = _eval_logits(a, data, tmp_path / "ea", "--img-size", "32,40")
    tta = _eval_logits(a, data, tmp_path / "et", "--img-size", "32,40", "--tta")
    other = _eval_logits(b, data, tmp_path / "eb")
    cases = [((str(a), str(data)), plain.logits[0]),
             ((str(a), str(data), "--img-size", "32,40"), plain.logits.mean(0)),
             ((str(a), str(data), "--tta"), tta.logits[0]),
             ((str(a), str(data), "--tta", "--img-size", "32,40"), tta.logits.mean(0))]
    for args, expected in cases:
        got = _predict_npz(tmp_path, *args)
        want = _aligned(plain, got, expected)
        assert np.abs(got.logits[0] - want).max() < 1e-5, args
        assert (got.logits[0].argmax(1) == want.argmax(1)).all()
        assert (got.labels == -1).all() and got.meta["tta"] == ("--tta" in args)
    assert len(set(plain.logits[0].argmax(1))) > 1  # the perturbed model is not a constant
    got = _predict_npz(tmp_path, str(a), str(b), str(data), "--ensemble-weights", "3,1")
    assert other.paths == plain.paths
    want = _aligned(plain, got, 0.75 * _softmax(plain.logits[0]) + 0.25 * _softmax(other.logits[0]))
    assert np.abs(_softmax(got.logits[0]) - want).max() < 1e-5


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_rows(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b] and [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b):
        for c in CLASSES + ["prob"]:
            assert abs(float(ra[c]) - float(rb[c])) < tol, (ra["id"], c)


def test_ensemble_of_the_same_weights_twice_is_the_model(weights, data, tmp_path):
    a, _ = weights
    assert main(["predict", str(a), str(data), "-o", str(tmp_path / "one.csv"), "--probs", *TV]) == 0
    assert main(["predict", str(a), str(a), str(data), "-o", str(tmp_path / "two.csv"), "--probs", *TV]) == 0
    _assert_same_rows(_rows(tmp_path / "one.csv"), _rows(tmp_path / "two.csv"), tol=1e-6)


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_rows_do_not_depend_on_batch_size_or_listing_order(weights, data, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    a, _ = weights
    files = sorted(str(p) for p in data.rglob("*.jpg"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(reversed(files)) + "\n")
    runs = {}
    for bs, src in ((1, data), (7, data), (64, listing)):
        out = tmp_path / f"b{bs}.csv"
        assert main(["predict", str(a), str(src), "-o", str(out), "--probs", "--batch-size", str(bs),
                     "--loader", loader, "--workers", "1", "--device", "cpu", "--id-format", "name"]) == 0
        runs[bs] = _rows(out)
    assert [r["id"] for r in runs[1]] == sorted(Path(f).name for f in files)
    _assert_same_rows(runs[1], runs[7])
    _assert_same_rows(runs[1], runs[64])
    assert len({r["label"] for r in runs[1]}) > 1


def _png_that_fails_to_decode(path: Path) -> None:
    """A PNG whose header parses (the preflight passes it) and whose pixel data is garbage."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((36, 36, 3), 128, np.uint8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    start = raw.index(b"IDAT") + 4
    raw[start:start + 20] = bytes(range(200, 220))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_bad_files_keep_every_other_row(weights, data, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    a, _ = weights
    import shutil

    dirty = Path(shutil.copytree(data, tmp_path / "dirty"))
    (dirty / "green" / "1a_text.jpg").write_text("not an image")  # refused by the preflight
    _png_that_fails_to_decode(dirty / "green" / "1b_garbled.png")  # fails only when decoded
    cpu = ["--loader", loader, "--workers", "1", "--device", "cpu", "--batch-size", "5", "--probs"]
    assert main(["predict", str(a), str(data), "-o", str(tmp_path / "clean.csv"), *cpu]) == 0
    assert main(["predict", str(a), str(dirty), "-o", str(tmp_path / "dirty.csv"), *cpu]) == 0
    rows = _rows(tmp_path / "dirty.csv")
    bad = {r["id"]: r for r in rows if r["error"]}
    assert set(bad) == {"green/1a_text.jpg", "green/1b_garbled.png"}
    assert all(r["label"] == "" and r["prob"] == "" for r in bad.values())
    assert "not an image" in bad["green/1a_text.jpg"]["error"]
    _assert_same_rows(_rows(tmp_path / "clean.csv"), [r for r in rows if not r["error"]])
    assert main(["predict", str(a), str(dirty), "-o", str(tmp_path / "skip.csv"), "--skip-bad-files", *cpu]) == 0
    _assert_same_rows(_rows(tmp_path / "clean.csv"), _rows(tmp_path / "skip.csv"))


def test_sample_submission_fills_the_templates_order_and_refuses_unknown_ids(weights, data, tmp_path, capsys):
    a, _ = weights
    assert main(["predict", str(a), str(data), "-o", str(tmp_path / "all.csv"), "--probs", *TV]) == 0
    by_stem = {Path(r["id"]).stem: r for r in _rows(tmp_path / "all.csv")}
    order = sorted(by_stem, reverse=True)
    labels = tmp_path / "sample_labels.csv"
    labels.write_text("image_id,species\n" + "".join(f"{s},?\n" for s in order))
    out = tmp_path / "sub.csv"
    assert main(["predict", str(a), str(data), "-o", str(out), "--sample-submission", str(labels), *TV]) == 0
    sub = _rows(out)
    assert [r["image_id"] for r in sub] == order and list(sub[0]) == ["image_id", "species"]
    assert [r["species"] for r in sub] == [by_stem[s]["label"] for s in order]
    probs = tmp_path / "sample_probs.csv"
    probs.write_text("id,red,blue,green\n" + "".join(f"{s},0,0,0\n" for s in order[:5]))
    assert main(["predict", str(a), str(data), "-o", str(out), "--sample-submission", str(probs), *TV]) == 0
    sub = _rows(out)
    assert [r["id"] for r in sub] == order[:5]
    for r in sub:
        assert all(abs(float(r[c]) - float(by_stem[r["id"]][c])) < 1e-6 for c in CLASSES)
    labels.write_text("image_id,species\n" + "".join(f"{s},?\n" for s in order + ["nope_1", "nope_2"]))
    capsys.readouterr()
    assert main(["predict", str(a), str(data), "-o", str(out), "--sample-submission", str(labels), *TV]) == 2
    err = capsys.readouterr().err
    assert "2 of 14 ids match no image" in err and "nope_1, nope_2" in err and len(err.strip().splitlines()) == 1


def test_jsonl_and_topk_columns(weights, data, tmp_path):
    a, _ = weights
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(a), str(data), "-o", str(out), "--topk", "2", "--id-format", "stem", *TV]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(rows[0]) == ["id", "label", "prob", "label_2", "prob_2", "error"] and len(rows) == 12
    assert all(r["prob"] >= r["prob_2"] and r["label"] != r["label_2"] for r in rows)


def test_parquet_output(weights, data, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    a, _ = weights
    out = tmp_path / "p.parquet"
    assert main(["predict", str(a), str(data), "-o", str(out), "--probs", *TV]) == 0
    t = pq.read_table(out).to_pylist()
    assert len(t) == 12 and set(CLASSES) <= set(t[0]) and abs(sum(t[0][c] for c in CLASSES) - 1) < 1e-5


def test_bad_inputs_are_one_line_errors_before_any_work(weights, data, tmp_path, capsys):
    a, _ = weights
    (tmp_path / "empty").mkdir()
    listing = tmp_path / "l.txt"
    listing.write_text(f"{next(data.rglob('*.jpg'))}\nmissing/x.jpg\n")
    odd = make_weights(tmp_path / "odd.safetensors", 2, classes=["blue", "red", "green"])
    cases = [
        ([str(a), str(tmp_path / "empty"), "-o", str(tmp_path / "o.csv")], "no image files found"),
        ([str(a), str(listing), "-o", str(tmp_path / "o.csv")], "line 2: missing/x.jpg"),
        ([str(a), str(data), "-o", str(tmp_path / "nope" / "o.csv")], "does not exist"),
        ([str(a), str(data), "-o", str(tmp_path / "o.xlsx")], "unknown format"),
        ([str(a), str(odd), str(data), "-o", str(tmp_path / "o.csv")], "an ensemble needs the same classes"),
        ([str(a), str(data), "-o", str(tmp_path / "o.csv"), "--ensemble-weights", "1,2"], "1 WEIGHTS file"),
        ([str(a), str(data), "-o", str(tmp_path / "o.csv"), "--topk", "4"], "the model has 3 classes"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        assert main(["predict", *args, *TV]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.gpu
def test_predict_on_the_gpu_with_dali_gives_evals_logits(weights, data, tmp_path):
    a, _ = weights
    gpu = ["--loader", "dali", "--device", "cuda", "--batch-size", "5"]
    assert main(["eval", str(a), str(data), "--report", str(tmp_path / "e"), "--tta", *gpu]) == 0
    ref = Predictions.load(tmp_path / "e" / "predictions.npz")
    assert main(["predict", str(a), str(data), "-o", str(tmp_path / "p.npz"), "--tta", *gpu]) == 0
    got = Predictions.load(tmp_path / "p.npz")
    want = _aligned(ref, got, ref.logits[0])
    assert np.abs(got.logits[0] - want).max() < 1e-3 and (got.logits[0].argmax(1) == want.argmax(1)).all()
