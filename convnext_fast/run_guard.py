"""What keeps a run directory sound across faults; called by the training loop at a few points.

- `claim_run_dir`: one run per ``--out`` (the lock of `convnext_fast.runlock`, rank 0 under DDP; every rank learns
  the outcome), taken after the preflight and before anything is written.
- `check_data`: ``--resume`` on a changed sample list refuses, naming what changed, unless allowed.
- `bad_files_log`: ``RUN_DIR/bad_files.txt`` for ``--skip-bad-files`` (preflight-found files are listed too).
- `saving`: a failed write during a save (a full disk) is one line naming the file and what is still intact.
- `repair_after_kill`: a ``kill -9`` between the writes of an epoch's save leaves ``last.pt`` newer than
  ``best.pt``/``model.safetensors``; the resume finishes those writes (and removes temp files the kill left).

The order of an epoch's writes (loop.py): metrics.jsonl row -> ``last.pt`` (atomic: temp + fsync + rename + dir
fsync) -> if improved, ``best.pt`` (a hard link of ``last.pt``) -> ``model.safetensors`` (atomic) -> ``per_class.json``
(the best epoch's per-class recall, for `runs compare`). ``last.pt`` is
the commit point: a resume rewrites metrics.jsonl from its rows and redoes the best/export step if it was cut.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from pathlib import Path
from typing import Iterator

from convnext_fast import checkpoint as ckpt_io
from convnext_fast.data.badfiles import read_log
from convnext_fast.distributed import DistInfo, all_gather_object, print0
from convnext_fast.errors import TrainingError
from convnext_fast.runlock import RunLock
from convnext_fast.runs.per_class import read_per_class, write_per_class


def refuse_finished(run_dir: Path, resume: bool) -> None:
    """A fresh run into a directory that already holds a checkpoint is an error (ValueError)."""
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise ValueError(f"--out {run_dir} already holds a run; continue it with --resume {run_dir} or choose "
                         f"another --out")


def num_bad(index) -> int:
    """Files of `index.samples` that the preflight found bad (kept in place with --skip-bad-files)."""
    return len(set(index.skipped) & {p for p, _ in index.samples}) if index.skipped else 0


_HELD: list[RunLock] = []  # the run directories this process holds (one per train() call)


def claim_run_dir(run_dir: Path, dist: DistInfo, resume: bool) -> RunLock | None:
    """The run directory's lock (rank 0; None on other ranks), held until `release_run_dirs`. Raises ValueError on
    every rank if it is held, or if a fresh run finds a finished checkpoint there (another run got there first)."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = RunLock(run_dir).acquire()
            try:
                refuse_finished(run_dir, resume)  # another run may have finished here while this one scanned
            except ValueError:
                lock.release()
                raise
        except ValueError as e:
            error = str(e)
    error = all_gather_object(error)[0]  # collective: every rank refuses together
    if error:
        raise ValueError(error)
    if lock is not None:
        _HELD.append(lock)
    return lock


def release_run_dirs() -> None:
    """Release the locks `claim_run_dir` took (the end of train(), however it ends)."""
    while _HELD:
        _HELD.pop().release()


def bad_files_log(run_dir: Path, train_index, skip_bad: bool, dist: DistInfo) -> Path | None:
    """``RUN_DIR/bad_files.txt`` when skipping bad files (None otherwise), with the train files the preflight
    found bad appended (they keep their positions; the loader replaces them)."""
    if not skip_bad:
        return None
    log = run_dir / "bad_files.txt"
    if dist.is_main and train_index.skipped:
        listed = read_log(log)
        in_train = {p for p, _ in train_index.samples}
        new = [p for p in train_index.skipped if p in in_train and p not in listed]
        if new:
            with open(log, "a", encoding="utf-8") as f:
                f.writelines(f"{p}\tfailed the preflight\n" for p in new)
    all_gather_object(None)  # the other ranks read the log after rank 0 wrote it
    return log


def fingerprints(train_index, val_index, log: Path | None) -> dict:
    bad = frozenset(read_log(log))
    return {"train": ckpt_io.data_fingerprint(train_index, bad), "val": ckpt_io.data_fingerprint(val_index, bad)}


