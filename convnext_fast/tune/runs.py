"""What tune reads back from a trial's run directory: its epoch rows and summary.

Kept to one small function on purpose: `convnext_fast/runs/` (run-directory scanning for `runs list`) is being
built alongside; this is the one place to swap for it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from convnext_fast.run_files import read_jsonl


@dataclass
class RunRecord:
    rows: list[dict] = field(default_factory=list)
    summary: dict | None = None

    @property
    def curve(self) -> list[tuple[int, float]]:
        """(epoch, val top-1 of the selected weights: the EMA's when on)."""
        return [(int(r["epoch"]), float(r.get("ema_val_top1", r["val_top1"]))) for r in self.rows]

    @property
    def best(self) -> float | None:
        if self.summary and self.summary.get("best_top1") is not None:
            return float(self.summary["best_top1"])
        return max((v for _, v in self.curve), default=None)

    @property
    def wall_s(self) -> float:
        if self.summary and self.summary.get("wall_time_s") is not None:
            return float(self.summary["wall_time_s"])
        return sum(float(r.get("epoch_time_s", 0.0)) for r in self.rows)


def read_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return RunRecord(rows=read_jsonl(run_dir / "metrics.jsonl"), summary=summary)
