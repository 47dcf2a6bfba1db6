"""On a GPU: the training thread never waits on the device. `torch.cuda.set_sync_debug_mode("error")` turns any
torch call that synchronizes with the GPU into an error; it is process-wide, so the DALI loader's feeder thread is
checked too, and an error there reaches the consumer at its batch. Every seed-recipe feature is on: RandAugment,
random erasing, Mixup/CutMix, EMA, bf16, the fast (compiled) step, and each decoded-cache placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_sync")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("cache", ["off", "device", "host"])
def test_loader_next_and_train_step_never_sync(root, cache):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI, which is not installed here")
    from convnext_fast.benchmark.timing import endless
    from convnext_fast.config import RecipeConfig
    from convnext_fast.data import build_loader
    from convnext_fast.engine import FAST_SPEED, build_engine

    ld = build_loader(root, train=True, img_size=64, batch_size=8, backend="dali", device="cuda",
                      randaugment=(2, 9), reprob=1.0, dtype=torch.bfloat16, cache=cache)
    recipe = RecipeConfig(mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=True)
    engine = build_engine("convnext_atto", 3, device="cuda", speed=FAST_SPEED, recipe=recipe, lr=1e-3)
    batches = endless(ld)
    for _ in range(3):  # compile, build the pipeline (and the cache) first
        images, labels = next(batches)
        engine.train_step(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * len(ld)):  # across an epoch end: a new feeder thread, a drained pipeline
            images, labels = next(batches)
            loss = engine.train_step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        ld.close()
    assert images.is_cuda and images.dtype == torch.bfloat16 and torch.isfinite(loss)

