"""What an evaluation pass saves for reports: logits, labels and image paths (DESIGN §6: a report is a view of
saved data; nothing that renders a report runs the model).

``predictions.npz`` holds plain arrays only (loads with ``allow_pickle=False``)::

    logits  float32 [S, N, C]   one slice per evaluated image size, images in index order
    labels  int64   [N]         -1: unknown (``predict`` on unlabelled images)
    paths   str     [N]
    classes str     [C]
    img_sizes int64 [S]
    meta    str     JSON: weights, data, model, tta, ema, amp, device, created (UTC), version, eval seconds
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Predictions:
    classes: list[str]
    labels: np.ndarray
    paths: list[str]
    img_sizes: list[int]
    logits: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.logits = np.asarray(self.logits, dtype=np.float32)
        if self.logits.ndim == 2:
            self.logits = self.logits[None]
        s, n, c = self.logits.shape
        if (len(self.img_sizes), len(self.paths), len(self.classes)) != (s, n, c) or self.labels.shape != (n,):
            raise ValueError(f"predictions: logits {self.logits.shape} do not match {len(self.img_sizes)} size(s), "
                             f"{len(self.paths)} paths, {self.labels.shape[0]} labels and {len(self.classes)} classes")
        if n and not (-1 <= self.labels.min() and self.labels.max() < c):
            raise ValueError(f"predictions: labels outside [0, {c}) (or -1, unknown)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.npz) via a temp file and rename, so a crash never leaves a torn file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
        try:
            np.savez(tmp, logits=self.logits, labels=self.labels, paths=np.array(self.paths, dtype=str),
                     classes=np.array(self.classes, dtype=str), img_sizes=np.array(self.img_sizes, dtype=np.int64),
                     meta=np.array(json.dumps(self.meta)))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictions":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(classes=z["classes"].tolist(), labels=z["labels"], paths=z["paths"].tolist(),
                           img_sizes=z["img_sizes"].tolist(), logits=z["logits"], meta=json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a predictions file ({e})") from None
