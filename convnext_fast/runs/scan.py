"""A run directory read into one record: what `runs list` shows and `runs compare` (and `tune`) work from.

A run directory is a folder with config.json (written by the loop before the first epoch). Its files say:

    config.json      the resolved config (data, model, schedule, epochs planned)
    metrics.jsonl    one row per finished epoch (best top-1, curves, wall time of an unfinished run)
    summary.json     written at the end of a finished run (wall time, stopped early)
    status.json      how the last session ended (`convnext_fast.runs.status`; runs from before it: guessed below)
    per_class.json   the best epoch's per-class recall (`convnext_fast.runs.per_class`)
    .lock            held (flock) while a process trains into the directory: such a run is ``running``

States: ``running``, ``finished``, ``stopped early``, ``stopped`` (a sink or callback asked: resumable), ``interrupted``, ``failed``. Nothing here writes or locks.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from convnext_fast.runs.per_class import read_per_class
from convnext_fast.runs.status import read_status

STATES = ("running", "finished", "stopped early", "stopped", "interrupted", "failed")
_MAX_DEPTH = 3  # runs/<study>/<trial>/: how deep a folder is searched for run directories


@dataclass
class RunRecord:
    """One run directory, read. ``best_top1`` is the selected weights' (EMA when on), as the loop selects them."""

    path: Path
    state: str
    detail: str = ""
    started: str | None = None  # ISO 8601, UTC
    data: str | None = None
    model: str | None = None
    schedule: str | None = None  # training sizes, e.g. "128->192px"
    epochs_run: int = 0
    epochs_planned: int | None = None
    best_top1: float | None = None
    best_epoch: int | None = None
    best_key: str = "val_top1"  # the metrics.jsonl key best_top1 comes from (ema_val_top1 with EMA)
    final_top1: float | None = None
    wall_time_s: float | None = None
    config: dict = field(default_factory=dict, repr=False)
    rows: list = field(default_factory=list, repr=False)
    summary: dict | None = field(default=None, repr=False)
    per_class: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def curve(self) -> list[tuple[int, float]]:
        """(epoch, val top-1 of the selected weights) per epoch with a finite value: what a learning curve draws."""
        return [(int(r.get("epoch", i + 1)), float(r[self.best_key])) for i, r in enumerate(self.rows)
                if _finite(r.get(self.best_key))]

    def to_dict(self, full: bool = False) -> dict:
        """JSON-able; ``full`` adds the config, rows, summary and per-class recall."""
        heavy = ("config", "rows", "summary", "per_class")
        out = {k: v for k, v in dataclasses.asdict(self).items() if full or k not in heavy}
        out["path"], out["name"] = str(self.path), self.name
        return out


