"""`convnext-fast train`: one readable training loop (nanoGPT style), DDP-aware.

    setup:  process group -> seeds -> image index -> loaders -> engine (model, AdamW, Mixup, EMA, compile)
            -> LR schedule -> run directory (config.json, classes.json) -> resume from checkpoints/last.pt
    loop:   for each epoch: set_epoch, for each batch: lr, train_step, accumulate the loss on the device;
            every `log_every` steps one sync: progress, non-finite check, stop request;
            then evaluate (+EMA, +flip TTA), metrics.jsonl row, checkpoints, model.safetensors, early stopping
    end:    plots, summary.json, epoch table

Host syncs are marked `# SYNC`: one every `log_every` steps and a few per epoch, none inside a step.
Rank 0 alone prints and writes files. Exact resume: the batches of an epoch are a pure function of
(seed, epoch, shard), the checkpoint holds every RNG (per rank), the optimizer, EMA and Mixup counter; a
mid-epoch checkpoint (Ctrl-C / SIGTERM) replays the epoch's loader up to where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from convnext_fast import checkpoint as ckpt_io
from convnext_fast import run_guard
from convnext_fast.backends import set_backends
from convnext_fast.config import TrainConfig
from convnext_fast.data import build_loader
from convnext_fast.data.splits import resolve_train_val
from convnext_fast.distributed import (DistInfo, all_gather_object, all_reduce_sum, destroy_distributed,
                                      init_distributed, replica_digests)
from convnext_fast.engine import Engine, build_engine
from convnext_fast.errors import Interrupted, TrainingError
from convnext_fast.evaluate import evaluate
from convnext_fast.model import check_model_name
from convnext_fast.optim import WarmupCosine
from convnext_fast.progress import TrainProgress, describe_run
from convnext_fast.run_files import RunReporter, atomic_write_text, epoch_table, to_jsonable
from convnext_fast.runs.status import StatusSink
from convnext_fast.schedule import ResolutionSchedule, check_model_sizes, check_resume
from convnext_fast.sinks import Callback, Sinks
from convnext_fast.stopping import StopRequest
from convnext_fast.trackers import build_trackers


@dataclass
class LoopState:
    """The loop's own resume state (plain types only; saved in every checkpoint)."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of epoch `epoch` already trained (a mid-epoch checkpoint)
    partial: dict = field(default_factory=dict)  # that epoch's running sums: loss_sum, images, data_wait_s, train_s
    best_top1: float = -math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    stopped_early: bool = False
    stopped_by: str = ""  # why an epoch sink/callback stopped the run before its last epoch ("" = it did not)
    wall_time_s: float = 0.0  # over all sessions of this run
    rows: list = field(default_factory=list)  # the metrics.jsonl rows so far
    best_eval: dict = field(default_factory=dict)  # per_class_acc and confusion of the best epoch


def default_run_dir(name: str | None) -> Path:
    return Path("runs") / (name or time.strftime("%Y%m%d-%H%M%S"))


