"""Model creation: any timm model, never pretrained, optionally channels-last.

``torch.compile`` is applied by the engine to the (DDP-wrapped) training module; the raw module returned here is
what checkpoints and exports store, so saved names never carry ``_orig_mod.`` / ``module.`` prefixes.
"""
from __future__ import annotations

import timm
import torch
from torch import nn


def create_model(name: str, num_classes: int, *, drop_path: float = 0.0, device: torch.device | str = "cpu",
                 channels_last: bool = True) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` on ``device``; an unknown name is a ValueError."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_model_name(name)
    kwargs = {"drop_path_rate": drop_path} if drop_path > 0 else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:  # a model family without stochastic depth
        raise ValueError(f"--model {name}: cannot set drop_path={drop_path}: {e}") from None
    model.to(device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def check_model_name(name: str) -> None:
    """ValueError unless ``name`` is a timm model."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"--model: unknown timm model {name!r}{hint}")
