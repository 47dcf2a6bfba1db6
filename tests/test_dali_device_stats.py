"""The GPU graph's contrast centre and autocontrast bounds (device tensors in arithmetic, no GPU-to-host copy)
run here on the CPU too (dali_augment.DEVICE_STATS = True): identical batches to the fused ops the CPU graph uses,
and each op still matches torchvision."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from convnext_fast.data import build_loader  # noqa: E402
from convnext_fast.data import dali_augment  # noqa: E402
from test_dali import mixed_root  # noqa: E402,F401  (the fixture)
from test_dali import test_each_randaugment_op_matches_torchvision as per_op_check  # noqa: E402


def _epoch(root, device_stats: bool | None, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(dali_augment, "DEVICE_STATS", device_stats)
    ld = build_loader(root, train=True, img_size=40, batch_size=7, backend="dali", device="cpu", num_workers=2,
                      randaugment=(2, 15), seed=5)
    out = torch.cat([b.images for b in ld])
    ld.close()
    return out


def test_device_statistics_give_the_fused_ops_batches(mixed_root, monkeypatch):  # noqa: F811
    assert torch.equal(_epoch(mixed_root, True, monkeypatch), _epoch(mixed_root, None, monkeypatch))


@pytest.mark.parametrize("op", ["Brightness", "Contrast", "AutoContrast"])
def test_device_statistics_ops_match_torchvision(mixed_root, op, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dali_augment, "DEVICE_STATS", True)
    per_op_check(mixed_root, op, monkeypatch)
