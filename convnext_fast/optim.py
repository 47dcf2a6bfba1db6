"""Optimizer and learning-rate schedule: AdamW with decay-free norms/biases, linear warmup + cosine per iteration."""
from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

__all__ = ["param_groups", "build_optimizer", "WarmupCosine"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: ``"decay"`` (conv/linear weights) and ``"no_decay"`` (weight_decay 0).

    No decay for every parameter with ``ndim <= 1`` (norm weights/biases, biases, ConvNeXt layer-scale
    ``gamma``), every ``*.bias``, and the names (fnmatch patterns) returned by ``model.no_weight_decay()`` when
    the model defines it (timm's convention, e.g. position embeddings). Frozen parameters are left out; every
    trainable parameter is in exactly one group; empty groups are dropped. Pass the raw (uncompiled) model.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    # timm's helper puts every param in no_decay when weight_decay == 0; call it with a positive value so the
    # split (and the optimizer state layout of a checkpoint) does not depend on the decay value.
    groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=skip)
    out = []
    for group in groups:
        assert not group.get("use_fallback"), "no fallback list was given"
        decays = group["weight_decay"] > 0
        out.append({"params": group["params"], "weight_decay": float(weight_decay) if decays else 0.0,
                    "name": "decay" if decays else "no_decay"})
    return out


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`.

    ``fused=None`` picks the fastest implementation for where the parameters live: the fused CUDA kernel
    (one launch for all parameters) when they are on CUDA, the multi-tensor ``foreach`` path otherwise.
    ``fused=True`` forces fused, ``fused=False`` forces foreach.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **impl)


class WarmupCosine:
    """Per-iteration LR: linear warmup to ``base_lr``, then half-cosine down to ``min_lr``.

    ``lr_at(step)`` with 0-based ``step`` (the optimizer step about to be taken):
      * ``step < warmup_steps``: ``base_lr * (step + 1) / (warmup_steps + 1)`` (starts small but non-zero, so the
        first step is not wasted, and rises linearly; nanoGPT's convention);
      * ``warmup_steps <= step <= total_steps``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2`` with
        ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, so ``base_lr`` at the end of warmup and
        ``min_lr`` at ``total_steps``;
      * beyond ``total_steps``: ``min_lr``.
    Stateless (a pure function of ``step``): resuming only needs the global step. A group's optional
    ``"lr_scale"`` multiplies its lr.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, min_lr: float, warmup_steps: int,
                 total_steps: int) -> None:
        if not base_lr > 0:
            raise ValueError(f"lr must be > 0, got {base_lr}")
        if not 0 <= min_lr <= base_lr:
            raise ValueError(f"min_lr must be in [0, lr={base_lr}], got {min_lr}")
        if total_steps < 1:
            raise ValueError(f"total training steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.optimizer = optimizer
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / (self.warmup_steps + 1)
        if step >= self.total_steps:
            return self.min_lr
        t = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def step(self, step: int) -> float:
        """Set every param group's lr for ``step`` and return the base lr."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
