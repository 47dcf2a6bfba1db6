"""Run artifacts: metrics.jsonl, summary.json, plots, and rich tables for the terminal.

Only the main rank writes (``RunReporter(is_main=False)`` is a no-op), so callers never branch on rank.
Epoch rows are plain dicts; the plots know these keys (missing keys are skipped, so eval-only runs work):
``epoch``, ``train_loss``, ``val_loss``, ``ema_val_loss``, ``val_top1``, ``val_top5``, ``ema_val_top1``,
``ema_val_top5``, ``lr``. Accuracies are percentages (as :class:`convnext_fast.metrics.ClassificationMeter`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["RunReporter", "atomic_write_text", "to_jsonable", "read_jsonl", "render_eval_report",
           "epoch_table", "plot_curves", "plot_per_class", "plot_confusion", "LOSS_KEYS", "ACC_KEYS"]

LOSS_KEYS = ("train_loss", "val_loss", "ema_val_loss")
ACC_KEYS = ("val_top1", "val_top5", "ema_val_top1", "ema_val_top5")


def to_jsonable(obj: Any) -> Any:
    """Strict-JSON form: non-finite floats -> None, numpy/torch scalars -> python, paths/others -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    return str(obj)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` so readers see the old file or the new one, never a torn one (tmp + fsync + replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no temp file behind
        tmp.unlink(missing_ok=True)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (crash mid-write) is ignored, a torn earlier line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from e
    return rows


class RunReporter:
    """Writes a run's metrics and plots under ``run_dir`` (main rank only).

    * ``log_epoch(row)`` appends one JSON line to ``metrics.jsonl`` and flushes it;
    * ``write_summary(d)`` writes ``summary.json`` atomically;
    * ``make_plots(rows, per_class_acc, confusion)`` writes PNGs to ``run_dir/plots`` and returns their paths;
    * ``rewind(epoch)`` drops rows with ``row["epoch"] >= epoch`` (for a resume from an earlier checkpoint).
    """

    def __init__(self, run_dir: str | os.PathLike, classes: Sequence[str], is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.classes = list(classes)
        self.is_main = bool(is_main)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.plots_dir = self.run_dir / "plots"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def log_epoch(self, row: dict) -> None:
        if not self.is_main:
            return
        line = json.dumps(to_jsonable(row), allow_nan=False)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def rows(self) -> list[dict]:
        """Rows logged so far (read back from metrics.jsonl; empty on non-main ranks)."""
        return read_jsonl(self.metrics_path) if self.is_main else []

    def rewind(self, epoch: int) -> list[dict]:
        """Keep only rows of epochs before ``epoch`` (rows logged after the checkpoint we resume from)."""
        if not self.is_main:
            return []
        kept = [r for r in self.rows() if r.get("epoch", -1) < epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        return kept

    def write_summary(self, summary: dict) -> Path | None:
        if not self.is_main:
            return None
        return atomic_write_text(self.summary_path, json.dumps(to_jsonable(summary), indent=2, allow_nan=False) + "\n")

    def make_plots(self, rows: Sequence[dict], per_class_acc: Sequence[float] | None = None,
                   confusion: Sequence[Sequence[int]] | None = None) -> list[Path]:
        """Curves from ``rows`` (if any), per-class bars and confusion matrix (if given). Returns written paths."""
        if not self.is_main:
            return []
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        out: list[Path] = []
        if rows:
            out += plot_curves(rows, self.plots_dir)
        if per_class_acc is not None:
            out.append(plot_per_class(self.classes, per_class_acc, self.plots_dir / "per_class_accuracy.png"))
        if confusion is not None:
            out.append(plot_confusion(self.classes, confusion, self.plots_dir / "confusion_matrix.png"))
        return out


# --- plots (matplotlib) -----------------------------------------------------------------------------------------
# Figure objects straight from matplotlib.figure: no pyplot global state and no backend switch (PNG is Agg);
# matplotlib is imported lazily because it costs ~0.5 s.

def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _short(name: str, n: int = 24) -> str:
    return name if len(name) <= n else name[: n - 1] + "\u2026"


def _series(rows: Sequence[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r.get("epoch", i))
            ys.append(v)
    return xs, ys


def size_changes(rows: Sequence[dict]) -> list[tuple[float, int]]:
    """(x, new size) where the training ``img_size`` changes: between the last epoch at the old size and the
    first at the new one (progressive resolution); empty for a fixed size or rows without it."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        a, b = prev.get("img_size"), row.get("img_size")
        if a is not None and b is not None and a != b:
            out.append(((prev["epoch"] + row["epoch"]) / 2, int(b)))
    return out


def _mark_sizes(ax, rows: Sequence[dict]) -> None:
    for i, (x, size) in enumerate(size_changes(rows)):
        ax.axvline(x, color="0.5", linestyle=":", linewidth=1, label="training size change" if i == 0 else None)
        ax.annotate(f"{size}px", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="0.35")


def _line_plot(rows, keys, path: Path, ylabel: str, title: str, logy: bool = False) -> Path | None:
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    drawn = 0
    for key in keys:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
            drawn += 1
    if not drawn:
        return None
    _mark_sizes(ax, rows)
    if logy:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 0.5" ticks on short runs
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def plot_curves(rows: Sequence[dict], plots_dir: Path) -> list[Path]:
    """loss.png, accuracy.png and lr.png from epoch rows (a plot whose keys are all absent is skipped)."""
    made = [
        _line_plot(rows, LOSS_KEYS, plots_dir / "loss.png", "loss", "Loss"),
        _line_plot(rows, ACC_KEYS, plots_dir / "accuracy.png", "accuracy (%)", "Validation accuracy"),
        _line_plot(rows, ("lr",), plots_dir / "lr.png", "learning rate", "Learning rate (end of epoch)"),
    ]
    return [p for p in made if p is not None]


def plot_per_class(classes: Sequence[str], per_class_acc: Sequence[float], path: Path) -> Path:
    """Horizontal bars (names stay readable), one per class; classes without samples are marked n/a."""
    n = len(classes)
    fig = _figure(7.0, max(2.5, 0.32 * n + 1.2))
    ax = fig.add_subplot()
    accs = [a if a is not None and math.isfinite(a) else None for a in per_class_acc]
    ys = list(range(n))
    ax.barh(ys, [a or 0.0 for a in accs], color=["tab:gray" if a is None else "tab:blue" for a in accs])
    for y, a in zip(ys, accs):
        ax.text(min(a or 0.0, 100.0) + 1, y, "n/a" if a is None else f"{a:.1f}", va="center", fontsize=8)
    valid = [a for a in accs if a is not None]
    if valid:
        mean = sum(valid) / len(valid)
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean over classes {mean:.1f}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, [_short(c) for c in classes], fontsize=8)
    ax.invert_yaxis()  # class 0 on top, as in the tables
    ax.set(xlim=(0, 110), xlabel="accuracy (%)", title="Per-class accuracy")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path)
    return path


def plot_confusion(classes: Sequence[str], confusion: Sequence[Sequence[int]], path: Path) -> Path:
    """Row-normalized confusion matrix (% of each true class), cells annotated when the matrix is small."""
    n = len(classes)
    rows = [[v / max(sum(r), 1) * 100.0 for v in r] for r in confusion]
    side = max(4.5, 0.42 * n + 2.5)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of true class")
    labels = [_short(c, 20) for c in classes]
    fs = 8 if n <= 25 else 6
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), labels, fontsize=fs)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalized)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i][j]:
                    v = rows[i][j]
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=fs - 1,
                            color="white" if v > 55 else "black")
    fig.savefig(path)
    return path


# --- terminal tables (rich) ------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


_INT_KEYS = ("epoch", "img_size", "eval_img_size")  # counts and pixels: no decimals


def epoch_table(rows: Iterable[dict], keys: Sequence[str] | None = None, title: str | None = None):
    """A rich Table of epoch rows; columns are ``keys`` (default: the known keys present in any row)."""
    from rich.table import Table

    rows = list(rows)
    if keys is None:
        known = ("epoch", *LOSS_KEYS, *ACC_KEYS, "lr", "epoch_time_s", "images_per_s")
        keys = [k for k in known if any(k in r for r in rows)]
    table = Table(title=title)
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k), ".3g" if k == "lr" else ".4g" if "loss" in k else ".2f")
                        if k not in _INT_KEYS else str(r.get(k, "")) for k in keys])
    return table


def render_eval_report(console, classes: Sequence[str], metrics: dict, *, max_matrix_classes: int = 30,
                       top_confusions: int = 10) -> None:
    """Print per-class accuracy and the confusion matrix (or, for many classes, the top confusions).

    ``metrics`` is :meth:`ClassificationMeter.compute` output (``per_class_acc``, ``confusion``, ``top1``...).
    """
    from rich.table import Table

    confusion = metrics["confusion"]
    n = len(classes)
    totals = [sum(row) for row in confusion]
    per_class = Table(title=f"Per-class accuracy (top-1 {_fmt(metrics.get('top1'))}%, "
                            f"top-5 {_fmt(metrics.get('top5'))}%, {metrics.get('count', sum(totals))} images)")
    for name, justify in (("#", "right"), ("class", "left"), ("images", "right"), ("correct", "right"),
                          ("acc %", "right"), ("most confused with", "left")):
        per_class.add_column(name, justify=justify)
    for i, name in enumerate(classes):
        acc = metrics["per_class_acc"][i]
        off = [(confusion[i][j], j) for j in range(n) if j != i and confusion[i][j] > 0]
        worst = max(off, key=lambda t: t[0]) if off else None  # ties: the lower class index
        style = "" if acc is None or not math.isfinite(acc) else "green" if acc >= 90 else "red" if acc < 50 else ""
        per_class.add_row(str(i), name, str(totals[i]), str(confusion[i][i]), _fmt(acc, ".1f"),
                          f"{classes[worst[1]]} ({worst[0]})" if worst else "", style=style)
    console.print(per_class)
    if n <= max_matrix_classes:
        console.print(_matrix_table(classes, confusion))
    else:
        pairs = sorted(((confusion[i][j], i, j) for i in range(n) for j in range(n) if i != j and confusion[i][j]),
                       reverse=True)[:top_confusions]
        table = Table(title=f"Top {len(pairs)} confusions (true -> predicted)")
        for name in ("true", "predicted", "images"):
            table.add_column(name)
        for count, i, j in pairs:
            table.add_row(classes[i], classes[j], str(count))
        console.print(table)


def _matrix_table(classes: Sequence[str], confusion: Sequence[Sequence[int]]):
    from rich.table import Table

    table = Table(title="Confusion matrix (rows: true class, columns: predicted #)", padding=(0, 0))
    table.add_column("true \\ pred", justify="left", no_wrap=True)
    for j in range(len(classes)):
        table.add_column(str(j), justify="right", min_width=3)
    for i, name in enumerate(classes):
        cells = []
        for j, v in enumerate(confusion[i]):
            style = "bold green" if i == j and v else "red" if v else "dim"
            cells.append(f"[{style}]{v}[/]")
        table.add_row(f"{i} {name[:20]}", *cells)
    return table
