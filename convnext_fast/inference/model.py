"""A model rebuilt from its weights, with the eval preprocessing and forward pass that every user of it shares.

``eval``, ``predict`` and ``export`` all go through :func:`load_model`: the image size, crop_pct, mean/std and
classes come from the weights' metadata, the loader is ``build_loader(train=False, ...)`` with exactly those
values, and the forward pass is :func:`convnext_fast.evaluate.predict` (eval mode, flip TTA). There is no second
preprocessing anywhere for a user's inference to drift from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_fast.data import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class LoadedModel:
    """A model in eval mode on ``device`` and the facts of its preprocessing (from the weights' metadata)."""

    weights: str
    model: torch.nn.Module
    meta: dict
    classes: list[str]
    device: torch.device
    amp: str  # bf16 | fp16 | off

    @property
    def img_size(self) -> int:
        return int(self.meta["img_size"])

    @property
    def crop_pct(self) -> float:
        return float(self.meta.get("crop_pct", 0.875))

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.meta.get("mean", IMAGENET_MEAN))

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.meta.get("std", IMAGENET_STD))

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[self.amp]

    def loader(self, index: Any, img_size: int, *, backend: str = "dali", batch_size: int = 64,
               workers: int | None = None, skip_bad: bool = False, bad_files_log: str | Path | None = None):
        """The eval loader over ``index`` at ``img_size``: resize to img_size / crop_pct, center crop, normalize
        with the weights' mean/std."""
        from convnext_fast.data import build_loader

        return build_loader(index, train=False, img_size=img_size, batch_size=batch_size, backend=backend,
                            device=self.device, crop_pct=self.crop_pct, mean=self.mean, std=self.std,
                            num_workers=workers, skip_bad=skip_bad, bad_files_log=bad_files_log)

    def forward(self, images: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
        """Float32 logits [B, C]; ``tta``: the mean of the image's and its mirror's logits."""
        from convnext_fast.evaluate import predict

        return predict(self.model, images, tta=tta, amp_dtype=self.amp_dtype)

    def preprocessing(self) -> dict:
        """What an exported model records so that its users can reproduce the input (ONNX metadata, README)."""
        return {"classes": list(self.classes), "img_size": self.img_size, "crop_pct": self.crop_pct,
                "mean": list(self.mean), "std": list(self.std), "interpolation": "bilinear (antialiased)",
                "resize": "shorter side to img_size / crop_pct, then center crop img_size"}


def load_model(weights: str | Path, *, device: str | torch.device | None = None, amp: str | None = None) -> LoadedModel:
    """Rebuild the model of WEIGHTS (checkpoint ``.pt`` or ``model.safetensors``) on ``device`` in eval mode.

    ``amp`` defaults to bf16 on CUDA and off on CPU. Weights that do not fit the recorded model are a ValueError.
    """
    from convnext_fast.checkpoint import load_weights
    from convnext_fast.config import AMP_MODES
    from convnext_fast.backends import set_backends
    from convnext_fast.data import resolve_device
    from convnext_fast.model import create_model

    if amp is not None and amp not in AMP_MODES:
        raise ValueError(f"--amp: expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    state, meta = load_weights(weights)
    classes = list(meta["classes"])
    dev = resolve_device(device)
    set_backends()  # training's policy: the same numerics as the run's own evaluation
    model = create_model(meta["model_name"], len(classes), device=dev)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not fit {meta['model_name']} ({str(e).splitlines()[0]})") from None
    model.eval()
    return LoadedModel(str(weights), model, meta, classes, dev, amp or ("bf16" if dev.type == "cuda" else "off"))


def parse_sizes(text: str | None) -> list[int] | None:
    """``"160,192,224"`` -> [160, 192, 224]; None stays None (the weights' own size)."""
    if text is None:
        return None
    try:
        sizes = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"--img-size: expected PX or PX,PX,... (e.g. 160,192,224), got {text!r}") from None
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--img-size {text}: a size is listed twice")
    return sizes
