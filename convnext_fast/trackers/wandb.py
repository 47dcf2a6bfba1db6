"""`--wandb [PROJECT]`: one W&B run per training run, files under RUN_DIR/wandb.

W&B's own environment variables decide where it goes: WANDB_MODE=offline writes the run to disk only (sync it
later with `wandb sync RUN_DIR/wandb/offline-run-*`), WANDB_API_KEY / WANDB_ENTITY / WANDB_BASE_URL as usual.
Project ``auto`` = WANDB_PROJECT, else ``convnext-fast``. The run id is kept in RUN_DIR/trackers.json; --resume
continues that run (``resume="allow"``). The console is not captured: the progress line stays ours.
"""
from __future__ import annotations

import os
from pathlib import Path

from convnext_fast.trackers import load_ids, missing, save_ids, scalars


class WandbTracker:
    name = "W&B"

    def __init__(self, project: str) -> None:
        self.project = None if project == "auto" else project
        self.run = None

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise missing("wandb") from None
        stored = load_ids(run_dir).get("wandb", {}) if resumed else {}
        project = self.project or os.environ.get("WANDB_PROJECT") or "convnext-fast"
        run_id = stored.get("id") if stored.get("project") == project else None  # None: W&B makes a new one
        self.run = wandb.init(project=project, id=run_id, name=Path(run_dir).name, dir=str(run_dir),
                              resume="allow", settings=wandb.Settings(console="off"))
        save_ids(run_dir, "wandb", {"id": self.run.id, "project": project})
        self.run.config.update(config, allow_val_change=True)  # allowed: a resume may override flags

    def epoch(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["epoch"]))

    def end(self, state: str, summary: dict | None) -> None:
        if self.run is None:
            return
        if summary:
            self.run.summary.update(scalars(summary))
        self.run.summary["state"] = state
        self.run.finish(exit_code=0 if state in ("finished", "stopped_early", "stopped") else 1)
        self.run = None