def scan_runs(paths: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """Every run directory at or under ``paths`` (a run directory, or a folder of runs such as ``runs/`` or a tune
    study, searched 3 levels deep), read; in path order. A path that does not exist is a ValueError."""
    return [read_run(d) for d in find_run_dirs(paths)]


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ValueError(f"{p}: no such directory")
        found += _walk(p, 0)
    return list(dict.fromkeys(found))


def _walk(d: Path, depth: int) -> list[Path]:
    if (d / "config.json").is_file():
        return [d]  # a run: its subfolders (plots/, checkpoints/, tb/) are not runs
    if depth >= _MAX_DEPTH:
        return []
    try:
        children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return []
    return [r for c in children for r in _walk(c, depth + 1)]


def read_run(path: str | os.PathLike) -> RunRecord:
    """The record of one run directory (ValueError when it has no config.json)."""
    from convnext_fast.run_files import read_jsonl

    path = Path(path)
    config = _json(path / "config.json")
    if config is None:
        raise ValueError(f"{path}: not a run directory (no readable config.json)")
    try:
        rows = read_jsonl(path / "metrics.jsonl")
    except ValueError:  # a torn line in the middle: show the run, say why its rows are missing
        rows = []
    summary = _json(path / "summary.json")
    state, detail = run_state(path, summary)
    rec = RunRecord(path=path, state=state, detail=detail, config=config, rows=rows, summary=summary,
                    per_class=read_per_class(path))
    data, run = config.get("data", {}), config.get("run", {})
    rec.data = data.get("path") or "demo"
    rec.model = config.get("model", {}).get("name")
    rec.schedule = _schedule(config)
    rec.epochs_run, rec.epochs_planned = len(rows), run.get("epochs")
    rec.best_key = "ema_val_top1" if any("ema_val_top1" in r for r in rows) else "val_top1"
    scored = [(r[rec.best_key], r.get("epoch", i + 1)) for i, r in enumerate(rows) if _finite(r.get(rec.best_key))]
    if scored:
        rec.best_top1, rec.best_epoch = max(scored, key=lambda t: t[0])  # the first epoch among equals, as the loop
        rec.final_top1 = scored[-1][0]
    if summary and state in ("finished", "stopped early", "stopped") and _finite(summary.get("wall_time_s")):
        rec.wall_time_s = float(summary["wall_time_s"])
    elif rows:
        rec.wall_time_s = sum(r.get("epoch_time_s") or 0.0 for r in rows)
    rec.started = read_status(path).get("started") or _mtime_iso(path / "config.json")
    return rec


def run_state(path: Path, summary: dict | None = None) -> tuple[str, str]:
    """(state, detail) of a run directory; see the module docstring."""
    if lock_held(path):
        return "running", f"pid {_lock_pid(path) or '?'} holds {path / '.lock'}"
    status = read_status(path)
    state = status.get("state")
    if state in ("finished", "stopped_early", "stopped", "interrupted", "failed"):
        return state.replace("_", " "), status.get("detail") or ""
    if state == "running":  # the last session started and nobody holds the lock: it died without a word
        return "failed", "the process ended without recording why (killed? out of memory?)" + _resumable(path)
    # A run from before status.json: summary.json marks the end; without it, a checkpoint means stopped mid-way.
    summary = summary if summary is not None else _json(path / "summary.json")
    if summary:
        return ("stopped early" if summary.get("stopped_early") else "finished"), ""
    if (path / "checkpoints" / "last.pt").is_file():
        return "interrupted", "no summary.json" + _resumable(path)
    return "failed", "no epoch was saved"


def _resumable(path: Path) -> str:
    return f"; continue with --resume {path}" if (path / "checkpoints" / "last.pt").is_file() else ""


def lock_held(run_dir: Path) -> bool:
    """Whether a process holds RUN_DIR/.lock (`convnext_fast.runlock`), asked without taking the lock: a reader
    that took it, even briefly, could make a run starting at that moment refuse its own directory. Linux lists
    flock holders in /proc/locks; elsewhere the pid written into the file is checked for being alive."""
    lock = Path(run_dir) / ".lock"
    try:
        st = lock.stat()
    except OSError:
        return False
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        pid = _lock_pid(run_dir)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF": holder pid, major:minor (hex) and inode of the locked file.
    # On overlay filesystems the device listed can be the upper layer's: then the inode and the holder's pid match.
    want, pid = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", str(_lock_pid(run_dir))
    for f in map(str.split, text.splitlines()):
        if len(f) > 5 and f[1] == "FLOCK" and (f[5] == want or (f[5].endswith(f":{st.st_ino}") and f[4] == pid)):
            return True
    return False


def _lock_pid(run_dir: Path) -> int | None:
    try:
        return int((Path(run_dir) / ".lock").read_text().strip())
    except (OSError, ValueError):
        return None


def _schedule(config: dict) -> str | None:
    resolved = config.get("resolved", {})
    sizes = (resolved.get("schedule") or {}).get("sizes") or [config.get("data", {}).get("img_size")]
    sizes = [s for s in sizes if s is not None]
    if not sizes:
        return None
    text = "->".join(str(s) for s in sizes) + "px"
    ev = resolved.get("eval_img_size")
    return text + (f" (eval {ev})" if ev is not None and ev != sizes[-1] else "")


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mtime_iso(path: Path) -> str | None:
    try:
        t = path.stat().st_mtime
    except OSError:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
