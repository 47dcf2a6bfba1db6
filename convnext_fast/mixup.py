"""Batched Mixup/CutMix on the device, producing soft targets with label smoothing folded in.

Built on ``timm.data.Mixup`` in ``mode="batch"`` (one lambda per batch, images mixed in place with their
batch-reversed partner, ``mixup_target`` for the targets). What timm misses: it draws lambdas and boxes from
numpy's *global* RNG, so a resumed run cannot replay them and any other user of ``np.random`` shifts them.
``DeviceMixup`` overrides the two sampling methods to draw from a private ``np.random.Generator`` seeded from
``(seed..., batch_counter)``: batch ``n`` gets the same lambda and box whatever happened before, and the only
state is the counter, which is the same on every rank, so rank 0's checkpoint resumes every rank exactly.

All randomness is drawn on the host (a few scalars per batch); the images and labels never leave the device and
nothing in ``__call__`` waits for the device.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

__all__ = ["DeviceMixup"]


class DeviceMixup(Mixup):
    """Batch-mode Mixup/CutMix with a private, checkpointable RNG.

    Args:
        num_classes: number of classes C of the soft targets.
        mixup_alpha: Beta(alpha, alpha) for the Mixup lambda; 0 disables Mixup.
        cutmix_alpha: Beta(alpha, alpha) for the CutMix lambda; 0 disables CutMix.
        prob: probability that a batch is mixed at all (otherwise lambda = 1, targets only smoothed).
        switch_prob: probability of CutMix instead of Mixup when both alphas are > 0.
        smoothing: label smoothing folded into the targets (timm convention: off = s/C, on = 1 - s + s/C).
        seed: an int or a sequence of ints, e.g. ``[seed, rank]`` to give each rank its own lambdas. Batch ``n``
            draws from ``np.random.default_rng([*seed, n])`` (~20 us on the host per batch).

    ``__call__(images, labels)`` mixes ``images`` ([B, 3, H, W], any float dtype/layout) *in place* and returns
    ``(images, soft_targets)`` with ``soft_targets`` float32 [B, C] on the labels' device, rows summing to 1.
    CutMix's lambda is corrected to the exact kept area after the box is clipped at the border (timm's
    ``correct_lam``). With both alphas 0 or ``prob == 0`` the images are untouched, no random number is drawn,
    and the targets are the smoothed one-hot labels.
    Any batch size works (timm asserts an even one, which only its per-element modes need).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1,
                 seed: int | Sequence[int] = 0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for name, value, hi in (("mixup_alpha", mixup_alpha, None), ("cutmix_alpha", cutmix_alpha, None),
                                ("prob", prob, 1.0), ("switch_prob", switch_prob, 1.0),
                                ("smoothing", smoothing, 1.0)):
            if not (value >= 0 and (hi is None or value <= hi)):
                raise ValueError(f"DeviceMixup {name} must be in [0, {hi if hi is not None else 'inf'}], got {value}")
        super().__init__(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                         mode="batch", correct_lam=True, label_smoothing=smoothing, num_classes=num_classes)
        self.seed = tuple(int(v) for v in np.atleast_1d(seed))
        if any(v < 0 for v in self.seed):
            raise ValueError(f"DeviceMixup seed must be non-negative, got {seed}")
        self.batches = 0  # batches seen so far (mixed or not): the whole checkpointed state
        self.rng = np.random.default_rng([*self.seed, 0])
        self.last_lam = 1.0  # lambda of the latest batch (host float), for logging and tests

    @property
    def active(self) -> bool:
        """Whether any batch can be mixed (an alpha > 0 and prob > 0)."""
        return self.mixup_enabled and self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"DeviceMixup expects images [B,...] and labels [B], got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        lam = 1.0
        if self.active:
            self.rng = np.random.default_rng([*self.seed, self.batches])
            lam = self._mix_batch(images)
        self.batches += 1
        self.last_lam = float(lam)  # a host float drawn on the host: no device sync
        targets = mixup_target(labels, self.num_classes, self.last_lam, self.label_smoothing)
        return images, targets.float()

    # --- timm overrides: same draws as timm, from self.rng instead of np.random -----------------------------

    def _params_per_batch(self) -> tuple[float, bool]:
        lam, use_cutmix = 1.0, False
        if self.active and self.rng.random() < self.mix_prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(self.rng.random() < self.switch_prob)
            else:
                use_cutmix = self.cutmix_alpha > 0
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = float(self.rng.beta(alpha, alpha))
        return lam, use_cutmix

    def _mix_batch(self, x: torch.Tensor) -> float:
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = self._bbox_and_lam(x.shape[-2], x.shape[-1], lam)
            # Only the box is copied (flip makes a new tensor, so reading and writing x is safe); timm flips
            # the whole batch first.
            x[:, :, yl:yh, xl:xh] = x[:, :, yl:yh, xl:xh].flip(0)
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam

    def _bbox_and_lam(self, img_h: int, img_w: int, lam: float) -> tuple[tuple[int, int, int, int], float]:
        """timm's ``rand_bbox`` + ``correct_lam``: a box of area ~(1 - lam), clipped, lam = 1 - kept box area."""
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
        cy = int(self.rng.integers(0, img_h))
        cx = int(self.rng.integers(0, img_w))
        yl, yh = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, img_h)
        xl, xh = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, img_w)
        lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
        return (yl, yh, xl, xh), lam

    # --- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"batches": n}``: rank-independent, so one saved copy (rank 0's) restores every rank."""
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue as if ``state["batches"]`` batches had been mixed (with this instance's seed)."""
        n = state.get("batches") if isinstance(state, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"not a DeviceMixup state: {state!r:.200}")
        self.batches = n
