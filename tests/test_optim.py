import math

import pytest
import timm
import torch
from torch import nn

from convnext_fast.optim import WarmupCosine, build_optimizer, param_groups


@pytest.fixture(scope="module")
def atto():
    return timm.create_model("convnext_atto", pretrained=False, num_classes=4)


def test_param_groups_convnext_atto(atto):
    groups = {g["name"]: g for g in param_groups(atto, 0.05)}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in atto.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    # every parameter exactly once
    n_params = len(groups["decay"]["params"]) + len(groups["no_decay"]["params"])
    assert len(decay) + len(no_decay) == len(names) == n_params
    assert decay.isdisjoint(no_decay)
    for n, p in atto.named_parameters():
        if n.endswith(".bias") or "norm" in n or n.endswith(".gamma"):
            assert n in no_decay, n
        if p.ndim >= 2:  # conv and linear weights
            assert n in decay, n
    assert any(n.endswith(".gamma") for n in no_decay)  # layer scale present and excluded
    assert "head.fc.weight" in decay and "stem.0.weight" in decay


def test_no_weight_decay_names_and_frozen_params():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.pos = nn.Parameter(torch.zeros(1, 4, 3))
            self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

        def no_weight_decay(self):
            return {"pos"}

    m = M()
    groups = {g["name"]: g["params"] for g in param_groups(m, 0.1)}
    assert [p is m.lin.weight for p in groups["decay"]] == [True]
    assert {id(p) for p in groups["no_decay"]} == {id(m.lin.bias), id(m.pos)}
    # the split does not depend on the decay value (checkpoint optimizer state stays compatible)
    groups0 = {g["name"]: g for g in param_groups(m, 0.0)}
    assert len(groups0["decay"]["params"]) == 1 and groups0["decay"]["weight_decay"] == 0.0


def test_build_optimizer_cpu_is_foreach(atto):
    opt = build_optimizer(atto, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    opt = build_optimizer(atto, lr=1e-3, weight_decay=0.05, fused=False, betas=(0.9, 0.95), eps=1e-6)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(atto, lr=0.0, weight_decay=0.05)


@pytest.mark.gpu
def test_build_optimizer_cuda_is_fused():
    m = nn.Linear(4, 4).cuda()
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.05)
    assert all(g["fused"] for g in opt.param_groups)


def test_warmup_cosine_key_steps():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=123.0)
    sched = WarmupCosine(opt, base_lr=1.0, min_lr=0.01, warmup_steps=9, total_steps=109)
    assert sched.lr_at(0) == pytest.approx(0.1)       # first step: base/(warmup+1), not zero
    assert sched.lr_at(4) == pytest.approx(0.5)       # mid-warmup, linear
    assert sched.lr_at(8) == pytest.approx(0.9)
    assert sched.lr_at(9) == pytest.approx(1.0)       # end of warmup
    assert sched.lr_at(59) == pytest.approx(0.505)    # middle of cosine: (base+min)/2
    assert sched.lr_at(109) == pytest.approx(0.01)    # end
    assert sched.lr_at(10_000) == pytest.approx(0.01)  # clamped after total
    lrs = [sched.lr_at(s) for s in range(120)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10])) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert sched.step(59) == pytest.approx(0.505) and opt.param_groups[0]["lr"] == pytest.approx(0.505)
    expected = 0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.25))
    assert sched.lr_at(9 + 25) == pytest.approx(expected)


def test_warmup_cosine_edges_and_validation():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
    no_warm = WarmupCosine(opt, base_lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10)
    assert no_warm.lr_at(0) == 2.0 and no_warm.lr_at(10) == 0.0
    all_warm = WarmupCosine(opt, base_lr=2.0, min_lr=0.5, warmup_steps=10, total_steps=10)
    assert all_warm.lr_at(9) == pytest.approx(2.0 * 10 / 11) and all_warm.lr_at(10) == 0.5
    opt.param_groups[0]["lr_scale"] = 0.5
    no_warm.step(0)
    assert opt.param_groups[0]["lr"] == 1.0
    for kwargs, match in (({"warmup_steps": 11}, "warmup_steps"), ({"min_lr": 3.0}, "min_lr"),
                          ({"total_steps": 0}, "total"), ({"base_lr": 0.0}, "lr")):
        args = dict(base_lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10) | kwargs
        with pytest.raises(ValueError, match=match):
            WarmupCosine(opt, **args)
