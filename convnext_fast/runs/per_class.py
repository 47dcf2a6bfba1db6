"""RUN_DIR/per_class.json: the per-class recall of the best epoch (the selected weights: EMA when on).

Written at every improved epoch next to model.safetensors (`run_guard.save_epoch`), so an interrupted run has it
too; read by `runs compare`. Small on purpose (one number per class and its image count, not the confusion
matrix): ``{"epoch": 7, "weights": "ema", "classes": [...], "recall": [...], "support": [...]}``, recall in %
(None for a class without validation images).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

PER_CLASS_FILE = "per_class.json"


def write_per_class(run_dir: Path, *, epoch: int, weights: str, classes: Sequence[str],
                    per_class_acc: Sequence[float], confusion: Sequence[Sequence[int]] | None) -> Path:
    from convnext_fast.run_files import atomic_write_text, to_jsonable

    recall = [a if a is not None and math.isfinite(a) else None for a in to_jsonable(list(per_class_acc))]
    support = [int(sum(row)) for row in to_jsonable(confusion)] if confusion is not None else None
    data = {"epoch": epoch, "weights": weights, "classes": list(classes), "recall": recall, "support": support}
    return atomic_write_text(Path(run_dir) / PER_CLASS_FILE, json.dumps(data) + "\n")


def read_per_class(run_dir: Path) -> dict | None:
    """per_class.json of ``run_dir``; None when absent (a run from before the file, or no epoch finished)."""
    try:
        data = json.loads((Path(run_dir) / PER_CLASS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or len(data.get("classes") or []) != len(data.get("recall") or [None]):
        return None
    return data
