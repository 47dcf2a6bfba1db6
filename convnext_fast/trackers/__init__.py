"""Experiment trackers: TensorBoard, MLflow, Weights & Biases, as sinks of the epoch row (`convnext_fast.sinks`).

Each receives the very rows metrics.jsonl holds (one producer, DESIGN §7), on rank 0 only, and is an optional
extra: a missing package, an unreachable server or any error is one warning line from `Sinks` and the run goes on
with its own files untouched. Each tracker imports its package in ``start()``, so building them costs nothing.

``--resume`` continues the same tracker run: the ids a tracker was given are kept in RUN_DIR/trackers.json
(MLflow run id, W&B run id) and reused; TensorBoard appends to RUN_DIR/tb, purging the steps it redoes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

IDS_FILE = "trackers.json"


def build_trackers(run_cfg: Any) -> list:
    """The trackers a `RunConfig` asks for (``tensorboard``, ``mlflow``, ``wandb``), in that order."""
    out: list = []
    if run_cfg.tensorboard:
        from convnext_fast.trackers.tensorboard import TensorBoardTracker
        out.append(TensorBoardTracker())
    if run_cfg.mlflow is not None:
        from convnext_fast.trackers.mlflow import MLflowTracker
        out.append(MLflowTracker(run_cfg.mlflow, log_model=run_cfg.mlflow_model))
    if run_cfg.wandb is not None:
        from convnext_fast.trackers.wandb import WandbTracker
        out.append(WandbTracker(run_cfg.wandb))
    return out


def missing(package: str) -> RuntimeError:
    return RuntimeError(f"the {package} package is not installed (pip install 'convnext_fast[{package}]'); "
                        f"the run goes on without it")


def scalars(row: dict) -> dict[str, float]:
    """The row's numbers (finite ints and floats, not ``epoch``, which is the step)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(config: dict) -> dict[str, Any]:
    """The resolved config as dotted keys (``optim.lr``), the form trackers' parameter tables hold."""
    from convnext_fast.runs.compare import flatten

    return flatten(config)


def load_ids(run_dir: Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_ids(run_dir: Path, tracker: str, ids: dict) -> None:
    from convnext_fast.run_files import atomic_write_text

    data = load_ids(run_dir)
    data[tracker] = ids
    atomic_write_text(Path(run_dir) / IDS_FILE, json.dumps(data, indent=2) + "\n")
