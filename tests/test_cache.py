"""The decoded-image cache of the DALI loader (cache="host" | "device" | "auto"): cached batches equal uncached
ones, resume, memory accounting and the `auto` decision, size bounds and their errors. CPU only: a CPU loader's
"device" is host memory, so `device` runs the same code as on a GPU except for where the tensor lives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from convnext_fast.data import DatasetError, build_loader, scan_folder  # noqa: E402
from convnext_fast.data import cache as C  # noqa: E402

SIZES = [(48, 40), (40, 56), (64, 64), (37, 45), (56, 48)]


def _textured(rng, w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 90 * np.sin(xx / 5.0 + rng.uniform(0, 6)), 128 + 90 * np.cos(yy / 7.0),
                    128 + 70 * np.sin((xx + yy) / 9.0)], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _make(root: Path, sizes, per_class=10, classes=("cat", "dog", "eel")) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            path = root / c / f"{i:02d}.{'png' if i % 4 == 3 else 'jpg'}"
            Image.fromarray(_textured(rng, w, h)).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Assorted sizes (padded cache), JPEG and PNG."""
    return _make(tmp_path_factory.mktemp("mixed"), SIZES)


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    """One size (uniform cache: no per-image crop in the graph)."""
    return _make(tmp_path_factory.mktemp("square"), [(40, 40)])


def _loader(root, **kw):
    args = dict(train=True, img_size=32, batch_size=6, backend="dali", device="cpu", num_workers=2,
                randaugment=(2, 9), reprob=0.25)
    args.update(kw)
    return build_loader(root, **args)


def _epochs(ld, epochs):
    out = []
    for e in epochs:
        ld.set_epoch(e)
        batches = list(ld)
        out.append((torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])))
    return out


@pytest.mark.parametrize("root_name", ["mixed", "square"])
@pytest.mark.parametrize("cache", ["host", "device"])
def test_cached_batches_equal_uncached(request, root_name, cache):
    """Train (RandAugment + erasing, 2 shards) and eval: bit-identical to the uncached loader, same labels."""
    root = request.getfixturevalue(root_name)
    index = scan_folder(root)
    for kw in (dict(train=True, num_shards=2, shard_id=1), dict(train=False, num_shards=2, shard_id=0)):
        plain = _loader(index, **kw)
        cached = _loader(index, cache=cache, **kw)
        want, got = _epochs(plain, [0, 1]), _epochs(cached, [0, 1])
        for (wi, wl), (gi, gl) in zip(want, got):
            assert torch.equal(wl, gl)
            assert torch.equal(wi, gi)  # same decoder, same graph after it: not just close
        info = cached.cache_info
        assert info["storage"] == cache and info["decode_s"] is not None
        assert info["images"] == (len(index) if kw["train"] else plain.num_samples)  # eval: only its shard
        assert cached._cache.uniform == (root_name == "square")
        plain.close()
        cached.close()


def test_cache_is_fed_from_memory_deterministic_and_resumable(square, tmp_path):
    """After the decode pass no file is read; epochs are functions of (seed, epoch); set_epoch resumes."""
    import shutil

    root = shutil.copytree(square, tmp_path / "data")
    index = scan_folder(root)
    ld = _loader(index, cache="host", seed=3)
    run = _epochs(ld, [0, 1, 2])
    shutil.rmtree(root)  # nothing left to read: later epochs must come from the cache
    again = _epochs(ld, [2, 0])
    assert torch.equal(again[0][0], run[2][0]) and torch.equal(again[1][0], run[0][0])
    assert not torch.equal(run[0][0], run[1][0])  # epochs differ
    ld.close()

    shutil.copytree(square, root)
    resumed = _loader(index, cache="host", seed=3)
    resumed.set_epoch(2)  # a resumed run jumps straight to its epoch
    (img, lab), = _epochs(resumed, [2])
    assert torch.equal(img, run[2][0]) and torch.equal(lab, run[2][1])
    other_seed = _loader(index, cache="host", seed=4)
    assert not torch.equal(_epochs(other_seed, [2])[0][0], run[2][0])
    resumed.close()
    other_seed.close()


def test_memory_accounting(mixed):
    index = scan_folder(mixed)
    paths = [p for p, _ in index.samples]
    stored = C.read_sizes(paths)
    plan = C.plan_cache(paths, np.arange(len(paths)), None)
    assert plan.shape == (len(paths), stored[:, 1].max(), stored[:, 0].max(), 3)
    assert plan.nbytes == len(paths) * 64 * 64 * 3
    used = sum(int(w) * int(h) * 3 for w, h in stored)
    assert plan.padding == pytest.approx(1 - used / plan.nbytes)
    bounded = C.plan_cache(paths, np.arange(len(paths)), 32)
    assert (bounded.dims.max(1) == 32).all()  # every image here is larger than 32: longer side becomes 32
    aspect = stored[:, 0] / stored[:, 1]
    assert np.abs(bounded.dims[:, 1] / bounded.dims[:, 0] - aspect).max() < 0.05
    ld = _loader(index, cache="host", cache_size=32, train=False)
    list(ld)
    assert ld._cache.pixels.numel() == ld.cache_info["bytes"] == bounded.nbytes
    assert ld._cache.pixels.shape == (len(paths), 32, 32, 3)
    ld.close()
    assert ld._cache is None  # close() frees the memory


