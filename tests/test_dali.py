"""The DALI backend on the CPU (the same graph runs on the GPU): loader contract, epochs, shards, determinism,
fidelity to torchvision's transforms, bad files and odd image formats. Images are tiny and made in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from convnext_fast.data import DatasetError, ImageIndex, build_loader, scan_folder  # noqa: E402
from convnext_fast.data import dali as D  # noqa: E402
from convnext_fast.data import dali_params as P  # noqa: E402

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
COLOURS = {"blue": (40, 50, 210), "green": (30, 200, 40), "red": (220, 30, 30)}  # sorted: class index order
SIZES = [(48, 40), (40, 56), (64, 64), (37, 45)]


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 RGB."""
    return (images.float().cpu() * STD + MEAN) * 255


def _textured(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    ph = rng.uniform(0, 6, 3)
    img = np.stack([128 + 90 * np.sin(xx / 5.0 + ph[0]), 128 + 90 * np.cos(yy / 7.0 + ph[1]),
                    128 + 70 * np.sin((xx + yy) / 9.0 + ph[2])], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory) -> Path:
    """3 classes x 12 solid-colour JPEGs of assorted sizes: a label can be read back from the pixels."""
    root = tmp_path_factory.mktemp("solid")
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for i in range(12):
            w, h = SIZES[i % len(SIZES)]
            Image.new("RGB", (w, h), colour).save(root / name / f"{i:02d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    """Textured images in the formats users have: RGB/grayscale/CMYK JPEG, RGB/RGBA/palette PNG, BMP."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i, (w, h) in enumerate([(57, 43), (40, 64), (72, 72), (50, 41), (45, 60), (64, 48), (33, 47)]):
            im = Image.fromarray(_textured(rng, w, h))
            kind = i % 7
            if kind == 0:
                im.save(root / c / f"{i}.jpg", quality=95)
            elif kind == 1:
                im.convert("L").save(root / c / f"{i}.jpg", quality=95)
            elif kind == 2:
                im.convert("CMYK").save(root / c / f"{i}.jpg", quality=95)
            elif kind == 3:
                im.save(root / c / f"{i}.png")
            elif kind == 4:
                rgba = im.convert("RGBA")
                rgba.putalpha(255)  # opaque: PIL's convert("RGB") drops alpha, so compare like for like
                rgba.save(root / c / f"{i}.png")
            elif kind == 5:
                im.convert("P").save(root / c / f"{i}.png")
            else:
                im.save(root / c / f"{i}.bmp")
    return root


def _loader(root, **kw):
    args = dict(train=True, img_size=32, batch_size=8, backend="dali", device="cpu", num_workers=2)
    args.update(kw)
    return build_loader(root, **args)


def test_train_contract_and_labels_match_pixels(solid_root):
    ld = _loader(solid_root, randaugment=None, batch_size=8)
    assert len(ld) == 36 // 8 and ld.num_samples == 32  # drop_last
    assert ld.classes == sorted(COLOURS)
    batches = list(ld)
    assert len(batches) == 4
    for images, labels in batches:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        mean_rgb = _pixels(images).mean(dim=(2, 3))
        expected = torch.tensor([COLOURS[ld.classes[int(t)]] for t in labels], dtype=torch.float32)
        assert (mean_rgb - expected).abs().max() < 4.0  # solid colours survive crop/flip/resize + JPEG
    ld.close()


def test_randaugment_batches_are_valid(solid_root, mixed_root):
    ld = _loader(mixed_root, img_size=40, batch_size=14, randaugment=(2, 15))
    images, labels = next(iter(ld))
    assert images.shape == (14, 3, 40, 40) and torch.isfinite(images).all()
    assert images.is_contiguous(memory_format=torch.channels_last)
    px = _pixels(images)
    assert px.min() > -0.5 and px.max() < 255.5 and px.std() > 10  # normalized uint8 images, not garbage
    ld.close()


def test_random_erasing_replaces_one_box_per_sample(solid_root):
    def first_batch(reprob):
        ld = _loader(solid_root, batch_size=12, reprob=reprob, randaugment=None)
        out = next(iter(ld))
        ld.close()
        return out.images

    plain, erased = first_batch(0.0), first_batch(1.0)
    assert erased.is_contiguous(memory_format=torch.channels_last)
    changed = (plain != erased).any(dim=1)  # [B, H, W]
    assert changed.flatten(1).any(dim=1).all()  # every sample erased (p=1)
    for m in changed:  # the changed pixels form one box covering 2%..33% of the image
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert m.sum() >= 0.9 * box and 0.02 * 32 * 32 * 0.8 <= box <= 32 * 32 / 3 * 1.1


def test_epochs_are_pure_functions_of_seed_epoch_shard(solid_root):
    def epoch(seed, e, shard=0):
        ld = _loader(solid_root, seed=seed, num_shards=2, shard_id=shard, batch_size=4, reprob=0.25)
        ld.set_epoch(e)
        out = [b for b in ld]
        ld.close()
        return torch.cat([b.images for b in out]), torch.cat([b.labels for b in out])

    a_img, a_lab = epoch(0, 1)
    b_img, b_lab = epoch(0, 1)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, epoch(1, 1)[0])  # other seed
    assert not torch.equal(a_img, epoch(0, 2)[0])  # other epoch
    assert not torch.equal(a_img, epoch(0, 1, shard=1)[0])  # other shard

    # resume: a loader that ran epoch 0 and one that jumps straight to epoch 1 agree on epoch 1
    ld = _loader(solid_root, seed=0, num_shards=2, shard_id=0, batch_size=4, reprob=0.25)
    first = [b.labels for b in ld]
    ld.set_epoch(1)
    again = torch.cat([b.images for b in ld])
    assert torch.equal(again, a_img)
    ld.set_epoch(0)
    assert torch.equal(torch.cat([b.labels for b in ld]), torch.cat(first))
    ld.close()


def test_batches_do_not_depend_on_threads_or_cache(mixed_root):
    def run(**kw):
        ld = _loader(mixed_root, batch_size=7, img_size=24, **kw)
        out = [torch.cat([b.images for b in ld]) for _ in range(2)]  # epoch 0 twice (the cache fills in the 1st)
        ld.close()
        return out

    base = run(num_workers=2)
    assert torch.equal(base[0], base[1])
    # cache="host": decoded once, then fed from memory (tests/test_cache.py covers the cache itself)
    for other in (run(num_workers=1), run(num_workers=2, cache="host")):
        assert torch.equal(base[0], other[0]) and torch.equal(base[0], other[1])


def test_set_epoch_reshuffles_and_an_abandoned_epoch_does_not_leak(solid_root):
    ld = _loader(solid_root, randaugment=None, batch_size=4)
    e0 = torch.cat([b.labels for b in ld])
    it = iter(ld)
    next(it)  # abandon epoch 0 after one batch
    del it
    ld.set_epoch(1)
    e1 = torch.cat([b.labels for b in ld])
    assert len(e0) == len(e1) == 36
    # zip stops after the last batch without exhausting the loader's generator: the next epoch must still be whole
    assert len([b for _, b in zip(range(len(ld)), ld)]) == len(ld)
    assert len(list(ld)) == len(ld)
    positions = [ld._epoch_positions()]
    ld.set_epoch(0)
    assert not np.array_equal(positions[0], ld._epoch_positions())
    assert torch.equal(torch.cat([b.labels for b in ld]), e0)  # back to epoch 0: same order again
    ld.close()


@pytest.mark.parametrize("num_shards", [1, 2])
def test_eval_covers_every_sample_once(solid_root, num_shards):
    index = scan_folder(solid_root)
    seen = []
    for shard in range(num_shards):
        ld = _loader(index, train=False, batch_size=5, num_shards=num_shards, shard_id=shard)
        batches = list(ld)
        assert len(batches) == len(ld) == -(-ld.num_samples // 5)
        assert batches[-1].images.shape[0] == ld.num_samples - 5 * (len(ld) - 1)  # partial batch kept
        for images, labels in batches:
            mean_rgb = _pixels(images).mean(dim=(2, 3))
            expected = torch.tensor([COLOURS[ld.classes[int(t)]] for t in labels], dtype=torch.float32)
            assert (mean_rgb - expected).abs().max() < 4.0
            seen += labels.tolist()
        ld.close()
    assert sorted(seen) == sorted(index.targets)


@pytest.mark.parametrize("crop_pct,img_size", [(0.875, 32), (1.0, 40)])
def test_eval_pixels_match_torchvision(mixed_root, crop_pct, img_size):
    from convnext_fast.data import LoaderConfig
    from convnext_fast.data.baseline import build_transform, load_rgb

    index = scan_folder(mixed_root)
    ld = _loader(index, train=False, img_size=img_size, crop_pct=crop_pct, batch_size=len(index))
    (images, labels), = list(ld)
    cfg = LoaderConfig(train=False, img_size=img_size, batch_size=1, device=torch.device("cpu"), crop_pct=crop_pct)
    tf = build_transform(cfg)
    ref = torch.stack([tf(load_rgb(p)) for p, _ in index.samples])
    diff = (images - ref).abs().mean(dim=(1, 2, 3))
    # Measured ~0.003 (0.2/255 per pixel): rounding in the decoder and the resampling kernels.
    assert float(diff.max()) < 0.01, {p: round(float(d), 4) for (p, _), d in zip(index.samples, diff)}
    assert labels.tolist() == index.targets
    ld.close()


@pytest.mark.parametrize("op", P.RA_OPS)
def test_each_randaugment_op_matches_torchvision(mixed_root, op, monkeypatch):
    """Force one op on every sample (crop = whole image, no flip) and compare with torchvision's RandAugment op."""
    from torchvision.transforms import InterpolationMode, functional as F
    from torchvision.transforms.autoaugment import _apply_op

    original = P.plan_train_batch
    opi, mag_bin, S = P.RA_OPS.index(op), 9, 80  # upscaling, as from 128-px sources to 176/192

    def forced(rng, sizes, **kw):
        n = len(sizes)
        return original(rng, sizes, **kw, ops=np.full((n, 1), opi), negative=np.arange(n)[:, None] % 2 == 1)

    monkeypatch.setattr(D, "plan_train_batch", forced)
    index = scan_folder(mixed_root)
    sq = [i for i, (p, _) in enumerate(index.samples) if Image.open(p).size[0] == Image.open(p).size[1]]
    square = index.subset(sq)
    ld = _loader(square, img_size=S, batch_size=len(square), scale=(1, 1), ratio=(1, 1), hflip=0.0,
                 randaugment=(1, mag_bin))
    images, labels = next(iter(ld))
    ld.close()
    for k, (path, _) in enumerate(square.samples):
        im = Image.open(path).convert("RGB")
        im = F.resize(im, [S, S], interpolation=InterpolationMode.BILINEAR, antialias=True)
        mag = P.magnitude(op, mag_bin, S) * (-1 if (k % 2 and op in P._SIGNED) else 1)
        im = _apply_op(im, op, mag, interpolation=InterpolationMode.BILINEAR, fill=None)
        ref = (F.to_tensor(im) - MEAN[0]) / STD[0]
        diff = float((images[k] - ref).abs().mean())
        # Equalize: DALI's histogram equalization is OpenCV's formula, PIL's rounds its LUT differently.
        assert diff < (0.1 if op == "Equalize" else 0.05), (op, path, diff)
        if op in P._SIGNED and op != "Sharpness":  # the check can fail: the opposite sign is far off
            im = _apply_op(Image.open(path).convert("RGB").resize((S, S), Image.BILINEAR), op, -mag,
                           interpolation=InterpolationMode.BILINEAR, fill=None)
            wrong = float((images[k] - (F.to_tensor(im) - MEAN[0]) / STD[0]).abs().mean())
            assert wrong > 2 * diff


def test_formats_decode_as_rgb(mixed_root):
    ld = _loader(mixed_root, randaugment=(2, 9), batch_size=14)
    images, _ = next(iter(ld))
    assert images.shape == (14, 3, 32, 32)
    ld.close()


def _corrupt_png(path: Path) -> None:
    """A PNG whose header (and so its size) reads fine but whose pixel data does not decode."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(path)
    buf = bytearray(path.read_bytes())
    i = buf.index(b"IDAT") + 4
    buf[i + 2:i + 200] = bytes(198)
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("train", [True, False])
def test_corrupt_file_mid_epoch_names_the_file(tmp_path, train):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (30, 30), (10 * i, 50, 90)).save(tmp_path / c / f"{i}.jpg")
    bad = tmp_path / "b" / "3.png"
    _corrupt_png(bad)
    index = scan_folder(tmp_path)  # the cheap preflight can't see it: only a decode does
    ld = _loader(index, train=train, batch_size=4, randaugment=None)
    with pytest.raises(DatasetError, match=str(bad)):
        for _ in ld:
            pass
    with pytest.raises(DatasetError, match=str(bad)):  # the loader is still usable and still honest
        for _ in ld:
            pass
    ld.close()


def test_unreadable_header_names_the_file(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.new("RGB", (30, 30), (10 * i, 50, 90)).save(tmp_path / c / f"{i}.jpg")
    index = scan_folder(tmp_path)
    bad = index.samples[5][0]
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ld = _loader(ImageIndex(index.root, index.classes, index.class_to_idx, index.samples), batch_size=4)
    with pytest.raises(DatasetError, match=bad):
        list(ld)


@pytest.mark.parametrize("W,H", [(128, 96), (128, 128), (40, 200)])
def test_crops_follow_torchvision_random_resized_crop(W, H):
    """Same distribution as RandomResizedCrop.get_params (area, aspect, position), crops inside the image."""
    from torchvision.transforms import RandomResizedCrop

    n, scale, ratio = 3000, (0.08, 1.0), (3 / 4, 4 / 3)
    crop = P.random_resized_crop(np.random.default_rng(0), np.array([[W, H]] * n), scale, ratio).astype(float)
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(1, H, W), list(scale), list(ratio))
                    for _ in range(n)], dtype=float)
    for c in (crop, ref):
        top, left, h, w = c.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    stats = [np.array([(h * w).mean() / (W * H), (w / h).mean(), (top + h / 2).mean() / H, (left + w / 2).mean() / W])
             for top, left, h, w in (crop.T, ref.T)]
    assert np.allclose(stats[0], stats[1], atol=0.03), stats


@pytest.mark.gpu
def test_gpu_pipeline_matches_contract(solid_root):
    ld = _loader(solid_root, device="cuda", randaugment=(2, 9), dtype=torch.bfloat16, reprob=0.25)
    images, labels = next(iter(ld))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    ld.close()