def _seed_everything(seed: int, rank: int) -> None:
    # Per-rank streams (drop path, host augmentation) so ranks do not draw identical noise; the initial weights
    # are seeded separately in build_engine and are identical on every rank.
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def _write_rows(run_dir: Path, rows: list) -> None:
    atomic_write_text(run_dir / "metrics.jsonl",
                      "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in rows))


@dataclass
class _Run:
    """Everything the loop works with, built by :func:`_setup`."""

    cfg: TrainConfig
    dist: DistInfo
    run_dir: Path
    train_loader: Any
    val_loader: Any
    engine: Engine
    sched: WarmupCosine
    lr: float
    meta: dict
    state: LoopState
    reporter: RunReporter
    progress: TrainProgress
    schedule: ResolutionSchedule
    sinks: Sinks


def train(cfg: TrainConfig, *, resume: bool = False, tty: bool | None = None,
          report: Callable[[dict], Any] | None = None, sinks: Sequence[Any] = (), budget: dict | None = None) -> dict:
    """Train with ``cfg`` (run directory ``cfg.run.out``); ``resume`` continues from its checkpoints/last.pt.

    ``report(row)`` is called on rank 0 with each epoch's metrics.jsonl row once it is saved; returning True stops
    the run at that epoch boundary: the checkpoint is kept and the run ends normally, its summary's
    ``stopped_by`` saying why (``resume=True`` later finishes the same schedule). ``sinks``: more receivers of the
    same rows (see `convnext_fast.sinks`); a sink stops the run the same way. ``budget``: the time limit's plan
    (`convnext_fast.budget`), recorded as config.json's "budget". Returns the summary dict (also written to
    summary.json). Raises ValueError for bad input, TrainingError for a non-finite loss, Interrupted after saving
    a checkpoint on SIGINT/SIGTERM.
    """
    t_start = time.perf_counter()
    dist = init_distributed(cfg.run.device)
    stop = StopRequest()
    stop.install()
    run = None
    # status.json first (trackers upload it at the end), then the trackers the config asks for, then the caller's
    extra = [StatusSink(), *build_trackers(cfg.run), *sinks, *([Callback(report)] if report is not None else [])]
    try:
        run = _setup(cfg, dist, resume, tty, extra, budget)
        try:
            summary = _train(run, stop, t_start)
        except Interrupted:
            run.sinks.end("interrupted", None)
            raise
        except BaseException:
            run.sinks.end("failed", None)
            raise
        run.sinks.end("stopped" if summary["stopped_by"] else "stopped_early" if summary["stopped_early"]
                      else "finished", summary)
        return summary
    finally:
        stop.restore()
        if run is not None:
            run.progress.close()
            run.train_loader.close()
            run.val_loader.close()
        run_guard.release_run_dirs()
        destroy_distributed()


def _resolution(cfg: TrainConfig) -> tuple[ResolutionSchedule, int]:
    """The training sizes per epoch and the evaluation size, checked against the model; equal on every rank."""
    d = cfg.data
    schedule, eval_size = cfg.resolution_schedule(), d.eval_img_size or d.img_size
    check_model_sizes(schedule, cfg.model.name, "--progressive" if schedule.progressive else "--img-size")
    check_model_sizes(ResolutionSchedule(eval_size, 1), cfg.model.name, "--eval-img-size")
    if len({tuple(p) for p in all_gather_object(schedule.per_epoch)}) > 1:  # a pure function of the config
        raise ValueError("the ranks were given different resolution schedules (differing configs?)")
    return schedule, eval_size


def _setup(cfg: TrainConfig, dist: DistInfo, resume: bool, tty: bool | None, sinks: Sequence[Any] = (),
           budget: dict | None = None) -> _Run:
    """Seeds, data, loaders, engine, LR schedule, run directory; the state of ``last.pt`` when resuming."""
    _seed_everything(cfg.run.seed, dist.rank)
    set_backends(deterministic=cfg.run.deterministic)  # the policy eval and the benchmark run under too
    run_dir = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg.run.name)
    run_dir = Path(all_gather_object(str(run_dir))[0])  # rank 0's name: the timestamps of ranks may differ
    run_guard.refuse_finished(run_dir, resume)  # early; checked again under the lock
    check_model_name(cfg.model.name)  # fail before scanning a large dataset
    d = cfg.data
    schedule, eval_size = _resolution(cfg)
    # --skip-bad-files: train keeps bad files in place (replaced by the loader): positions don't depend on them.
    train_index, val_index = resolve_train_val(cfg.data, seed=cfg.run.seed, keep_bad_train=cfg.data.skip_bad)
    run_guard.claim_run_dir(run_dir, dist, resume)  # after the preflight (a bad file writes nothing); train() frees it
    log = run_guard.bad_files_log(run_dir, train_index, cfg.data.skip_bad, dist)
    classes, dev = train_index.classes, dist.device
    common = dict(backend=d.loader, device=dev, seed=cfg.run.seed, shard_id=dist.rank,
                  num_shards=dist.world_size, num_workers=d.num_workers, crop_pct=d.crop_pct, cache=d.cache,
                  cache_size=d.cache_size, skip_bad=d.skip_bad, bad_files_log=log)
    train_loader = build_loader(train_index, train=True, img_size=d.img_size, batch_size=d.batch_size, scale=d.scale,
                                hflip=d.hflip, randaugment=d.randaugment, reprob=d.reprob,
                                schedule=schedule if schedule.progressive else None, **common)
    val_loader = build_loader(val_index, train=False, img_size=eval_size,
                              batch_size=d.eval_batch_size or 2 * d.batch_size, **common)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"--batch-size {d.batch_size} x {dist.world_size} process(es) is larger than the "
                         f"{len(train_index)} training images")
    lr = cfg.optim.resolved_lr(d.batch_size * dist.world_size)
    if cfg.optim.min_lr > lr:
        raise ValueError(f"--min-lr {cfg.optim.min_lr:g} is above the peak lr {lr:g}")
    engine = build_engine(cfg.model.name, len(classes), device=dev, speed=cfg.speed, recipe=cfg.recipe,
                          optim=cfg.optim, lr=lr, drop_path=cfg.model.drop_path, seed=cfg.run.seed, rank=dist.rank,
                          world_size=dist.world_size, num_sizes=len(schedule.sizes))
    total_steps = cfg.run.epochs * steps
    sched = WarmupCosine(engine.optimizer, base_lr=lr, min_lr=cfg.optim.min_lr, total_steps=total_steps,
                         warmup_steps=min(round(cfg.optim.warmup_epochs * steps), total_steps))
    # img_size: the evaluation size (what `convnext-fast eval` uses by default to reproduce the run's accuracy).
    meta = {"model_name": cfg.model.name, "num_classes": len(classes), "classes": classes, "img_size": eval_size,
            "crop_pct": d.crop_pct, "config": cfg.to_dict(), "schedule": schedule.to_dict(),
            "data": run_guard.fingerprints(train_index, val_index, log)}
    state = LoopState()
    if resume:
        # On the host: load_state_dict copies weights and optimizer state to the device; RNG states stay host-side.
        ckpt = ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location="cpu")
        if ckpt["meta"]["classes"] != classes:
            raise ValueError(f"--resume {run_dir}: the checkpoint's classes differ from DATA's classes")
        if len(ckpt["rng"]) != dist.world_size:  # the shards, global batch and lr would all change
            raise ValueError(f"--resume {run_dir}: the checkpoint was saved by {len(ckpt['rng'])} process(es) and "
                             f"this job has {dist.world_size}; resume with the same number of processes")
        loop = ckpt["loop"]
        check_resume(ckpt["meta"].get("schedule"), schedule, loop["epoch"] + bool(loop["batch_in_epoch"]), run_dir)
        run_guard.check_data(ckpt.get("data"), meta["data"], train_index, val_index, run_dir,
                             cfg.run.allow_data_change)
        engine.load_state_dict(ckpt["engine"])
        state = LoopState(**loop)
        state.stopped_by = ""  # a resumed run goes on to its last epoch
        ckpt_io.set_rng_state(ckpt["rng"][dist.rank])
        if dist.is_main:
            run_guard.repair_after_kill(run_dir, state, engine.ema.module if engine.ema is not None else engine.model,
                                        meta)
    progress = TrainProgress(enabled=dist.is_main, epochs=cfg.run.epochs, tty=tty)
    run = _Run(cfg=cfg, dist=dist, run_dir=run_dir, train_loader=train_loader, val_loader=val_loader, engine=engine,
               sched=sched, lr=lr, meta=meta, state=state, reporter=RunReporter(run_dir, classes, is_main=dist.is_main),
               progress=progress, schedule=schedule, sinks=Sinks(sinks, enabled=dist.is_main, warn=progress.log))
    if dist.is_main:
        resolved = {"lr": lr, "global_batch": d.batch_size * dist.world_size, "world_size": dist.world_size,
                    "steps_per_epoch": steps, "device": str(dev), "speed": dataclasses.asdict(engine.speed),
                    "train_root": str(train_index.root), "val_root": str(val_index.root),
                    "num_train": len(train_index) - run_guard.num_bad(train_index), "num_val": len(val_index),
                    "schedule": schedule.to_dict(), "eval_img_size": eval_size}
        config = {**cfg.to_dict(), "resolved": resolved, **({"budget": budget} if budget else {})}
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
        atomic_write_text(run_dir / "classes.json", json.dumps(classes, indent=2))
        _write_rows(run_dir, state.rows)  # a resumed run drops rows logged after its checkpoint
        run.progress.log(describe_run(cfg, engine, dist, len(train_index), len(val_index), classes, steps, lr,
                                      data_root=str(train_index.root)))
        run.progress.log(f"resolution: train {schedule.describe()} | eval {eval_size}px")
        if resume:
            run.progress.log(f"resuming {run_dir} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}")
        run.sinks.start(run_dir, config, resume)
    return run


