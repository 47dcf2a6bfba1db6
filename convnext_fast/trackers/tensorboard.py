"""`--tensorboard`: event files in RUN_DIR/tb (torch's SummaryWriter), one scalar per row key per epoch.

The hyperparameters are written into the run's own writer (not `add_hparams`, which opens a writer in a new
subfolder, i.e. a second "run"), so TensorBoard's HParams view shows one row per training run, next to its own
curves. A resumed run appends to the same folder; ``purge_step`` makes TensorBoard drop any step the resumed run
logs again.
"""
from __future__ import annotations

from pathlib import Path

from convnext_fast.trackers import flat_config, missing, scalars

# The metrics the HParams view lists for each run (tags of scalars written by epoch()).
HPARAM_METRICS = ("val_top1", "ema_val_top1", "val_loss", "train_loss")


class TensorBoardTracker:
    name = "TensorBoard"

    def __init__(self) -> None:
        self.writer = None

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise missing("tensorboard") from None
        from convnext_fast.run_files import read_jsonl

        log_dir = Path(run_dir) / "tb"
        fresh = not any(log_dir.glob("events.out.tfevents.*"))
        done = read_jsonl(Path(run_dir) / "metrics.jsonl")  # a resume rewrote it to the checkpoint's epochs
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=None if fresh else len(done) + 1)
        if fresh:
            hp = {k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                  for k, v in flat_config(config).items()}
            with_ema = bool(config.get("recipe", {}).get("model_ema"))
            metrics = {m: 0.0 for m in HPARAM_METRICS if with_ema or not m.startswith("ema_")}
            for summary in hparams(hp, metrics):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def epoch(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["epoch"])
        self.writer.flush()

    def end(self, state: str, summary: dict | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