def check_data(saved: dict | None, now: dict, train_index, val_index, run_dir: Path, allow: bool) -> None:
    """Refuse a resume whose train list differs from the checkpoint's (ValueError naming the changes), or warn
    when `allow`. A changed val list only warns: it changes what is measured, not what is trained (and a val file
    that went bad mid-run is dropped by the next preflight). A checkpoint from before fingerprints passes."""
    if not saved:
        return
    train = ckpt_io.fingerprint_changes(saved["train"], now["train"], [p for p, _ in train_index.samples])
    val = ckpt_io.fingerprint_changes(saved["val"], now["val"], [p for p, _ in val_index.samples])
    if val:
        print0(f"warning: the val images changed since the checkpoint ({'; '.join(val)}); metrics from here on are "
               f"measured on the new list", flush=True)
    if not train:
        return
    what = "; ".join(train)
    if not allow:
        raise ValueError(f"--resume {run_dir}: the training images changed since the checkpoint ({what}); an exact "
                         f"resume needs the same files. Pass --allow-data-change to continue on the new list anyway")
    print0(f"warning: --allow-data-change: the training images changed since the checkpoint ({what}); this is no "
           f"longer an exact resume", flush=True)


@contextlib.contextmanager
def saving(run_dir: Path) -> Iterator[None]:
    """Turn a failed write during a save into a TrainingError (one line): the file, the reason, what is intact."""

    try:
        yield
    except OSError as e:
        where = e.filename or run_dir
        full = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise TrainingError(
            f"cannot write {where}: {e.strerror or e}{full}. The previous checkpoint "
            f"{run_dir / 'checkpoints' / 'last.pt'} and {run_dir / 'model.safetensors'} are intact; free space and "
            f"continue with: convnext-fast train --resume {run_dir}") from None


def repair_after_kill(run_dir: Path, state, weights, meta: dict) -> None:
    """Rank 0 at resume: finish an epoch save that a kill cut between ``last.pt`` and the best-model writes, and
    remove temp files of writes a kill interrupted (the lock is held: no other writer is running)."""
    for tmp in list(run_dir.glob(".*.tmp*")) + list((run_dir / "checkpoints").glob(".*.tmp*")):
        tmp.unlink(missing_ok=True)
    if state.best_epoch != state.epoch or state.best_epoch == 0 or state.batch_in_epoch:
        return  # last.pt is not an improved epoch's end: its save had nothing more to write
    if state.best_eval and (read_per_class(run_dir) or {}).get("epoch") != state.epoch:  # the save's last write
        with saving(run_dir):
            _write_per_class(run_dir, state, meta, "ema" if meta["config"]["recipe"]["model_ema"] else "model")
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    export = run_dir / "model.safetensors"
    try:  # best.pt is a hard link of that last.pt (a copy where links are unsupported), written before the export
        linked = best.is_file() and (os.path.samefile(best, last)
                                     or ckpt_io.load_checkpoint(best)["loop"] == ckpt_io.load_checkpoint(last)["loop"])
    except ValueError:
        linked = False
    if linked and export.is_file() and export.stat().st_mtime_ns >= best.stat().st_mtime_ns:
        return
    with saving(run_dir):
        ckpt_io.atomic_link(run_dir / "checkpoints" / "last.pt", best)
        ckpt_io.export_safetensors(weights.state_dict(), export, {k: meta[k] for k in ckpt_io.META_KEYS})
    print0(f"resume: finished the best-model files of epoch {state.epoch} (the last save was cut short)", flush=True)


def save_checkpoint(run_dir: Path, name: str, engine, state, meta: dict, dist: DistInfo) -> Path:
    """Write checkpoints/<name> (rank 0; the RNG gather is collective, so every rank calls this)."""
    rng = ckpt_io.gather_rng_states()
    path = run_dir / "checkpoints" / name
    if dist.is_main:
        ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "meta": {k: v for k, v in meta.items() if k != "data"},
                             "data": meta.get("data"), "engine": engine.state_dict(),
                             "loop": dataclasses.asdict(state), "rng": rng}, path)
    return path


def save_epoch(run_dir: Path, engine, state, meta: dict, dist: DistInfo, reporter,
               row: dict, improved: bool) -> None:
    """An epoch's writes, in commit order (why this order survives a kill at any point: see
    the module docstring)."""
    with saving(run_dir):
        reporter.log_epoch(row)
        save_checkpoint(run_dir, "last.pt", engine, state, meta, dist)
        if improved and dist.is_main:
            ckpt_io.atomic_link(run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt")
            weights = engine.ema.module if engine.ema is not None else engine.model
            ckpt_io.export_safetensors(weights.state_dict(), run_dir / "model.safetensors",
                                       {k: meta[k] for k in ckpt_io.META_KEYS})
            _write_per_class(run_dir, state, meta, "ema" if engine.ema is not None else "model")


def _write_per_class(run_dir: Path, state, meta: dict, weights: str) -> None:
    write_per_class(run_dir, epoch=state.epoch, weights=weights, classes=meta["classes"],
                    per_class_acc=state.best_eval["per_class_acc"], confusion=state.best_eval.get("confusion"))