def test_auto_decision_and_log_line(mixed, monkeypatch, capsys):
    gib = C.GiB
    monkeypatch.setattr(C, "available_host_memory", lambda: 10 * gib)
    monkeypatch.setattr(C, "free_device_memory", lambda device: 8 * gib)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda = torch.device("cuda", 0)
    assert C.choose_storage("auto", 3 * gib, cuda)[0] == "device"  # <= 50% of 8 GiB free
    assert C.choose_storage("auto", 5 * gib, cuda)[0] == "host"  # too big for the device, <= 50% of 10 GiB
    assert C.choose_storage("auto", 6 * gib, cuda)[0] == "off"
    assert C.choose_storage("auto", 3 * gib, torch.device("cpu"))[0] == "host"  # a CPU's device is the host
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on this node share the host memory
    assert C.choose_storage("auto", 2 * gib, torch.device("cpu"))[0] == "off"
    assert C.choose_storage("auto", 1 * gib, torch.device("cpu"))[0] == "host"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert C.choose_storage("device", 7 * gib, cuda)[0] == "device"  # explicit: up to 90%
    with pytest.raises(ValueError, match=r"--cache device.*7\.50 GiB.*cuda:0"):
        C.choose_storage("device", int(7.5 * gib), cuda)
    with pytest.raises(ValueError, match="--cache host"):
        C.choose_storage("host", 9.5 * gib, cuda)

    # end to end on a loader: too little memory -> off (uncached batches), one log line saying so
    index = scan_folder(mixed)
    monkeypatch.setattr(C, "available_host_memory", lambda: 1000)
    ld = _loader(index, cache="auto", train=False)
    base = _loader(index, train=False)
    assert torch.equal(torch.cat([b.images for b in ld]), torch.cat([b.images for b in base]))
    assert ld.cache_info["storage"] == "off" and ld._cache is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cache auto -> off" in out[0]
    monkeypatch.setattr(C, "available_host_memory", lambda: 10 * gib)
    ld2 = _loader(index, cache="auto", train=False)
    list(ld2)
    line = capsys.readouterr().out
    assert "cache auto -> host" in line and f"{len(index)} images (eval" in line and "64x64" in line
    for x in (ld, base, ld2):
        x.close()


def test_mixed_sizes_without_bound_name_the_outlier(tmp_path):
    root = _make(tmp_path / "data", [(32, 32)], per_class=6)
    outlier = root / "dog" / "huge.jpg"
    Image.fromarray(_textured(np.random.default_rng(1), 160, 120)).save(outlier)
    index = scan_folder(root)
    with pytest.raises(DatasetError, match=rf"(?s)--cache-size.*{outlier}.*160x120"):
        list(_loader(index, cache="host", train=False))
    auto = _loader(index, cache="auto", train=False)  # auto does not fail: it does without the cache
    assert len(list(auto)) == len(auto) and auto.cache_info["storage"] == "off"
    bounded = _loader(index, cache="host", cache_size=32, train=False)
    images = torch.cat([b.images for b in bounded])
    assert images.shape == (len(index), 3, 32, 32) and bounded._cache.pixels.shape[1:] == (32, 32, 3)
    row = bounded._cache.rows(np.array([index.samples.index((str(outlier), 1))]))[0]
    assert tuple(bounded._cache.dims[row]) == (24, 32)  # 160x120 fit into 32x32, aspect kept
    # the downscaled pixels are the image's: close to PIL's antialiased resize of the same file
    ref = np.asarray(Image.open(outlier).convert("RGB").resize((32, 24), Image.BILINEAR), np.float32)
    got = bounded._cache.pixels[row, :24, :32].numpy().astype(np.float32)
    assert np.abs(got - ref).mean() < 3.0
    for x in (auto, bounded):
        x.close()


def test_corrupt_file_in_decode_pass_names_it(tmp_path):
    root = _make(tmp_path / "data", [(30, 30)], per_class=6, classes=("a", "b"))
    bad = root / "b" / "zz.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8) + 90).save(bad)
    buf = bytearray(bad.read_bytes())
    i = buf.index(b"IDAT") + 4
    buf[i + 2:i + 60] = bytes(58)  # header fine, pixel data broken: only a decode finds it
    bad.write_bytes(bytes(buf))
    ld = _loader(scan_folder(root), cache="host")
    with pytest.raises(DatasetError, match=str(bad)):
        list(ld)


def test_cache_size_is_validated(square, capsys):
    from convnext_fast.cli import main

    with pytest.raises(ValueError, match="--cache-size"):
        _loader(square, cache="host", cache_size=4)
    for flags, named in ((["--cache", "bogus"], "data.cache"), (["--cache-size", "4"], "data.cache_size")):
        assert main(["train", str(square), "--val-split", "0.2", *flags]) == 2
        assert named in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["device", "host"])
def test_gpu_cache_matches_uncached(mixed, cache):
    """On CUDA: mixed decoder for the decode pass, cache on the device or the host, fed to the gpu graph."""
    index = scan_folder(mixed)
    for train in (True, False):
        plain = _loader(index, device="cuda", train=train)
        cached = _loader(index, device="cuda", train=train, cache=cache)
        (wi, wl), = _epochs(plain, [1])
        (gi, gl), = _epochs(cached, [1])
        assert torch.equal(wl, gl) and gi.is_cuda
        assert cached._cache.pixels.is_cuda == (cache == "device")
        # nvJPEG's hardware and CUDA decoders may round differently from one run to the next
        assert float((wi - gi).abs().mean()) < 0.01
        plain.close()
        cached.close()
