"""Demo dataset: layout, byte-for-byte determinism, the CLI, and the build-once cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext_fast.data import scan_folder
from convnext_fast.data import demo

SMALL = dict(num_classes=4, train_per_class=3, val_per_class=2, size=32)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(tmp_path):
    out = demo.make_demo_dataset(tmp_path / "demo", **SMALL, seed=3)
    assert out == (tmp_path / "demo").absolute()
    names = demo.class_names(4)
    assert names == ["red_yellow", "red_green", "red_teal", "red_blue"]
    for split, per_class in (("train", 3), ("val", 2)):
        index = scan_folder(out / split, verify_images=True)
        assert index.classes == sorted(names)
        assert np.bincount(index.targets).tolist() == [per_class] * 4
        for path, _ in index.samples:
            with Image.open(path) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "train", "val"]
    # no leftover temporary directory next to the output
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_default_classes_are_the_colour_pairs():
    names = demo.class_names()
    assert len(names) == len(set(names)) == demo.DEFAULT_NUM_CLASSES == 21
    pairs = [tuple(n.split("_")) for n in names]
    assert all(a != b and a in demo.COLOURS and b in demo.COLOURS for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == 21  # unordered pairs, none repeated


def _hue_histogram(path: Path) -> np.ndarray:
    """Share of strongly saturated pixels closest to each class colour's hue."""
    hsv = np.asarray(Image.open(path).convert("HSV"), dtype=np.float32)
    hue, sat, val = hsv[..., 0] * 360 / 256, hsv[..., 1] / 255, hsv[..., 2] / 255
    pix = hue[(sat > 0.45) & (val > 0.4)]
    centres = np.array(list(demo.COLOURS.values()))
    dist = np.abs((pix[:, None] - centres[None, :] + 180) % 360 - 180)
    return np.bincount(dist.argmin(1), minlength=len(centres)) / max(1, len(pix))


def test_images_show_the_two_colours_of_their_class(tmp_path):
    """The class name describes the pixels: a cheap check that labels and drawings are not shuffled."""
    out = demo.make_demo_dataset(tmp_path / "d", num_classes=21, train_per_class=3, val_per_class=1, size=64)
    colours = list(demo.COLOURS)
    for name in demo.class_names():
        expected = sorted(colours.index(c) for c in name.split("_"))
        for path in sorted((out / "train" / name).iterdir()):
            hist = _hue_histogram(path)
            assert sorted(np.argsort(hist)[-2:].tolist()) == expected, (path, hist.round(2))


def test_refuses_non_empty_output_and_bad_params(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="full"):
        demo.make_demo_dataset(tmp_path / "full", **SMALL)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    (tmp_path / "empty").mkdir()
    assert demo.make_demo_dataset(tmp_path / "empty", **SMALL).is_dir()
    with pytest.raises(ValueError, match="num_classes"):
        demo.make_demo_dataset(tmp_path / "x", num_classes=1)
    with pytest.raises(ValueError, match="num_classes"):
        demo.make_demo_dataset(tmp_path / "x", num_classes=demo.MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="train_per_class"):
        demo.make_demo_dataset(tmp_path / "x", train_per_class=0)


def test_ensure_builds_once_and_reuses(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = demo.ensure_demo_dataset(cache, **SMALL)
    assert first.parent == cache.absolute() and first.name.startswith("demo-")
    before = _tree(first)

    def fail(*args, **kwargs):
        raise AssertionError("the cached dataset should have been reused")

    monkeypatch.setattr(demo, "_build_into", fail)
    assert demo.ensure_demo_dataset(cache, **SMALL) == first
    assert _tree(first) == before
    monkeypatch.undo()
    other = demo.ensure_demo_dataset(cache, **{**SMALL, "seed": 1})
    assert other != first  # other parameters, other directory
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, other.name])


def test_ensure_interrupted_build_is_not_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real = demo._write_split

    def interrupted(root, split, *args):
        real(root, split, *args)
        if split == "val":
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(cache, **SMALL)
    assert list(cache.iterdir()) == []  # nothing half-built left behind under a final name
    monkeypatch.undo()
    out = demo.ensure_demo_dataset(cache, **SMALL)
    assert (out / "demo.json").is_file()
    assert len(list((out / "val").rglob("*.jpg"))) == 4 * 2


def test_ensure_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNEXT_FAST_CACHE", str(tmp_path / "envcache"))
    out = demo.ensure_demo_dataset(**SMALL)
    assert out.parent == (tmp_path / "envcache").absolute()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "convnext_fast", "demo-data", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_dataset_and_reports_errors(tmp_path):
    res = _cli("out", "--num-classes", "3", "--train-per-class", "2", "--val-per-class", "1", "--size", "24",
               "--seed", "5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "6 train + 3 val" in res.stdout
    expected = demo.make_demo_dataset(tmp_path / "api", num_classes=3, train_per_class=2, val_per_class=1,
                                      size=24, seed=5)
    assert _tree(tmp_path / "out") == _tree(expected)



def test_cli_error_is_one_clean_line(tmp_path, capsys):
    from convnext_fast.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("occupied")
    assert main(["demo-data", str(tmp_path / "out"), "--num-classes", "3"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path / "out") in err and "Traceback" not in err
    assert main(["demo-data", str(tmp_path / "new"), "--num-classes", "99"]) == 2
    assert "num_classes" in capsys.readouterr().err
