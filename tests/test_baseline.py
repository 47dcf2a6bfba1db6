"""The torchvision baseline loader: the loader contract, determinism, colour modes, corrupt files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_fast.data import IMAGENET_MEAN, IMAGENET_STD, Batch, DatasetError, build_loader, scan_folder

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _colour(i: int) -> tuple[int, int, int]:
    """A distinct solid colour per sample id (ids < 216), so a pixel tells which file a batch row came from."""
    return (40 * (i % 6) + 20, 40 * (i // 6 % 6) + 20, 40 * (i // 36) + 20)


def _solid_folder(root: Path, per_class=(4, 3, 3), size=(20, 14)) -> tuple[Path, dict[tuple, int]]:
    """Lossless solid-colour PNGs of different shapes; returns the folder and colour -> class index."""
    colour_to_class, i = {}, 0
    for c, n in enumerate(per_class):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", size if k % 2 else size[::-1], _colour(i)).save(root / f"class{c}" / f"{k}.png")
            colour_to_class[_colour(i)] = c
            i += 1
    return root, colour_to_class


def _pixels(images: torch.Tensor) -> list[tuple[int, int, int]]:
    """Back from a normalized batch to each row's (solid) 0..255 colour."""
    rgb = (images.float() * STD + MEAN) * 255
    centre = rgb[:, :, rgb.shape[2] // 2, rgb.shape[3] // 2]
    return [tuple(int(v) for v in row) for row in centre.round().to(torch.int64)]


def _loader(root, **kw):
    args = dict(train=True, img_size=16, batch_size=4, backend="torchvision", device="cpu", num_workers=0,
                randaugment=None)
    return build_loader(root, **{**args, **kw})


def test_train_batches_follow_the_contract(tmp_path):
    root, colour_to_class = _solid_folder(tmp_path / "d")
    loader = _loader(root, seed=1)
    assert loader.classes == ["class0", "class1", "class2"]
    assert loader.class_to_idx == {"class0": 0, "class1": 1, "class2": 2}
    assert len(loader) == 2 and loader.num_samples == 8  # 10 samples, batch 4: the partial batch is dropped
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert isinstance(batch, Batch)
        images, labels = batch  # unpacks like a DataLoader batch
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        # solid images survive crop/flip/resize unchanged: the pixel names the file, the label its class
        for colour, label in zip(_pixels(images), labels.tolist()):
            assert colour_to_class[colour] == label
    seen = [c for b in batches for c in _pixels(b.images)]
    assert len(set(seen)) == 8  # drawn without replacement


def test_eval_sees_every_sample_once_in_order(tmp_path):
    root, colour_to_class = _solid_folder(tmp_path / "d")
    loader = _loader(root, train=False)
    assert len(loader) == 3 and loader.num_samples == 10
    batches = list(loader)
    assert [len(b.labels) for b in batches] == [4, 4, 2]  # the last partial batch is kept
    colours = [c for b in batches for c in _pixels(b.images)]
    index = scan_folder(root)
    assert colours == [_colour(i) for i in range(10)]  # ImageFolder order
    assert torch.cat([b.labels for b in batches]).tolist() == index.targets


def test_normalization_and_eval_geometry(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        img = np.zeros((40, 60, 3), dtype=np.uint8)
        img[:, :, 0] = 255  # red everywhere, except a green centre square that the center crop keeps
        img[4:36, 12:48] = (0, 255, 0)
        Image.fromarray(img).save(root / c / "x.png")
    images = next(iter(_loader(root, train=False, img_size=8, crop_pct=0.5))).images
    # Resize shorter side to int(8 / 0.5) = 16 -> 16x24, center crop 8x8 -> exactly the green square.
    expected = ((torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1) - MEAN) / STD).expand(2, 3, 8, 8)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


def test_two_shards_are_disjoint_and_cover(tmp_path):
    root, _ = _solid_folder(tmp_path / "d", per_class=(6, 5, 5))
    train = [[c for b in _loader(root, batch_size=2, shard_id=s, num_shards=2) for c in _pixels(b.images)]
             for s in range(2)]
    assert len(train[0]) == len(train[1]) == 8
    assert not set(train[0]) & set(train[1])
    evals = [[c for b in _loader(root, train=False, batch_size=3, shard_id=s, num_shards=2)
              for c in _pixels(b.images)] for s in range(2)]
    assert evals[0] + evals[1] == [_colour(i) for i in range(16)]


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(b.images.clone(), b.labels.clone()) for b in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_same_seed_same_batches_across_worker_counts(tmp_path):
    """Augmented batches are a pure function of (seed, epoch, shard): not of workers, nor of earlier epochs."""
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    kw = dict(randaugment=(2, 9), reprob=0.5, scale=(0.3, 1.0))
    a = _loader(root, seed=7, **kw)
    a0, a1 = _epoch(a, 0), _epoch(a, 1)
    b = _loader(root, seed=7, num_workers=2, **kw)
    try:
        assert _same(_epoch(b, 1), a1)  # epoch 1 first: resuming needs only set_epoch
        assert _same(_epoch(b, 0), a0)
    finally:
        b.close()
    assert not _same(a0, a1)  # a new epoch reshuffles and redraws the augmentation
    assert not _same(_epoch(_loader(root, seed=8, **kw), 0), a0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _epoch(a, 0)  # loading in the main process leaves the caller's RNG stream alone
    assert torch.equal(torch.rand(3), expected)


def test_colour_modes_become_rgb(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    Image.new("L", (12, 12), 200).save(root / "a" / "gray.png")
    Image.new("RGBA", (12, 12), (10, 20, 30, 128)).save(root / "a" / "rgba.png")
    Image.new("CMYK", (12, 12), (0, 0, 0, 0)).save(root / "b" / "cmyk.jpg", quality=100)
    pal = Image.new("P", (12, 12), 1)
    pal.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    pal.save(root / "b" / "palette.png")
    Image.new("I;16", (12, 12), 300).save(root / "b" / "gray16.png")
    batch = next(iter(_loader(root, train=False, img_size=8, batch_size=8)))
    assert batch.images.shape == (5, 3, 8, 8)
    colours = _pixels(batch.images)
    assert colours[0] == (200, 200, 200)  # a/gray.png
    assert colours[1] == (10, 20, 30)  # a/rgba.png: alpha dropped, as PIL's convert("RGB")
    assert all(abs(v - 255) <= 1 for v in colours[2])  # b/cmyk.jpg: no ink is white
    assert colours[4] == (250, 100, 50)  # b/palette.png


def _corrupt_after_scan(tmp_path) -> tuple:
    root, _ = _solid_folder(tmp_path / "d")
    index = scan_folder(root)
    victim = Path(index.samples[5][0])
    data = victim.read_bytes()
    victim.write_bytes(data[:8] + b"\x00" * (len(data) - 8))  # still a PNG signature; garbage after it
    return index, victim


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_file_mid_epoch_raises_dataset_error_naming_it(tmp_path, workers):
    index, victim = _corrupt_after_scan(tmp_path)
    loader = _loader(index, train=False, num_workers=workers)
    try:
        with pytest.raises(DatasetError, match=re.escape(str(victim))) as info:
            for _ in loader:
                pass
        assert "Original Traceback" not in str(info.value)  # the worker's wrapper is peeled off
    finally:
        loader.close()


def test_dtype_randaugment_and_erasing(tmp_path):
    root, _ = _solid_folder(tmp_path / "d")
    loader = _loader(root, dtype=torch.bfloat16, randaugment=(2, 15), reprob=1.0, num_workers=1)
    try:
        batches = list(loader)
        assert len(batches) == 2
        for b in batches:
            assert b.images.dtype == torch.bfloat16 and b.images.shape == (4, 3, 16, 16)
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            # random erasing (p=1) writes zeros into every image, which a solid colour never normalizes to
            assert all((img == 0).all(0).any() for img in b.images)
        assert len(list(loader)) == 2  # persistent workers serve a second epoch
    finally:
        loader.close()


def test_too_few_samples_for_a_train_batch(tmp_path):
    root, _ = _solid_folder(tmp_path / "d", per_class=(1, 1, 1))
    with pytest.raises(DatasetError, match="batch"):
        _loader(root, batch_size=4)
