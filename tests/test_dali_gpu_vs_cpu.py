"""On a GPU: DALI's GPU graph gives the same batches as its CPU graph (the graph the CPU tests check against
torchvision), op by op. Each RandAugment op is forced on every sample (whole-image crop, no flip), the same seed
draws the same plan on both devices; the batches may differ only by decoder rounding (nvJPEG vs libjpeg-turbo)
and the GPU kernels' float rounding. Images are made in tmp_path: baseline JPEGs (GPU-decoded) and PNGs (decoded
on the CPU by both graphs, so they isolate the ops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
pytest.importorskip("nvidia.dali")

from convnext_fast.data import build_loader, scan_folder  # noqa: E402
from convnext_fast.data import dali as D  # noqa: E402
from convnext_fast.data import dali_params as P  # noqa: E402

SIZE = 80  # upscaling from 64-px sources, as from 128-px sources to 176/192
STD_LEVEL = 1 / 255 / 0.225  # one 8-bit level in normalized units


@pytest.fixture(scope="module")
def square_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_vs_cpu")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            ph = rng.uniform(0, 6, 3)
            img = np.stack([128 + 90 * np.sin(xx / 5.0 + ph[0]), 128 + 90 * np.cos(yy / 7.0 + ph[1]),
                            128 + 70 * np.sin((xx + yy) / 9.0 + ph[2])], -1)
            im = Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
            im.save(root / c / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=95)
    return root


def _batch(root, device, **kw):
    ld = build_loader(scan_folder(root), train=True, img_size=SIZE, batch_size=8, backend="dali", device=device,
                      num_workers=2, seed=0, scale=(1, 1), ratio=(1, 1), hflip=0.0, dtype=torch.float32, **kw)
    try:
        images, labels = next(iter(ld))
    finally:
        ld.close()
    return images.float().cpu(), labels.cpu()


def _compare(root, **kw):
    cpu, cpu_labels = _batch(root, "cpu", **kw)
    gpu, gpu_labels = _batch(root, "cuda", **kw)
    assert torch.equal(cpu_labels, gpu_labels)
    return (gpu - cpu).abs().mean(dim=(1, 2, 3))  # per image


def test_gpu_graph_matches_cpu_graph_without_augmentation(square_root):
    diff = _compare(square_root, randaugment=None)
    assert float(diff.max()) < 2 * STD_LEVEL, diff.tolist()


@pytest.mark.parametrize("op", P.RA_OPS)
def test_gpu_graph_matches_cpu_graph_per_randaugment_op(square_root, op, monkeypatch):
    original = P.plan_train_batch
    opi = P.RA_OPS.index(op)

    def forced(rng, sizes, **kw):
        n = len(sizes)
        return original(rng, sizes, **kw, ops=np.full((n, 1), opi), negative=np.arange(n)[:, None] % 2 == 1)

    monkeypatch.setattr(D, "plan_train_batch", forced)
    diff = _compare(square_root, randaugment=(1, 9))
    # Threshold ops (Posterize, Solarize, Equalize's histogram) can move a pixel that sits on a step by a whole
    # step when the decoders round differently: a wider bound for them.
    bound = (6 if op in ("Posterize", "Solarize", "Equalize", "AutoContrast") else 3) * STD_LEVEL
    assert float(diff.max()) < bound, (op, diff.tolist())
