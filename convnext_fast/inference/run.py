"""Run one or several models over unlabelled images: every view of a model averaged, the models' probabilities
averaged, bad files kept as rows of their own.

A model's views are its test sizes (``--img-size``, default the size it was trained at) times flip TTA (inside
its forward pass, as in ``eval``): its logits are the mean over views. An ensemble averages probabilities (a mean
of logits would let one over-confident model dominate), optionally weighted; its reported logits are the log of
that mean (softmax of them gives the mean back), so every output has one meaning: softmax(logits) = probabilities.

Bad files: the preflight's are never fed. A file that fails later (DALI or PIL cannot decode it) is handled by
the loaders' own skip path (``data/badfiles.py``): its position is filled by a substitute, so no other row moves,
and it is listed in a log that this module reads back to blank that row. Later passes start with the log, so a
file is found bad once.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from convnext_fast.inference.inputs import Inputs
from convnext_fast.inference.model import LoadedModel


@dataclass
class PredictResult:
    """Per-row outputs in ``inputs`` order; rows of bad files hold NaN and are listed in ``bad`` with the reason."""

    classes: list[str]
    inputs: Inputs
    logits: np.ndarray  # float32 [N, C]
    probs: np.ndarray  # float32 [N, C]
    bad: dict[str, str]
    info: dict = field(default_factory=dict)


def check_same_classes(models: list[LoadedModel]) -> list[str]:
    """The classes every model shares; a one-line error naming the first model that differs."""
    first = models[0]
    for m in models[1:]:
        if m.classes != first.classes:
            missing = [c for c in first.classes if c not in m.classes][:3]
            extra = [c for c in m.classes if c not in first.classes][:3]
            detail = f"missing {missing}, extra {extra}" if missing or extra else "same names in a different order"
            raise ValueError(f"an ensemble needs the same classes: {m.weights} ({len(m.classes)} classes) differs from "
                             f"{first.weights} ({len(first.classes)} classes): {detail}")
    return list(first.classes)


def parse_ensemble_weights(text: str | None, n_models: int) -> list[float]:
    """``"2,1,1"`` -> [2.0, 1.0, 1.0] (one non-negative weight per WEIGHTS file); None -> equal weights."""
    if text is None:
        return [1.0] * n_models
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--ensemble-weights: expected numbers separated by commas, got {text!r}") from None
    if len(w) != n_models:
        raise ValueError(f"--ensemble-weights {text}: {len(w)} weight(s) for {n_models} WEIGHTS file(s)")
    if any(v < 0 or not np.isfinite(v) for v in w) or sum(w) <= 0:
        raise ValueError(f"--ensemble-weights {text}: weights must be >= 0 and not all 0")
    return w


class _Progress:
    """A rich bar with img/s on a terminal (stderr); nothing otherwise (the summary line is printed by the caller)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled and total and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[ips]} img/s"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("predict", total=total, ips="-")
            self._bar.start()
        self._t0, self._done = time.perf_counter(), 0

    def advance(self, n: int, what: str) -> None:
        self._done += n
        if self._bar is not None:
            ips = self._done / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(self._task, advance=n, description=what, ips=f"{ips:,.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@torch.no_grad()
def _view_logits(model: LoadedModel, loader, tta: bool, progress: _Progress, what: str) -> torch.Tensor:
    """[N, C] float32 logits in the loader's (index) order; they stay on the device until the end (one copy)."""
    kept = []
    for images, _ in loader:
        kept.append(model.forward(images, tta=tta))
        progress.advance(images.shape[0], what)
    if not kept:
        return torch.zeros(0, len(model.classes))
    return torch.cat(kept).cpu()


def predict_inputs(models: list[LoadedModel], inputs: Inputs, *, sizes: list[int] | None = None, tta: bool = False,
                   ensemble_weights: list[float] | None = None, backend: str = "dali", batch_size: int = 64,
                   workers: int | None = None, progress: bool = True) -> PredictResult:
    """Probabilities (and logits) of ``models`` on ``inputs``, rows in ``inputs`` order (see the module doc)."""
    from convnext_fast.data.badfiles import read_log
    from convnext_fast.data.index import ImageIndex

    classes = check_same_classes(models)
    weights = ensemble_weights or [1.0] * len(models)
    good = [p for p in inputs.paths if p not in inputs.bad]
    index = ImageIndex(inputs.root, classes, {c: i for i, c in enumerate(classes)}, [(p, 0) for p in good])
    views = [sizes or [m.img_size] for m in models]
    bar = _Progress(len(good) * sum(len(v) for v in views), progress)
    t0 = time.perf_counter()
    per_model_logits, probs = [], np.zeros((len(good), len(classes)), np.float64)
    try:
        with tempfile.TemporaryDirectory(prefix="convnext_fast_predict_") as tmp:
            log = Path(tmp) / "bad_files.txt"
            for k, (m, model_sizes) in enumerate(zip(models, views)):
                total = torch.zeros(len(good), len(classes))
                for size in model_sizes if good else []:
                    loader = m.loader(index, size, backend=backend, batch_size=batch_size, workers=workers,
                                      skip_bad=True, bad_files_log=log)
                    try:
                        total += _view_logits(m, loader, tta, bar, f"model {k + 1}/{len(models)} {size}px")
                    finally:
                        loader.close()
                mean_logits = total / len(model_sizes)
                per_model_logits.append(mean_logits)
                probs += weights[k] * torch.softmax(mean_logits.double(), dim=1).numpy()
            runtime_bad = read_log(log)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    probs /= sum(weights)
    logits = per_model_logits[0].numpy() if len(models) == 1 else np.log(np.maximum(probs, 1e-45))
    bad = {**inputs.bad, **runtime_bad}
    row = {p: i for i, p in enumerate(good)}
    full_logits = np.full((len(inputs), len(classes)), np.nan, np.float32)
    full_probs = np.full((len(inputs), len(classes)), np.nan, np.float32)
    keep = [i for i, p in enumerate(inputs.paths) if p not in bad]
    src = [row[inputs.paths[i]] for i in keep]
    full_logits[keep], full_probs[keep] = logits[src], probs[src]
    info = {"weights": [m.weights for m in models], "models": [m.meta["model_name"] for m in models],
            "img_sizes": views, "tta": tta, "ensemble_weights": weights, "loader": backend,
            "device": str(models[0].device), "amp": models[0].amp, "images": len(inputs), "bad": len(bad),
            "seconds": seconds, "img_per_sec": len(good) * sum(len(v) for v in views) / max(seconds, 1e-9)}
    return PredictResult(classes, inputs, full_logits, full_probs, bad, info)
