"""What differs between runs: config keys, best and final metrics, per-class recall. Pure data (no printing,
no HTML): the terminal tables and the page are two views of one :class:`Comparison` (DESIGN §6)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from convnext_fast.runs.scan import RunRecord

# Keys that name where a run is kept or sent, not how it trains: they differ between any two runs.
_NOT_COMPARED = ("run.out", "run.name", "run.tensorboard", "run.mlflow", "run.mlflow_model", "run.wandb",
                 "resolved.schedule.per_epoch")  # per_epoch repeats data.img_size/progressive/ramp, epoch by epoch

# (label, how to get it from a record, format); None values print as "-".
_METRICS: list[tuple[str, Any, str]] = [
    ("state", lambda r: r.state, "s"),
    ("epochs run / planned", lambda r: f"{r.epochs_run} / {r.epochs_planned or '?'}", "s"),
    ("best top-1 % (selected weights)", lambda r: r.best_top1, ".2f"),
    ("best epoch", lambda r: r.best_epoch, "d"),
    ("best val top-1 % (model)", lambda r: _best(r.rows, "val_top1"), ".2f"),
    ("best EMA val top-1 %", lambda r: _best(r.rows, "ema_val_top1"), ".2f"),
    ("final val top-1 %", lambda r: _last(r.rows, "val_top1"), ".2f"),
    ("final val top-5 %", lambda r: _last(r.rows, "val_top5"), ".2f"),
    ("final val loss", lambda r: _last(r.rows, "val_loss"), ".4f"),
    ("final train loss", lambda r: _last(r.rows, "train_loss"), ".4f"),
    ("wall time", lambda r: duration(r.wall_time_s), "s"),
    ("train images/s", lambda r: _mean(r.rows, "img_per_sec"), ".0f"),
]


@dataclass
class ClassRow:
    name: str
    recall: list  # % per run (None: not measured / no images)
    support: list  # validation images per run
    change: float | None  # last - first run (two runs), max - min (more): what the rows are sorted by


@dataclass
class Comparison:
    runs: list[RunRecord]
    labels: list[str]  # short unique names of the runs, in order
    config_diff: list[tuple[str, list[str]]]  # dotted key -> its value in each run (only keys that differ)
    metrics: list[tuple[str, list[str], int | None]]  # label -> formatted values, index of the best (or None)
    classes: list[ClassRow] = field(default_factory=list)  # largest change first
    change_label: str = "change"
    notes: list[str] = field(default_factory=list)  # plain statements: other classes, other data, missing files


def compare_runs(runs: Sequence[RunRecord]) -> Comparison:
    """Compare two or more runs (ValueError with fewer)."""
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError(f"runs compare needs at least two runs, got {len(runs)}")
    labels = short_labels([r.path for r in runs])
    cmp = Comparison(runs=runs, labels=labels, config_diff=config_diff([r.config for r in runs]),
                     metrics=_metric_rows(runs), change_label="change" if len(runs) == 2 else "spread (max - min)")
    cmp.notes += _data_notes(runs, labels)
    cmp.classes, notes = _class_rows(runs, labels)
    cmp.notes += notes
    return cmp


def short_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``a/trial-1`` and ``b/trial-1`` stay two names)."""
    parts = [Path(p).resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same directory twice


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(configs: Sequence[dict]) -> list[tuple[str, list[str]]]:
    """Dotted keys whose values differ between the configs (a key one config lacks counts as differing)."""
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f} - set(_NOT_COMPARED))
    missing = object()
    out = []
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if len({json.dumps(v, sort_keys=True, default=str) if v is not missing else "\0" for v in values}) > 1:
            out.append((k, ["(absent)" if v is missing else _show(v) for v in values]))
    return out


def _show(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _metric_rows(runs: Sequence[RunRecord]) -> list[tuple[str, list[str], int | None]]:
    out = []
    for label, get, spec in _METRICS:
        values = [get(r) for r in runs]
        if all(v is None for v in values):
            continue
        best = None
        if "top-1" in label or "top-5" in label or "loss" in label:
            nums = [(v, i) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
            if len(nums) > 1 and len({v for v, _ in nums}) > 1:
                best = (min if "loss" in label else max)(nums)[1]
        out.append((label, [_fmt(v, spec) for v in values], best))
    return out


def duration(s: float | None) -> str | None:
    """``1h05m``, ``4m09s``; None for no time."""
    if s is None or not math.isfinite(s):
        return None
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if spec != "s" else str(v)


def _data_notes(runs: Sequence[RunRecord], labels: Sequence[str]) -> list[str]:
    def what(r: RunRecord) -> tuple:
        res = r.config.get("resolved", {})
        return (r.data, res.get("num_train"), res.get("num_val"))

    seen = [what(r) for r in runs]
    if len(set(seen)) == 1:
        return []
    each = "; ".join(f"{lab}: {d} ({n if n is not None else '?'} train / {v if v is not None else '?'} val images)"
                     for lab, (d, n, v) in zip(labels, seen))
    return [f"The runs were trained on different data, so their numbers are not measured on the same images: {each}."]


def _class_rows(runs: Sequence[RunRecord], labels: Sequence[str]) -> tuple[list[ClassRow], list[str]]:
    notes = []
    have = [(r, lab) for r, lab in zip(runs, labels) if r.per_class]
    lacking = [lab for r, lab in zip(runs, labels) if not r.per_class]
    if lacking:
        notes.append(f"No per-class recall saved for {', '.join(lacking)} (no finished epoch, or a run from before "
                     f"per_class.json).")
    if len(have) < 2:
        return [], notes
    class_lists = [r.per_class["classes"] for r in runs if r.per_class]
    common = [c for c in class_lists[0] if all(c in cl for cl in class_lists[1:])]
    if any(cl != class_lists[0] for cl in class_lists[1:]):
        only = {lab: sorted(set(r.per_class["classes"]) - set(common)) for r, lab in have}
        extra = "; ".join(f"only in {lab}: {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
                          for lab, v in only.items() if v)
        notes.append(f"The runs have different classes: per-class recall is compared over the {len(common)} classes "
                     f"they share{'; ' + extra if extra else ''}.")
    lookups = [_by_class(r.per_class) if r.per_class else {} for r in runs]
    rows = []
    for c in common:
        recall = [lk[c][0] if c in lk else None for lk in lookups]
        support = [lk[c][1] if c in lk else None for lk in lookups]
        nums = [v for v in recall if v is not None]
        change = None
        if len(nums) >= 2:
            change = (recall[-1] - recall[0]) if len(runs) == 2 else max(nums) - min(nums)
        rows.append(ClassRow(c, recall, support, change))
    rows.sort(key=lambda row: -abs(row.change) if row.change is not None else math.inf)
    return rows, notes


def _by_class(per_class: dict) -> dict[str, tuple]:
    """class -> (recall %, images) of a per_class.json."""
    support = per_class.get("support") or [None] * len(per_class["classes"])
    return dict(zip(per_class["classes"], zip(per_class["recall"], support)))


def _best(rows: list, key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return max(vals) if vals else None


def _last(rows: list, key: str) -> float | None:
    return rows[-1].get(key) if rows else None


def _mean(rows: list, key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None