def _train(run: _Run, stop: StopRequest, t_start: float) -> dict:
    cfg, dist, run_dir, engine, sched, state, meta = run.cfg, run.dist, run.run_dir, run.engine, run.sched, \
        run.state, run.meta
    train_loader, val_loader, reporter, progress = run.train_loader, run.val_loader, run.reporter, run.progress
    classes, dev, steps = meta["classes"], dist.device, len(run.train_loader)
    # ---------------------------------------------------------------------------------------------------------
    # The loop.
    # ---------------------------------------------------------------------------------------------------------
    world, log_every, lr_now = dist.world_size, cfg.run.log_every, sched.lr_at(engine.step)
    warned = False  # the recompile warning is given once
    for epoch in range(state.epoch, cfg.run.epochs):
        if state.stopped_early:
            break
        train_loader.set_epoch(epoch)  # the loader reads this epoch's size from the schedule
        img_size = run.schedule.size(epoch)
        if epoch > 0 and img_size != run.schedule.size(epoch - 1):
            progress.log(f"epoch {epoch + 1}: training size {run.schedule.size(epoch - 1)} -> {img_size} px")
        engine.model.train()
        skip, part = state.batch_in_epoch, state.partial or {}
        loss_sum = torch.full((), part.get("loss_sum", 0.0), dtype=torch.float64, device=dev)
        window_sum = torch.zeros((), dtype=torch.float64, device=dev)
        bad_step = torch.full((), -1, dtype=torch.int64, device=dev)  # first optimizer step with a non-finite loss
        images_seen, window_n = part.get("images", 0), 0
        data_wait, train_before = part.get("data_wait_s", 0.0), part.get("train_s", 0.0)
        progress.start_epoch(epoch, steps, done=skip)
        t_epoch = t_train = t_wait = time.perf_counter()
        i = -1
        # A plain `for` over the loader: the epoch ends when the loader says so (it finishes its own iteration).
        for i, (images, labels) in enumerate(train_loader):
            if i < skip:  # resuming mid-epoch: replay the epoch's loader up to where the checkpoint was taken
                t_train = t_wait = time.perf_counter()
                continue
            data_wait += time.perf_counter() - t_wait  # host time blocked on the loader
            lr_now = sched.step(engine.step)
            loss = engine.train_step(images, labels)
            loss_sum += loss
            window_sum += loss
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), engine.step, bad_step)
            images_seen += images.shape[0]
            window_n += 1
            progress.advance()
            local_stop = stop.signum != 0 and world == 1  # single process: stop right after this step
            if (i + 1) % log_every == 0 or i + 1 == steps or local_stop:
                # SYNC (every log_every steps): losses, the non-finite flag and stop requests, summed over ranks.
                flags = torch.stack([loss_sum, window_sum, (bad_step >= 0).double(),
                                     torch.full((), float(stop.signum), dtype=torch.float64, device=dev)])
                total, window, n_bad, signum = all_reduce_sum(flags).tolist()
                if n_bad > 0:
                    where = int(bad_step.item())  # SYNC (only on the way out)
                    step_txt = f"at step {where}" if where >= 0 else f"on another rank by step {engine.step}"
                    raise TrainingError(f"non-finite loss {step_txt} (epoch {epoch + 1}); stopped. The last good "
                                        f"checkpoint is {run_dir / 'checkpoints' / 'last.pt'}")
                train_s = train_before + time.perf_counter() - t_train
                progress.update(step_in_epoch=i + 1, loss=window / (window_n * world), lr=lr_now,
                                img_per_sec=images_seen * world / max(train_s, 1e-9), elapsed_s=train_s,
                                steps_timed=i + 1 - skip)
                window_sum.zero_()
                window_n = 0
                if signum and i + 1 < steps:
                    state.batch_in_epoch = i + 1
                    state.partial = {"loss_sum": total / world, "images": images_seen, "data_wait_s": data_wait,
                                     "train_s": train_s}
                    state.wall_time_s += time.perf_counter() - t_start
                    raise _interrupted(run_dir, engine, state, meta, dist, stop, progress)
            t_wait = time.perf_counter()
        assert i + 1 == steps, f"the train loader yielded {i + 1} batches, its len() is {steps}"
        train_s = train_before + time.perf_counter() - t_train
        train_loss = total / (world * steps)

        tta = cfg.recipe.tta
        forwards = {"model": functools.partial(engine.eval_logits, tta=tta)}
        if engine.ema is not None:
            forwards["ema"] = functools.partial(engine.eval_logits, tta=tta, use_ema=True)
        results = evaluate(forwards, val_loader, num_classes=len(classes), device=dev)  # SYNC (once per model)
        row = {"epoch": epoch + 1, "step": engine.step, "img_size": img_size, "lr": lr_now, "train_loss": train_loss,
               "val_loss": results["model"]["loss"], "val_top1": results["model"]["top1"],
               "val_top5": results["model"]["top5"]}
        if "ema" in results:
            row.update(ema_val_loss=results["ema"]["loss"], ema_val_top1=results["ema"]["top1"],
                       ema_val_top5=results["ema"]["top5"])
        row.update(img_per_sec=images_seen * world / max(train_s, 1e-9), epoch_time_s=time.perf_counter() - t_epoch,
                   data_wait_pct=100.0 * data_wait / max(train_s, 1e-9), world_size=world,
                   eval_img_size=meta["img_size"])
        warning = None if warned else run.schedule.recompile_warning(engine.compiled_graphs, epoch)
        if warning:
            progress.log(warning)
            warned = True
        # The exported and early-stopping model: the EMA when it is on (what model.safetensors holds).
        selected = results["ema" if "ema" in results else "model"]
        improved = selected["top1"] > state.best_top1  # NaN never improves
        state.rows.append(row)
        state.epoch, state.batch_in_epoch, state.partial = epoch + 1, 0, {}
        if improved:
            state.best_top1, state.best_epoch, state.epochs_since_best = selected["top1"], epoch + 1, 0
            state.best_eval = {"per_class_acc": selected["per_class_acc"], "confusion": selected["confusion"]}
        else:
            state.epochs_since_best += 1
        patience = cfg.run.patience
        state.stopped_early = (patience is not None and state.epochs_since_best >= patience
                               and epoch + 1 < cfg.run.epochs)
        state.wall_time_s += time.perf_counter() - t_start
        t_start = time.perf_counter()
        run_guard.save_epoch(run_dir, engine, state, meta, dist, reporter, row, improved)
        asked = run.sinks.epoch(row)  # rank 0 only; the all-reduce below tells every rank
        progress.end_epoch(row)
        if state.stopped_early:
            progress.log(f"early stopping: no better val top-1 for {patience} epochs "
                         f"(best {state.best_top1:.2f}% at epoch {state.best_epoch})")
        # SYNC (once per epoch): a signal that arrived during evaluation, or a sink's stop, agreed by every rank.
        signum, asked_any = all_reduce_sum(torch.tensor([float(stop.signum), float(bool(asked))], device=dev)).tolist()
        if signum and epoch + 1 < cfg.run.epochs:
            raise _interrupted(run_dir, engine, state, meta, dist, stop, progress, saved=True)
        if asked_any and epoch + 1 < cfg.run.epochs:  # the checkpoint of this epoch is saved: resumable
            state.stopped_by = asked or "asked by an epoch sink on rank 0"
            progress.log(f"stopping at the end of epoch {epoch + 1} of {cfg.run.epochs}: {state.stopped_by}; "
                         f"convnext-fast train --resume {run_dir} finishes the schedule")
            break
    progress.close()
    return _finish(cfg, run_dir, state, reporter, progress, dist, engine, run.lr)


