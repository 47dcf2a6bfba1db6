import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from convnext_fast.losses import CrossEntropy, FocalLoss, build_loss


def _batch(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    soft = torch.rand(b, c, generator=g)
    return logits, labels, soft / soft.sum(1, keepdim=True)


def test_gamma0_equals_cross_entropy_soft_and_hard():
    logits, labels, soft = _batch()
    focal = FocalLoss(0.0)
    assert torch.equal(focal(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    torch.testing.assert_close(focal(logits, labels), F.cross_entropy(logits, labels), rtol=0, atol=1e-6)
    ce = build_loss(0.0)
    assert isinstance(ce, CrossEntropy)
    assert torch.equal(ce(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    assert torch.equal(ce(logits, labels), F.cross_entropy(logits, labels))


def test_focal_matches_hand_formula_gamma2():
    logits, labels, soft = _batch(b=4, c=3, seed=1)
    loss = FocalLoss(2.0)(logits, soft)
    expected = 0.0
    for b in range(4):
        z = logits[b].double()
        p = torch.exp(z) / torch.exp(z).sum()
        expected += sum(-soft[b, c].double() * (1 - p[c]) ** 2 * torch.log(p[c]) for c in range(3))
    torch.testing.assert_close(loss.double(), expected / 4, rtol=1e-5, atol=1e-6)
    assert isinstance(build_loss(2.0), FocalLoss) and build_loss(2.0).gamma == 2.0
    # focal down-weights: strictly below cross-entropy for the same batch
    assert loss < build_loss(0.0)(logits, soft)


def test_hard_equals_one_hot_soft():
    logits, labels, _ = _batch(seed=2)
    for gamma in (0.0, 0.5, 2.0):
        loss = FocalLoss(gamma)
        torch.testing.assert_close(loss(logits, labels), loss(logits, F.one_hot(labels, 5).float()))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_gradient_finite_even_for_confident_logits(gamma):
    logits, labels, soft = _batch(seed=3)
    logits = logits.clone()
    logits[:, 0] = 100.0  # p_0 == 1 in float32: (1-p)^gamma at 0
    logits.requires_grad_(True)
    FocalLoss(gamma)(logits, F.one_hot(torch.zeros(6, dtype=torch.long), 5).float() * 0.9 + 0.02).backward()
    assert torch.isfinite(logits.grad).all()
    logits.grad = None
    FocalLoss(gamma)(logits, labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_float32_under_autocast():
    logits, labels, soft = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FocalLoss(2.0)(logits.bfloat16(), soft)
        ce = build_loss(0.0)(logits.bfloat16(), labels)
    assert out.dtype == torch.float32 and ce.dtype == torch.float32
    torch.testing.assert_close(ce, F.cross_entropy(logits.bfloat16().float(), labels))


def test_bad_inputs_raise():
    logits, labels, soft = _batch()
    with pytest.raises(ValueError, match="focal_gamma"):
        build_loss(-1.0)
    with pytest.raises(ValueError, match="soft targets"):
        FocalLoss(2.0)(logits, soft[:, :3])
    with pytest.raises(ValueError, match="hard targets"):
        build_loss()(logits, labels.float())


@pytest.mark.gpu
def test_cuda_autocast_float32_and_matches_cpu():
    logits, labels, soft = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = FocalLoss(2.0)(logits.cuda().bfloat16(), soft.cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), FocalLoss(2.0)(logits.bfloat16().float(), soft))
