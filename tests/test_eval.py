"""evaluate(): one loader pass scores several models; counts (not averages) give top-1/top-5/loss."""
import math

import torch
import torch.nn.functional as F

from convnext_fast.evaluate import evaluate, predict


def test_one_pass_scores_every_model_and_weights_the_loss_by_samples():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (5, 2)]
    passes = []

    class Loader:
        def __iter__(self):
            passes.append(1)
            return iter(batches)

    perfect = lambda images: F.one_hot(labels_of[images.shape[0]], 4).float() * 10  # noqa: E731
    labels_of = {b[1].shape[0]: b[1] for b in batches}
    constant = lambda images: torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(images.shape[0], 4)  # noqa: E731
    out = evaluate({"perfect": perfect, "constant": constant}, Loader(), num_classes=4, device="cpu")
    assert len(passes) == 1
    assert out["perfect"]["top1"] == 100.0 and out["perfect"]["count"] == 7
    labels = torch.cat([b[1] for b in batches])
    assert math.isclose(out["constant"]["top1"], 100.0 * (labels == 0).sum().item() / 7)
    assert math.isclose(out["constant"]["top5"], 100.0)  # 4 classes: top-min(5, C) always hits
    ce = F.cross_entropy(torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(7, 4), labels).item()
    assert math.isclose(out["constant"]["loss"], ce, rel_tol=1e-6)  # per-sample mean over uneven batches
    assert sum(map(sum, out["constant"]["confusion"])) == 7


def test_predict_restores_mode_and_layout_choice():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Dropout(0.9), torch.nn.Flatten(1),
                                torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 4, 4)
    model(x)
    model.train()
    a = predict(model, x)
    b = predict(model, x, channels_last=False)
    assert model.training and torch.allclose(a, b, atol=1e-6)  # eval mode: dropout off, deterministic
    flipped = predict(model, x.flip(3))
    assert torch.allclose(predict(model, x, tta=True), (a + flipped) / 2, atol=1e-6)
