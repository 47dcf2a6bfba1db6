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
    meters = {name: ClassificationMeter(num_classes, device) for name in forwards}
    for images, labels in loader:
        for name, forward in forwards.items():
            logits = forward(images)
            meters[name].update(logits, labels, F.cross_entropy(logits, labels))
    out = {}
    for name, meter in meters.items():
        meter.all_reduce()
        out[name] = meter.compute()  # one host sync per model per evaluation
    return out


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
