"""Evaluation: one pass over a loader, any number of models, metrics reduced across ranks.

Accuracy comes from :class:`~convnext_fast.metrics.ClassificationMeter`: counts (confusion matrix, top-5 hits,
loss sums) are accumulated on the device and summed across ranks, so a sharded evaluation reports exactly what a
single process would (each validation sample is counted once; no average of averages). The loss is plain
cross-entropy on the hard labels, comparable across recipes (the training loss may be focal and mixed).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from convnext_fast.metrics import ClassificationMeter

Forward = Callable[[torch.Tensor], torch.Tensor]  # images -> float32 logits [B, C]


def evaluate(forwards: Mapping[str, Forward], loader: Iterable, *, num_classes: int,
             device: torch.device | str) -> dict[str, dict]:
    """Run every ``forwards[name]`` on each batch of ``loader``; return ``{name: ClassificationMeter.compute()}``.

    One loader pass serves all models (e.g. the weights and their EMA), so the data is decoded once.
    Collective: under DDP every rank must call it with its shard of the data.
    """
    return _evaluate(forwards, loader, num_classes=num_classes, device=device)[0]


def evaluate_outputs(forward: Forward, loader: Iterable, *, num_classes: int,
                     device: torch.device | str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(metrics, logits [N, C] float32, labels [N]) of one model, on the host, in the loader's order.

    The per-image outputs are what reports are built from (DESIGN §6). They stay on the device until the end of
    the pass (one copy, no per-batch sync). Single process only: the outputs are this rank's shard.
    """
    metrics, kept = _evaluate({"model": forward}, loader, num_classes=num_classes, device=device, keep=True)
    logits, labels = kept
    return metrics["model"], logits, labels


def _evaluate(forwards: Mapping[str, Forward], loader: Iterable, *, num_classes: int, device: torch.device | str,
              keep: bool = False) -> tuple[dict[str, dict], tuple[torch.Tensor, torch.Tensor] | None]:
    meters = {name: ClassificationMeter(num_classes, device) for name in forwards}
    kept_logits: list[torch.Tensor] = []
    kept_labels: list[torch.Tensor] = []
    for images, labels in loader:
        for name, forward in forwards.items():
            logits = forward(images)
            meters[name].update(logits, labels, F.cross_entropy(logits, labels))
            if keep:
                kept_logits.append(logits.detach().float())
                kept_labels.append(labels)
    out = {}
    for name, meter in meters.items():
        meter.all_reduce()
        out[name] = meter.compute()  # one host sync per model per evaluation
    if not keep:
        return out, None
    if not kept_logits:
        return out, (torch.zeros(0, num_classes), torch.zeros(0, dtype=torch.int64))
    return out, (torch.cat(kept_logits).cpu(), torch.cat(kept_labels).to(torch.int64).cpu())  # SYNC: one copy


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, *, tta: bool = False,
            amp_dtype: torch.dtype | None = None, channels_last: bool = True) -> torch.Tensor:
    """Float32 logits of ``model`` in eval mode; ``tta`` averages the logits of the image and its mirror."""
    was_training = model.training
    model.eval()
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images).float()
        if tta:
            logits = (logits + model(images.flip(3)).float()) * 0.5
    model.train(was_training)
    return logits
