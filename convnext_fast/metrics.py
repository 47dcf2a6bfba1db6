"""Classification metrics accumulated on the device, synchronized with the host once per evaluation."""
from __future__ import annotations

import math

import torch

__all__ = ["ClassificationMeter"]


class ClassificationMeter:
    """Confusion matrix, top-5 hits and loss sum for one evaluation pass, kept as device tensors.

    ``update`` never waits for the device (no ``.item()``, ``.cpu()``, or ops whose output size depends on
    values); ``all_reduce`` sums the counters across ranks; ``compute`` is the single host sync.
    Rows of the confusion matrix are true classes, columns predictions.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.topk = min(5, self.num_classes)
        self.reset()

    def reset(self) -> None:
        c, dev = self.num_classes, self.device
        self.confusion = torch.zeros(c, c, dtype=torch.int64, device=dev)
        self.topk_correct = torch.zeros((), dtype=torch.int64, device=dev)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # sum over samples of the batch mean loss
        self.loss_count = torch.zeros((), dtype=torch.int64, device=dev)  # samples whose batch passed a loss

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | float | None = None) -> None:
        """Add a batch: ``logits`` [B, C], ``labels`` int64 [B] in [0, C), ``loss`` the batch *mean* loss.

        Inputs should already live on the meter's device (moving them here would be a copy, on CUDA a sync).
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or labels.shape != logits.shape[:1]:
            raise ValueError(f"expected logits [B, {self.num_classes}] and labels [B], got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        labels = labels.to(self.device, torch.int64)
        logits = logits.to(self.device)
        pred = logits.argmax(dim=1)
        # scatter_add_ rather than torch.bincount: CUDA bincount reads max() back to size its output (a sync).
        flat = labels * self.num_classes + pred
        self.confusion.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
        top = logits.topk(self.topk, dim=1).indices
        self.topk_correct += (top == labels.unsqueeze(1)).any(dim=1).sum()
        if loss is not None:
            n = labels.shape[0]
            # A python float is added as a kernel scalar; as_tensor(float, device="cuda") would be a blocking copy.
            self.loss_sum += loss.detach().to(self.device, torch.float64) * n if torch.is_tensor(loss) \
                else float(loss) * n
            self.loss_count += n

    def all_reduce(self) -> None:
        """Sum the counters over all ranks in place (no-op in a single process)."""
        from convnext_fast.distributed import all_reduce_sum  # lazy: keeps this module free of dist setup

        for t in (self.confusion, self.topk_correct, self.loss_sum, self.loss_count):
            all_reduce_sum(t)

    def compute(self) -> dict:
        """One host sync; returns python numbers.

        ``top1``, ``top5`` (top-min(5, C)) and ``per_class_acc`` are percentages (0-100); ``loss`` is the
        sample-weighted mean of the batch losses; ``count`` the number of samples; ``confusion`` a C x C list of
        ints. Undefined values (no samples; a class without samples; no loss given) are ``nan``.
        """
        packed = torch.cat([self.confusion.flatten().to(torch.float64), self.topk_correct.view(1).double(),
                            self.loss_sum.view(1), self.loss_count.view(1).double()]).cpu()  # the one sync
        c = self.num_classes
        confusion = packed[: c * c].view(c, c).to(torch.int64)
        topk_correct, loss_sum, loss_count = packed[c * c:].tolist()
        per_class_total = confusion.sum(dim=1).tolist()
        diag = confusion.diagonal().tolist()
        count = int(sum(per_class_total))
        nan = math.nan
        return {
            "top1": 100.0 * sum(diag) / count if count else nan,
            "top5": 100.0 * topk_correct / count if count else nan,
            "loss": loss_sum / loss_count if loss_count else nan,
            "count": count,
            "per_class_acc": [100.0 * d / n if n else nan for d, n in zip(diag, per_class_total)],
            "confusion": confusion.tolist(),
        }
