"""Folder index and preflight: ImageFolder-identical classes and order; every bad input is a DatasetError."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from convnext_fast.data import DatasetError, scan_folder, stratified_split


def _jpeg_bytes(seed: int = 0, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(seed: int = 0, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder(root: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    for c in classes:
        for i in range(per_class):
            _write(root / c / f"img{i}.jpg", _jpeg_bytes(i))
    return root


def test_classes_and_samples_match_imagefolder(tmp_path):
    root = tmp_path / "data"
    classes = ["1", "10", "2", "B", "a", "é", "Ω class", "with space", "_x", "Z-9"]
    exts = [".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".bmp", ".webp"]
    for k, c in enumerate(classes):
        for i, ext in enumerate(exts[k % 3: k % 3 + 3]):
            data = _png_bytes(i) if ext.lower() == ".png" else _jpeg_bytes(i)
            if ext.lower() in (".bmp", ".webp"):
                buf = io.BytesIO()
                Image.open(io.BytesIO(_png_bytes(i))).save(buf, format=ext[1:].upper())
                data = buf.getvalue()
            _write(root / c / f"{10 - i} file{ext}", data)
        _write(root / c / "notes.txt", b"not an image, ignored like ImageFolder does")
    _write(root / "a" / "nested" / "deep.jpg", _jpeg_bytes(7))  # os.walk recursion, as ImageFolder
    _write(root / "README.md", b"a file at the root is not a class")

    index = scan_folder(root)
    ref = ImageFolder(str(root.resolve()))
    assert index.classes == ref.classes
    assert index.class_to_idx == ref.class_to_idx
    assert index.samples == ref.samples
    assert index.targets == ref.targets
    assert index.skipped == []
    assert len(index) == len(ref) == 10 * 3 + 1
    assert all(Path(p).is_absolute() for p, _ in index.samples)


def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    _folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    index = scan_folder("d")
    assert index.root == (tmp_path / "d").resolve()
    assert all(Path(p).is_absolute() and Path(p).exists() for p, _ in index.samples)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        scan_folder(tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    f = _write(tmp_path / "x.jpg", _jpeg_bytes())
    with pytest.raises(DatasetError, match=re.escape(str(f))):
        scan_folder(f)


def test_no_class_folders(tmp_path):
    _write(tmp_path / "d" / "img.jpg", _jpeg_bytes())  # images directly under root, no class folders
    with pytest.raises(DatasetError, match="no class folders"):
        scan_folder(tmp_path / "d")


def test_empty_class_folder_is_named(tmp_path):
    root = _folder(tmp_path / "d", classes=("a", "b"))
    (root / "empty_cls").mkdir()
    _write(root / "only_text" / "x.txt", b"hello")
    with pytest.raises(DatasetError) as info:
        scan_folder(root)
    msg = str(info.value)
    assert str(root / "empty_cls") in msg and str(root / "only_text") in msg
    assert str(root / "a") + "\n" not in msg


def test_single_class(tmp_path):
    root = _folder(tmp_path / "d", classes=("only",))
    with pytest.raises(DatasetError, match="only"):
        scan_folder(root)


@pytest.mark.parametrize("kind", ["zero_byte", "text_as_jpg", "truncated_jpeg", "html_as_png"])
def test_bad_file_is_named(tmp_path, kind):
    root = _folder(tmp_path / "d")
    bad = root / "b" / "bad.jpg"
    data = {"zero_byte": b"", "text_as_jpg": b"this is not an image at all, just text\n" * 4,
            "truncated_jpeg": _jpeg_bytes(3, size=32)[:200],
            "html_as_png": b"<html><body>404 Not Found</body></html>"}[kind]
    _write(bad, data)
    with pytest.raises(DatasetError) as info:
        scan_folder(root)
    assert str(bad) in str(info.value)
    assert "img0.jpg" not in str(info.value)  # only the offending files are listed


def test_verify_images_decodes(tmp_path):
    root = _folder(tmp_path / "d")
    bad = _write(root / "a" / "cut.png", _png_bytes(5, size=64)[:-60])  # cut short: header intact
    assert str(bad) in [p for p, _ in scan_folder(root).samples]  # the cheap check can't tell
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        scan_folder(root, verify_images=True)


def test_many_bad_files_lists_twenty_and_counts(tmp_path):
    root = _folder(tmp_path / "d")
    bad = [_write(root / "a" / f"bad{i:02d}.jpg", b"") for i in range(25)]
    with pytest.raises(DatasetError) as info:
        scan_folder(root)
    msg = str(info.value)
    listed = [p for p in bad if str(p) in msg]
    assert len(listed) == 20
    assert "25" in msg and "5 more" in msg


def test_skip_bad_excludes_and_reports(tmp_path):
    root = _folder(tmp_path / "d", per_class=3)
    bad = sorted(str(_write(root / c / "zzz.jpg", b"")) for c in ("a", "b"))
    index = scan_folder(root, skip_bad=True)
    assert index.skipped == bad
    assert len(index) == 6
    assert not set(bad) & {p for p, _ in index.samples}
    ref = ImageFolder(str(root.resolve()))
    assert index.samples == [s for s in ref.samples if s[0] not in bad]


def test_skip_bad_that_empties_a_class_is_an_error(tmp_path):
    root = _folder(tmp_path / "d", classes=("a",))
    _write(root / "b" / "broken.jpg", b"")
    with pytest.raises(DatasetError, match=re.escape(str(root / "b"))):
        scan_folder(root, skip_bad=True)


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)  # cli.main turns ValueErrors into clean exit-2 messages


def test_stratified_split(tmp_path):
    root = _folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10)
    index = scan_folder(root)
    train, val = stratified_split(index, 0.2, seed=1)
    assert sorted(train.samples + val.samples) == sorted(index.samples)
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert [val.targets.count(c) for c in range(3)] == [2, 2, 2]
    assert train.classes == val.classes == index.classes
    assert stratified_split(index, 0.2, seed=1)[1].samples == val.samples
    assert stratified_split(index, 0.2, seed=2)[1].samples != val.samples
