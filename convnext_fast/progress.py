"""Training progress on the terminal: a rich progress bar on a TTY, plain log lines otherwise.

Only the main rank shows anything (``enabled=False`` elsewhere). ``advance`` is called every step and touches
only host state; the loss and throughput shown are refreshed at the loop's sync points (``update``).
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from convnext_fast.config import TrainConfig
    from convnext_fast.distributed import DistInfo
    from convnext_fast.engine import Engine


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "-:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainProgress:
    """Per-epoch progress (bar or log lines) plus one summary line per epoch."""

    def __init__(self, *, enabled: bool = True, epochs: int = 1, tty: bool | None = None) -> None:
        from rich.console import Console

        self.enabled = enabled
        self.epochs = epochs
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.console = Console(highlight=False) if self.tty else Console(highlight=False, no_color=True,
                                                                          width=200, soft_wrap=True)
        self._progress = None
        self._task = None
        self.epoch = 0
        self.steps = 0

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        """Begin epoch ``epoch`` (0-based) of ``steps`` steps, ``done`` of them already run (resume)."""
        self.epoch, self.steps = epoch, steps
        if not (self.enabled and self.tty):
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[ips]} img/s  loss {task.fields[loss]}  lr {task.fields[lr]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, completed=done,
                                             epoch=f"{epoch + 1}/{self.epochs}", ips="-", loss="-", lr="-")

    def advance(self) -> None:
        """One step done (host-side only)."""
        if self._progress is not None:
            self._progress.advance(self._task)

    def update(self, *, step_in_epoch: int, loss: float, lr: float, img_per_sec: float, elapsed_s: float,
               steps_timed: int) -> None:
        """Refresh the shown loss, lr and throughput (called at a sync point)."""
        if not self.enabled:
            return
        eta = elapsed_s / max(steps_timed, 1) * (self.steps - step_in_epoch)
        if self._progress is not None:
            self._progress.update(self._task, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{img_per_sec:,.0f}")
        else:
            self.console.print(f"epoch {self.epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps}  "
                               f"loss {loss:.4f}  lr {lr:.2e}  {img_per_sec:,.1f} img/s  eta {_eta(eta)}")

    def end_epoch(self, row: dict) -> None:
        """Close the bar and print the epoch's summary line."""
        self._stop()
        if not self.enabled:
            return
        parts = [f"epoch {row['epoch']}/{self.epochs}", f"train_loss {row['train_loss']:.4f}"]
        for key, label, spec in (("val_loss", "val_loss", ".4f"), ("val_top1", "top1", ".2f"),
                                 ("val_top5", "top5", ".2f"), ("ema_val_top1", "ema_top1", ".2f")):
            if row.get(key) is not None:
                parts.append(f"{label} {row[key]:{spec}}")
        parts += [f"{row['img_per_sec']:,.1f} img/s", f"{row['epoch_time_s']:.1f}s",
                  f"data wait {row['data_wait_pct']:.0f}%"]
        self.console.print("  ".join(parts))

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = self._task = None

    def close(self) -> None:
        self._stop()


def describe_run(cfg: TrainConfig, engine: Engine, dist: DistInfo, n_train: int, n_val: int, classes: list,
                 steps: int, lr: float, data_root: str = "") -> str:
    """The run header: model, data, device, batch and lr (with its scaling), speed switches."""
    s, gb = engine.speed, cfg.data.batch_size * dist.world_size
    lr_note = "" if cfg.optim.lr is not None else f" (= {cfg.optim.ref_lr:g} x {gb} / {cfg.optim.ref_batch})"
    params = sum(p.numel() for p in engine.model.parameters()) / 1e6
    return (f"model {cfg.model.name} ({params:.1f}M params) | {len(classes)} classes | train {n_train} / val {n_val}"
            f" images | {cfg.data.img_size}px | loader {cfg.data.loader} | data {data_root}\n"
            f"device {engine.device} x {dist.world_size} | batch {cfg.data.batch_size}/process, global {gb} | "
            f"{steps} steps/epoch | lr {lr:.3g}{lr_note}\n"
            f"compile {s.compile} | amp {s.amp} | channels_last {s.channels_last} | fused_adamw {s.fused_adamw} | "
            f"device_mixup {s.device_mixup} | ema {cfg.recipe.model_ema} | tta {cfg.recipe.tta}")
