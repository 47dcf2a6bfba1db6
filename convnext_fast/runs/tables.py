"""Terminal views (rich tables) of run records and of a comparison."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from rich.markup import escape

from convnext_fast.runs.compare import Comparison, duration, short_labels
from convnext_fast.runs.scan import RunRecord

# `runs list --sort COLUMN`: column -> key (None sorts last, whatever the direction)
SORT_KEYS: dict[str, Callable[[RunRecord], Any]] = {
    "started": lambda r: r.started, "name": lambda r: r.name, "data": lambda r: r.data, "model": lambda r: r.model,
    "epochs": lambda r: r.epochs_run, "top1": lambda r: r.best_top1, "wall": lambda r: r.wall_time_s,
    "state": lambda r: r.state,
}


def sort_runs(runs: Sequence[RunRecord], column: str, reverse: bool = False) -> list[RunRecord]:
    if column not in SORT_KEYS:
        raise ValueError(f"--sort: unknown column {column!r} (one of {', '.join(SORT_KEYS)})")
    key = SORT_KEYS[column]
    known = sorted((r for r in runs if key(r) is not None), key=key, reverse=reverse)
    return known + [r for r in runs if key(r) is None]


_STATE_STYLE = {"finished": "green", "stopped early": "green", "stopped": "yellow", "running": "cyan",
                "interrupted": "yellow", "failed": "red"}


def runs_table(runs: Sequence[RunRecord], title: str | None = None):
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("run", "left"), ("started", "left"), ("data", "left"), ("model", "left"),
                          ("sizes", "left"), ("epochs", "right"), ("best top-1", "right"), ("wall", "right"),
                          ("state", "left")):
        table.add_column(name, justify=justify)
    for r, label in zip(runs, short_labels([r.path for r in runs])):
        top1 = "-" if r.best_top1 is None else f"{r.best_top1:.2f}%" + (" ema" if r.best_key.startswith("ema") else "")
        table.add_row(label, (r.started or "-").replace("T", " ").rstrip("Z"), _short(r.data), r.model or "-",
                      r.schedule or "-", f"{r.epochs_run}/{r.epochs_planned or '?'}", top1,
                      duration(r.wall_time_s) or "-",
                      f"[{_STATE_STYLE.get(r.state, 'default')}]{r.state}[/]" + _why(r))
    return table


def _why(r: RunRecord, width: int = 60) -> str:
    """A failed run's reason, shortened (the whole of it: --json)."""
    if r.state != "failed" or not r.detail:
        return ""
    text = r.detail if len(r.detail) <= width else r.detail[: width - 1] + "\u2026"
    return f" [dim]({escape(text)})[/]"


def print_comparison(console, cmp: Comparison, top_classes: int = 15) -> None:
    from rich.table import Table

    for note in cmp.notes:
        console.print(f"[yellow]note:[/] {note}")
    if cmp.config_diff:
        t = Table(title="Configuration: the keys that differ")
        t.add_column("key")
        for label in cmp.labels:
            t.add_column(label)
        for key, values in cmp.config_diff:
            t.add_row(key, *values)
        console.print(t)
    else:
        console.print("The runs share every configuration key.")
    t = Table(title="Metrics (best in bold)")
    t.add_column("")
    for label in cmp.labels:
        t.add_column(label, justify="right")
    for label, values, best in cmp.metrics:
        t.add_row(label, *[f"[bold]{v}[/]" if i == best else v for i, v in enumerate(values)])
    console.print(t)
    if cmp.classes:
        shown = cmp.classes[:top_classes]
        t = Table(title=f"Per-class recall % at each run's best epoch (largest {cmp.change_label} first; "
                        f"{len(shown)} of {len(cmp.classes)} classes)")
        t.add_column("class")
        for label in cmp.labels:
            t.add_column(label, justify="right")
        t.add_column(cmp.change_label, justify="right")
        for row in shown:
            change = "-" if row.change is None else f"{row.change:+.1f}" if len(cmp.runs) == 2 else f"{row.change:.1f}"
            t.add_row(row.name, *["-" if v is None else f"{v:.1f}" for v in row.recall], change)
        console.print(t)


def _short(path: str | None) -> str:
    if not path:
        return "-"
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else path


