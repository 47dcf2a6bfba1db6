import math

import pytest
import torch

from convnext_fast.metrics import ClassificationMeter


def _logits(preds_ranked, c):
    """Logits whose ranking per row is the given class list (first = argmax)."""
    out = torch.zeros(len(preds_ranked), c)
    for i, ranked in enumerate(preds_ranked):
        for r, cls in enumerate(ranked):
            out[i, cls] = 10.0 - r
    return out


def test_hand_computed_example():
    c = 7
    m = ClassificationMeter(c, "cpu")
    # batch 1: labels 0,0,1,2 ; top-1 preds 0,1,1,0
    m.update(_logits([[0], [1, 0], [1], [0, 3, 4, 5, 6, 2]], c), torch.tensor([0, 0, 1, 2]), torch.tensor(2.0))
    # batch 2: labels 2,1 ; preds 2,0 ; label 1 ranked 6th (outside top-5)
    m.update(_logits([[2], [0, 2, 3, 4, 5, 1]], c), torch.tensor([2, 1]), 0.5)
    out = m.compute()
    assert out["count"] == 6
    assert out["top1"] == pytest.approx(100 * 3 / 6)
    # top-5 hits: row0 yes, row1 (0 ranked 2nd) yes, row2 yes, row3 (2 ranked 6th) no, row4 yes, row5 no
    assert out["top5"] == pytest.approx(100 * 4 / 6)
    assert out["loss"] == pytest.approx((2.0 * 4 + 0.5 * 2) / 6)
    expected = [[0] * c for _ in range(c)]
    for t, p in [(0, 0), (0, 1), (1, 1), (2, 0), (2, 2), (1, 0)]:
        expected[t][p] += 1
    assert out["confusion"] == expected
    acc = out["per_class_acc"]
    assert acc[:3] == pytest.approx([50.0, 50.0, 50.0])
    assert all(math.isnan(a) for a in acc[3:])  # classes without samples
    assert all(isinstance(v, float) for v in (out["top1"], out["top5"], out["loss"]))


def test_topk_clamped_for_few_classes_and_reset():
    m = ClassificationMeter(3)
    m.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    out = m.compute()
    assert out["top5"] == 100.0 and math.isnan(out["loss"])
    m.reset()
    empty = m.compute()
    assert empty["count"] == 0 and math.isnan(empty["top1"]) and empty["confusion"] == [[0] * 3] * 3


def test_update_never_syncs(monkeypatch):
    m = ClassificationMeter(4)

    def forbidden(*a, **k):
        raise AssertionError("host sync in update()")

    with monkeypatch.context() as mp:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, forbidden)
        mp.setattr(torch, "bincount", forbidden)  # sizes its output from max() on CUDA
        m.update(torch.randn(8, 4), torch.randint(0, 4, (8,)), torch.tensor(1.0))
        m.update(torch.randn(8, 4), torch.randint(0, 4, (8,)), 1.0)
    assert m.compute()["count"] == 16


def test_all_reduce_single_process_is_identity():
    m = ClassificationMeter(4)
    m.update(torch.randn(8, 4), torch.arange(8) % 4, 1.5)  # every class present: no NaN (NaN != NaN)
    before = m.compute()
    m.all_reduce()
    assert m.compute() == before


def test_bad_shapes():
    m = ClassificationMeter(4)
    with pytest.raises(ValueError, match="logits"):
        m.update(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))


@pytest.mark.gpu
def test_cuda_update_never_syncs():
    m = ClassificationMeter(10, "cuda")
    logits, labels = torch.randn(64, 10, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises on any device->host wait
    try:
        m.update(logits, labels, torch.tensor(1.0, device="cuda"))
        m.update(logits, labels, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = m.compute()
    assert out["count"] == 128 and out["loss"] == pytest.approx(1.5)
    assert out["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
