"""Classification losses that accept hard (int64 [B]) or soft (float [B, C]) targets.

Soft targets come from :class:`convnext_fast.mixup.DeviceMixup` (Mixup/CutMix with label smoothing folded in);
hard targets come from evaluation. Every loss here does its math in float32, also under autocast, so a bf16/fp16
forward pass never computes ``log_softmax`` or the focal weight in low precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

__all__ = ["CrossEntropy", "FocalLoss", "build_loss"]


def _check_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    # Shape checks only (no values): they read metadata and never synchronize with the device.
    if logits.ndim != 2:
        raise ValueError(f"loss expects logits shaped [B, C], got {tuple(logits.shape)}")
    if target.ndim == 1:
        if target.dtype.is_floating_point or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"hard targets must be integer [B={logits.shape[0]}], got {target.dtype} {tuple(target.shape)}")
    elif target.shape != logits.shape:
        raise ValueError(f"soft targets must match logits {tuple(logits.shape)}, got {tuple(target.shape)}")


class CrossEntropy(nn.Module):
    """Cross-entropy for hard or soft targets, mean over the batch, float32 math.

    Soft targets ([B, C] float, rows summing to 1) go through ``timm.loss.SoftTargetCrossEntropy``
    (``mean_b sum_c -t_bc log p_bc``); hard targets (int64 [B]) through ``F.cross_entropy``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_target(logits, target)
        with torch.autocast(logits.device.type, enabled=False):
            if target.ndim == 1:
                return F.cross_entropy(logits.float(), target)
            return self.soft(logits.float(), target.float())


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) generalized to soft targets, mean over the batch, float32 math.

    ``loss_b = -sum_c t_bc * (1 - p_bc)**gamma * log p_bc`` with ``p = softmax(logits)``.
    For a one-hot target this is the paper's ``-(1 - p_y)**gamma * log p_y``; for a soft target (Mixup/CutMix,
    label smoothing) each class's log-likelihood is down-weighted by how well that class is already predicted,
    the natural linear extension (the loss is linear in the target, as cross-entropy is).
    ``gamma == 0`` is exactly soft-target cross-entropy (and ``F.cross_entropy`` for hard targets).

    timm ships no focal loss that accepts soft targets, hence this module.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if not gamma >= 0:  # also rejects NaN
            raise ValueError(f"focal_gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_target(logits, target)
        with torch.autocast(logits.device.type, enabled=False):
            logp = F.log_softmax(logits.float(), dim=-1)
            if target.ndim == 1:
                # Hard targets: only the true class contributes; gather instead of building a one-hot.
                logp = logp.gather(1, target.unsqueeze(1)).squeeze(1)
                return -(self._weight(logp) * logp).mean()
            return torch.sum(-target.float() * self._weight(logp) * logp, dim=-1).mean()

    def _weight(self, logp: torch.Tensor) -> torch.Tensor | float:
        if self.gamma == 0:
            return 1.0  # skip the pow so gamma 0 reproduces cross-entropy bit for bit
        # 1 - p computed as -expm1(log p): accurate when p is close to 1, where the focal weight matters.
        # The clamp keeps d/dx x**gamma finite at x == 0 for gamma < 1 (that term's loss is ~0 anyway).
        return (-torch.expm1(logp)).clamp_min(1e-12).pow(self.gamma)


def build_loss(focal_gamma: float = 0.0) -> nn.Module:
    """Training/eval criterion: ``CrossEntropy`` for ``focal_gamma == 0``, else ``FocalLoss(focal_gamma)``.

    Both take ``(logits [B, C], target)`` with ``target`` int64 [B] or float [B, C] and return a scalar mean.
    """
    if not focal_gamma >= 0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    return FocalLoss(focal_gamma) if focal_gamma > 0 else CrossEntropy()