def _interrupted(run_dir: Path, engine: Engine, state: LoopState, meta: dict, dist: DistInfo, stop: StopRequest,
                 progress: TrainProgress, saved: bool = False) -> Interrupted:
    progress.close()
    with run_guard.saving(run_dir):
        path = run_dir / "checkpoints" / "last.pt" if saved else \
            run_guard.save_checkpoint(run_dir, "last.pt", engine, state, meta, dist)
    signum = stop.signum or signal.SIGINT
    where = f"epoch {state.epoch + 1}, batch {state.batch_in_epoch}" if state.batch_in_epoch else \
        f"the end of epoch {state.epoch}"
    why = signal.Signals(signum).name
    return Interrupted(int(signum), f"interrupted ({why}) at {where}; checkpoint saved to "
                                    f"{path}; continue with: convnext-fast train --resume {run_dir}")


def _finish(cfg: TrainConfig, run_dir: Path, state: LoopState, reporter: RunReporter, progress: TrainProgress,
            dist: DistInfo, engine: Engine, lr: float) -> dict:
    rows = state.rows
    speeds = [r["img_per_sec"] for r in rows if r.get("img_per_sec")]
    summary = {
        "best_top1": state.best_top1 if math.isfinite(state.best_top1) else None,
        "best_epoch": state.best_epoch, "epochs_run": len(rows), "epochs": cfg.run.epochs,
        "stopped_early": state.stopped_early, "stopped_by": state.stopped_by or None, "wall_time_s": state.wall_time_s,
        "img_per_sec": sum(speeds) / len(speeds) if speeds else None,
        "selected_weights": "ema" if engine.ema is not None else "model", "tta": cfg.recipe.tta,
        "final_val_top1": rows[-1]["val_top1"] if rows else None, "model": cfg.model.name,
        "world_size": dist.world_size, "global_batch": cfg.data.batch_size * dist.world_size, "lr": lr,
        "device": str(engine.device), "run_dir": str(run_dir),
    }
    # Every rank's digest of its weights (collective): DDP keeps replicas equal only if every rank applied the
    # same updates from the same start, so equal digests are the end-of-run proof.
    summary["replica_digests"] = replica_digests(engine.model.state_dict())
    if dist.is_main and len(set(summary["replica_digests"])) > 1:
        progress.log("warning: the model replicas differ across ranks at the end of training "
                     f"(digests {summary['replica_digests']}); rank 0's weights were saved")
    if dist.is_main:
        reporter.write_summary(summary)
        reporter.make_plots(rows, state.best_eval.get("per_class_acc"), state.best_eval.get("confusion"))
        keys = [k for k in ("epoch", "img_size", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1", "lr",
                            "img_per_sec", "epoch_time_s") if any(k in r for r in rows)]
        progress.console.print(epoch_table(rows, keys=keys, title=f"{run_dir}"))
        progress.log(f"best val top-1 {summary['best_top1'] or 0:.2f}% at epoch {state.best_epoch} | "
                     f"{summary['wall_time_s']:.0f}s | weights: {run_dir / 'model.safetensors'}")
    return summary
