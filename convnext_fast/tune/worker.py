"""A tune worker: takes trials from the study and runs each as a normal `train` run (DESIGN.md §7).

A trial is ``convnext_fast.train(cfg, report=reporter)`` into ``STUDY_DIR/trials/NNNN/``: the reporter hands each
epoch's val top-1 (the EMA's when on: the weights the run exports) to Optuna and asks the run to stop at the
epoch boundary when the pruner says so or the time limit has come; the run then saves a resumable checkpoint.
A crash (non-finite loss, out of memory) fails that trial with its error; the worker goes on.

Each worker runs the phases in order: stage 1 (sampled trials until the plan's count or stage 1's deadline),
then, once no stage-1 trial is still running anywhere, stage 2 (the enqueued finalists and the default's
second seed), then the winner's second seed. Whoever arrives first enqueues a phase (an atomic claim); the
others run what is enqueued.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnext_fast.config import TrainConfig, apply_overrides
from convnext_fast.run_files import read_jsonl
from convnext_fast.tune import study as st
from convnext_fast.tune.plan import Plan, stage1_config
from convnext_fast.tune.space import Param, apply_params


@dataclass
class WorkerSpec:
    """Everything a worker process needs (plain values: it is pickled into a spawned process)."""

    study_dir: str
    storage_url: str | None
    base: dict
    space: dict  # name -> Param fields
    plan: dict
    deadline1: float | None  # time.time() when stage 1 stops taking trials and running ones stop
    deadline: float | None  # the end of the whole time limit
    index: int = 0
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    owner: bool = False  # this worker alone re-enqueues a claimed phase on --resume (a crash between claim and
    #                     enqueue must not lose stage 2; enqueueing is idempotent, one job per key)


class _Stray(Exception):
    """A trial Optuna created after its stage had closed (two workers asked at once); recorded, never run."""


class Reporter:
    """The per-epoch callback of a trial's run: report, then stop if pruned (stage 1) or out of time."""

    def __init__(self, trial: Any, prune: bool, deadline: float | None, epochs: int) -> None:
        self.trial, self.prune, self.deadline, self.epochs = trial, prune, deadline, epochs
        self.stopped_by: str | None = None

    @property
    def stop_reason(self) -> str:
        """What the run records as its summary's ``stopped_by`` (`convnext_fast.sinks`)."""
        return self.stopped_by or ""

    def epoch(self, row: dict) -> bool:  # as a sink of the run
        return self(row)

    def __call__(self, row: dict) -> bool:
        value = row.get("ema_val_top1", row["val_top1"])
        self.trial.report(value, step=int(row["epoch"]))
        if row["epoch"] >= self.epochs:
            return False
        if self.prune and self.trial.should_prune():
            self.stopped_by = "pruned"
        elif self.deadline is not None and time.time() >= self.deadline:
            self.stopped_by = "time limit"
        return self.stopped_by is not None


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.study_dir = Path(spec.study_dir)
        self.base = TrainConfig.from_dict(spec.base, source="tune base config")
        if spec.device is not None:
            self.base = apply_overrides(self.base, {"run": {"device": spec.device}}, "tune worker")
        self.space = {k: Param(**v) for k, v in spec.space.items()}
        self.plan = Plan.from_dict(spec.plan)
        self.storage = st.make_storage(self.study_dir, spec.storage_url)
        self.study = st.open_study(self.storage, seed=spec.seed, min_resource=self.plan.min_resource,
                                   reduction_factor=3, create=False)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    # --- phases -------------------------------------------------------------------------------------------
    def run(self) -> None:
        if self._stage1_open():
            self._optimize(stage1=True)
        self._drain()
        if st.claim(self.storage, "stage2") or self.spec.owner:
            st.enqueue_stage2(self.study, self.plan.finalists, self.base.run.seed)
        self._drain()
        if st.claim(self.storage, "reruns") or self.spec.owner:
            st.enqueue_winner_rerun(self.study, self.base.run.seed)
        self._drain()

    def _optimize(self, stage1: bool) -> None:
        def stop(study: Any, trial: Any) -> None:
            if (stage1 and not self._stage1_open() and not self._waiting()) or (not stage1 and not self._waiting()):
                study.stop()
        self.study.optimize(self.objective, callbacks=[stop], catch=(Exception,), gc_after_trial=True)

    def _drain(self) -> None:
        """Run whatever is enqueued (retries, the next stage) until no trial is waiting or running anywhere."""
        while True:
            if self._waiting():
                self._optimize(stage1=False)
                continue
            st.wait_until_idle(self.study)
            if not self._waiting():
                return

    def _waiting(self) -> bool:
        return any(t.state.name == "WAITING" for t in self.study.get_trials(deepcopy=False))

    def _stage1_open(self) -> bool:
        if self.spec.deadline1 is not None and time.time() >= self._stage1_deadline():
            return False
        return self.plan.stage1_max is None or len(st.stage1_originals(self.study)) < self.plan.stage1_max

    def _stage1_deadline(self) -> float | None:
        """The end of stage 1: the limit less stage 2's reserve, the reserve scaled by how much longer than
        planned the finished stage-1 trials took (set-up, plots and a loaded machine are not in the measured
        epochs), so that a slow machine shortens stage 1 rather than cutting stage 2."""
        if self.spec.deadline1 is None or self.spec.deadline is None:
            return self.spec.deadline1
        ratios = sorted((t.datetime_complete - t.datetime_start).total_seconds() / self.plan.trial1_s
                        for t in st.trials(self.study, stage=st.STAGE1, states=("COMPLETE",))
                        if t.datetime_start and t.datetime_complete)
        slow = max(1.0, ratios[len(ratios) // 2]) if ratios else 1.0
        return min(self.spec.deadline1, self.spec.deadline - slow * self.plan.stage2_s)

    # --- one trial ----------------------------------------------------------------------------------------
    def objective(self, trial: Any) -> float:
        system = self.study._storage.get_trial(trial._trial_id).system_attrs  # a live Trial does not show them
        fixed, retry_of = system.get("fixed_params"), system.get("failed_trial")
        stage = int(trial.user_attrs.get("stage", st.STAGE1))
        if fixed is None and retry_of is None:  # sampled: stage 1 only, within --trials (workers race to ask)
            rank = [t.number for t in st.stage1_originals(self.study)].index(trial.number)
            over = self.plan.stage1_max is not None and rank >= self.plan.stage1_max
            if over or (self.spec.deadline1 and time.time() >= self._stage1_deadline()):
                trial.set_user_attr("stray", True)
                raise _Stray(f"trial {trial.number} was asked after stage 1 closed; not run")
            trial.set_user_attr("stage", st.STAGE1)
        params = {name: p.suggest(trial) for name, p in self.space.items()}
        # A retry (its worker died, or Ctrl-C) carries the failed trial's user attrs: its run directory, resumed.
        run_dir = Path(trial.user_attrs["run_dir"]) if retry_of is not None and "run_dir" in trial.user_attrs \
            else self.study_dir / "trials" / f"{trial.number:04d}"
        for key in ("error", "interrupted", "stopped_by"):  # inherited from the failed trial: not this one's
            if trial.user_attrs.get(key) is not None:
                trial.set_user_attr(key, None)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", self.name)
        cfg = self.trial_config(stage, params, bool(trial.user_attrs.get("default")),
                                int(trial.user_attrs.get("seed", self.base.run.seed)), run_dir)
        prune = stage == st.STAGE1
        reporter = Reporter(trial, prune, self._stage1_deadline() if prune else self.spec.deadline, cfg.run.epochs)
        summary = self._train(trial, cfg, run_dir, reporter)
        if stage == st.STAGE1:
            _drop_weights(run_dir)
        stopped_by = reporter.stopped_by or (summary or {}).get("stopped_by")
        if stopped_by in ("pruned", "time limit") or summary is None:
            trial.set_user_attr("stopped_by", stopped_by or "stopped")
            _record(trial, run_dir)
            import optuna
            raise optuna.TrialPruned(f"{stopped_by} at epoch {len(read_jsonl(run_dir / 'metrics.jsonl'))}")
        _record(trial, run_dir)
        return float(summary["best_top1"] if summary.get("best_top1") is not None else 0.0)

    def trial_config(self, stage: int, params: dict, default: bool, seed: int, run_dir: Path) -> TrainConfig:
        cfg = stage1_config(self.base, self.plan.stage1_epochs) if stage == st.STAGE1 else self.base
        if not default:  # the default trial is the base recipe itself, exactly
            cfg = apply_params(cfg, params, cfg.run.epochs * self.plan.steps_per_epoch, source="tune trial")
        return apply_overrides(cfg, {"run": {"seed": seed, "out": str(run_dir)}}, "tune trial")

    def _train(self, trial: Any, cfg: TrainConfig, run_dir: Path, reporter: Reporter) -> dict | None:
        """Run (or resume) the trial's run; None when it stopped at an epoch boundary on the reporter's ask."""
        from convnext_fast.errors import Interrupted
        from convnext_fast.loop import train

        if (run_dir / "summary.json").is_file():  # finished before its worker died: nothing to train
            import json
            return json.loads((run_dir / "summary.json").read_text())
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        if resume:  # the pruner sees the whole curve, not just the epochs after the checkpoint
            for row in read_jsonl(run_dir / "metrics.jsonl"):
                trial.report(row.get("ema_val_top1", row["val_top1"]), step=int(row["epoch"]))
            trial.set_user_attr("resumed", True)
        try:
            summary = train(cfg, resume=resume, tty=False, sinks=[reporter])
        except Interrupted:
            if reporter.stopped_by:  # a train() that raises on a sink's stop (before it returned stopped_by)
                return None
            trial.set_user_attr("interrupted", True)  # Ctrl-C / SIGTERM: `tune --resume` continues this run
            raise KeyboardInterrupt from None
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
            _record(trial, run_dir)
            raise
        return summary


def _drop_weights(run_dir: Path) -> None:
    """A finished stage-1 trial keeps its record (config, metrics, summary, plots), not its weights: hundreds of
    short trials' checkpoints fill a disk (a 160-trial atto study on CPU wrote 8 GB), and nothing reads them.
    A trial that did not finish (crash, kill) keeps them: its retry resumes from them."""
    import shutil
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "model.safetensors").unlink(missing_ok=True)


def _record(trial: Any, run_dir: Path) -> None:
    """The trial's own figures from its run directory (the leaderboard reads them from the study)."""
    from convnext_fast.runs import read_run  # the same reading as `runs list` (trials are ordinary runs)
    try:
        run = read_run(run_dir)
    except ValueError:  # it failed before writing config.json (e.g. out of memory while building): no figures
        trial.set_user_attr("epochs_run", 0)
        return
    trial.set_user_attr("epochs_run", run.epochs_run)
    trial.set_user_attr("wall_s", round(run.wall_time_s or 0.0, 1))
    if run.best_top1 is not None:
        trial.set_user_attr("best_top1", run.best_top1)


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    _die_with_parent()
    if spec.threads:
        import torch
        torch.set_num_threads(spec.threads)
    try:
        Worker(spec).run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _die_with_parent() -> None:
    # A `kill -9` of `tune` must not leave its workers training on (Linux: the kernel sends them SIGKILL).
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spec_space(space: dict[str, Param]) -> dict:
    return {k: dataclasses.asdict(v) for k, v in space.items()}
