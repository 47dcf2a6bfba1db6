"""`convnext-fast export --format onnx` through the CLI: ONNX Runtime gives PyTorch's logits (to ~1e-4, the same
top-1) on real images of a model with perturbed weights, at a second size with --dynamic-size, with the
preprocessing inside the graph; one file with the preprocessing in its metadata; the README's snippet runs.

Tiny: convnext_atto at 32 px, perturbed (an untrained ConvNeXt is near the identity and would prove little)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from convnext_fast.cli import main  # noqa: E402
from convnext_fast.data.index import ImageIndex  # noqa: E402
from convnext_fast.inference.model import load_model  # noqa: E402
from convnext_fast.inference.onnx_export import read_metadata, to_pixels  # noqa: E402
from convnext_fast.predictions import Predictions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_predict import make_folder, make_weights

    d = tmp_path_factory.mktemp("exp")
    # Not ImageNet's mean/std: the README snippet (which reads them from the ONNX metadata) matching predict shows
    # that predict, export and the metadata all use the weights' own.
    return make_weights(d / "w.safetensors", 3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]), make_folder(d / "data")


def _images(weights: Path, data: Path, size: int) -> torch.Tensor:
    """The eval loader's batch of DATA at ``size`` (what PyTorch sees in eval and predict)."""
    lm = load_model(weights, device="cpu")
    files = sorted(str(p) for p in data.rglob("*.jpg"))
    index = ImageIndex(data, lm.classes, {c: i for i, c in enumerate(lm.classes)}, [(p, 0) for p in files])
    loader = lm.loader(index, size, backend="torchvision", batch_size=len(files), workers=0)
    try:
        return next(iter(loader)).images.float().contiguous()
    finally:
        loader.close()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_runtime_agrees_with_pytorch_at_two_sizes(setup, tmp_path, capsys, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    weights, data = setup
    out = tmp_path / "model.onnx"
    assert main(["export", str(weights), str(data), "--format", "onnx", "-o", str(out), "--dynamic-size",
                 "--loader", "torchvision", "--exporter", exporter]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"check: ONNX Runtime vs PyTorch on 12 images of .* at 32px: .* top-1 agreement 100\.0%", shown)
    assert "at 64px" in shown
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one file: no external data
    meta = read_metadata(out)
    assert meta["classes"] == ["blue", "green", "red"] and meta["img_size"] == 32 and meta["crop_pct"] == 0.875
    assert meta["mean"] == [0.5, 0.4, 0.3] and meta["std"] == [0.2, 0.25, 0.3]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_outputs()[0].name == "logits"
    model = load_model(weights, device="cpu").model
    for size in (32, 64):
        x = _images(weights, data, size)
        with torch.no_grad():
            ref = model(x).numpy()
        assert ref.std(0).mean() > 0.05  # the images are told apart: the check can fail
        for batch in (x, x[:1], x[3:8]):  # dynamic batch
            got = session.run(["logits"], {"images": batch.numpy()})[0]
            want = ref[:len(got)] if batch is x or len(batch) == 1 else ref[3:8]
            assert np.abs(got - want).max() < 1e-4
            assert (got.argmax(1) == want.argmax(1)).all()


def test_preprocessing_inside_the_graph_takes_uint8_pixels(setup, tmp_path, capsys):
    weights, data = setup
    out = tmp_path / "pre.onnx"
    assert main(["export", str(weights), "--check-data", str(data), "-o", str(out), "--with-preprocessing",
                 "--loader", "torchvision"]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    lm = load_model(weights, device="cpu")
    x = _images(weights, data, 32)
    pixels = to_pixels(x, lm.mean, lm.std)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    got = session.run(["logits"], {"images": pixels.numpy()})[0]
    with torch.no_grad():
        ref = lm.model(x).numpy()
    assert np.abs(got - ref).max() < 1e-3 and (got.argmax(1) == ref.argmax(1)).all()


def test_without_images_it_says_what_it_checked(setup, tmp_path, capsys):
    weights, _ = setup
    assert main(["export", str(weights), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "random normal inputs (no DATA or --check-data given" in capsys.readouterr().out
    assert main(["export", str(weights), "-o", str(tmp_path / "nope" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(weights), "-o", str(tmp_path / "m.onnx"), "--tolerance", "0"]) == 1
    assert "is not trustworthy" in capsys.readouterr().out


def test_readme_onnx_snippet_runs_and_matches_predict(setup, tmp_path, monkeypatch):
    weights, data = setup
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
              if "onnxruntime" in b]
    assert len(blocks) == 1, "expected one ONNX Runtime snippet in README.md"
    assert main(["export", str(weights), "-o", str(tmp_path / "model.onnx")]) == 0
    photo = next(data.glob("red/*2.jpg"))  # 36 x 50: not square, so the resize and crop are exercised
    (tmp_path / "photo.jpg").write_bytes(photo.read_bytes())
    assert main(["predict", str(weights), str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "p.npz"),
                 "--loader", "torchvision", "--workers", "0", "--device", "cpu"]) == 0
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    want = Predictions.load(tmp_path / "p.npz").logits[0]
    assert np.abs(namespace["logits"] - want).max() < 1e-4
