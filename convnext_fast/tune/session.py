"""One `convnext-fast tune` invocation: plan (or reload) the study, start the workers, wait, write what the user reads.

STUDY_DIR holds ``tune.json`` (the base config, space, plan and storage: what ``--resume`` reloads),
``journal.log`` (the default Optuna storage), ``clock.json`` (time spent so far, so ``--resume`` keeps the limit),
``trials/NNNN/`` (one run directory per trial), ``leaderboard.csv``, ``best.toml`` and ``report.html``.

Without ``--storage`` the process holds STUDY_DIR's lock for the whole study (a second `tune` into it refuses),
so at start-up a trial still RUNNING in the journal was left by a dead process: it is failed and retried once,
resuming from its checkpoint. With ``--storage`` several `tune` processes share the study and Optuna's heartbeats
find dead workers.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnext_fast.config import TrainConfig
from convnext_fast.run_files import atomic_write_text
from convnext_fast.runlock import RunDirBusy, RunLock
from convnext_fast.tune import study as st
from convnext_fast.tune.plan import Plan, default_trial_epochs, fmt_duration, make_plan, stage1_config
from convnext_fast.tune.space import base_params, describe, load_space
from convnext_fast.tune.worker import Worker, WorkerSpec, spec_space, worker_main


@dataclass
class TuneOptions:
    study_dir: Path
    base: TrainConfig | None = None  # None with --resume (reloaded)
    preset: str | None = None
    time_limit_s: float | None = None
    time_limit_text: str | None = None
    space_file: str | None = None
    workers: int = 1
    storage: str | None = None
    resume: bool = False
    trial_epochs: int | None = None
    trials: int | None = None
    finalists: int = 3
    started_at: float = dataclasses.field(default_factory=time.time)  # the limit counts from here (planning in it)


def run(opts: TuneOptions) -> int:
    st.optuna()  # the extra is installed, or one line
    st.check_storage(opts.storage, opts.workers)
    study_dir = opts.study_dir
    saved = study_dir / "tune.json"
    if opts.resume and not saved.is_file():
        raise ValueError(f"--resume {study_dir}: no tune.json (not a study directory)")
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    if opts.storage is None:
        try:
            lock = RunLock(study_dir).acquire()
        except RunDirBusy as e:
            raise ValueError(f"{study_dir} is in use by another tune process ({str(e).split('(', 1)[1].split(',')[0]}); "
                             f"wait for it, or share a study between processes with --storage postgresql://...") \
                from None
    try:
        if not opts.resume and saved.is_file() and opts.storage is None:  # with --storage: joining is the point
            raise ValueError(f"--out {study_dir} already holds a study; continue it with --resume {study_dir}")
        return _run_locked(opts, study_dir, saved)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(opts: TuneOptions, study_dir: Path, saved: Path) -> int:
    if opts.resume:
        state = json.loads(saved.read_text())
        opts = dataclasses.replace(opts, storage=state["storage"], preset=state.get("preset"),
                                   workers=opts.workers if opts.workers > 1 else state["workers"])
        base = TrainConfig.from_dict(state["base"], source=str(saved))
        plan, space = Plan.from_dict(state["plan"]), state["space"]
        storage = st.make_storage(study_dir, opts.storage)
        study = st.open_study(storage, seed=base.run.seed, min_resource=plan.min_resource, reduction_factor=3,
                              create=False)
        print(f"resuming the study in {study_dir}: {len(st.trials(study))} trials so far")
        if opts.storage is None:
            failed = st.repair(study, "its process died (found running at --resume)")
            if failed:
                print(f"trials {failed} were left unfinished by the previous process: failed, retried once from "
                      f"their checkpoints")
    else:
        base, plan, space, storage, study = _new_study(opts, study_dir)
        atomic_write_text(saved, json.dumps({"base": base.to_dict(), "plan": plan.to_dict(), "space": space,
                                             "storage": opts.storage, "preset": opts.preset,
                                             "workers": opts.workers}, indent=2))
    code = _run_workers(opts, study_dir, base, plan, space, study)
    finish(study, study_dir, base, opts.preset, space)
    return code


def _new_study(opts: TuneOptions, study_dir: Path) -> tuple:
    from convnext_fast.budget import measure_epoch_seconds

    base = opts.base
    storage = st.make_storage(study_dir, opts.storage) if opts.storage else None
    if storage is not None and st.study_exists(storage):  # another machine created it: take its plan
        study = st.open_study(storage, seed=base.run.seed, min_resource=1, reduction_factor=3, create=False)
        ua = study.user_attrs
        plan = Plan.from_dict(ua["plan"])
        study = st.open_study(storage, seed=base.run.seed, min_resource=plan.min_resource, reduction_factor=3,
                              create=False)
        print(f"joining the study at {opts.storage}: {len(st.trials(study))} trials so far")
        return TrainConfig.from_dict(ua["base"]), plan, ua["space"], storage, study
    device = _device(base)
    steps = steps_per_epoch(base)
    trial_epochs = opts.trial_epochs or default_trial_epochs(base)
    s1 = stage1_config(base, trial_epochs)
    space = load_space(base, opts.space_file, s1.run.epochs * steps)
    print(f"measuring throughput on {device} (stage-1 and full-fidelity sizes) ...", flush=True)
    epoch_s1 = measure_epoch_seconds(s1, device=device)
    # one size, evaluated at it: stage 1 differs from the base only in epochs, so its epochs cost the same
    same = base.data.progressive is None and (base.data.eval_img_size or base.data.img_size) == base.data.img_size
    epoch_s2 = epoch_s1 if same else measure_epoch_seconds(base, device=device)
    plan = make_plan(base, trial_epochs=trial_epochs, trials=opts.trials, time_limit_s=opts.time_limit_s,
                     finalists=opts.finalists, workers=opts.workers,
                     parallel=opts.workers if device.startswith("cuda") else 1, epoch_s1=epoch_s1, epoch_s2=epoch_s2,
                     steps_per_epoch=steps, limit_text=f"--time-limit {opts.time_limit_text}")
    print(plan.describe(base, device))
    print(f"  search space: {describe(space)}", flush=True)
    storage = storage or st.make_storage(study_dir, None)
    study = st.open_study(storage, seed=base.run.seed, min_resource=plan.min_resource, reduction_factor=3,
                          create=True)
    spec = spec_space(space)
    for key, value in (("plan", plan.to_dict()), ("base", base.to_dict()), ("space", spec)):
        study.set_user_attr(key, value)
    if opts.time_limit_s:
        study.set_user_attr("deadline", opts.started_at + opts.time_limit_s)
    st.enqueue_default(study, base_params(s1, space, s1.run.epochs * steps))
    return base, plan, spec, storage, study


def steps_per_epoch(base: TrainConfig) -> int:
    """Optimizer steps per epoch (the training loader drops the last partial batch)."""
    from convnext_fast.data.splits import resolve_train_val
    train_index, _ = resolve_train_val(base.data, seed=base.run.seed, keep_bad_train=base.data.skip_bad)
    return max(len(train_index) // base.data.batch_size, 1)


def _device(base: TrainConfig) -> str:
    if base.run.device:
        return base.run.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _deadlines(opts: TuneOptions, plan: Plan, study_dir: Path, study: Any) -> tuple[float | None, float | None]:
    if not plan.time_limit_s:
        return None, None
    if opts.storage is not None and "deadline" in study.user_attrs:  # shared: one wall clock for all machines
        end = float(study.user_attrs["deadline"])
    else:
        end = opts.started_at + plan.time_limit_s - _spent(study_dir)
    return end - plan.stage2_s, end


def _clock(study_dir: Path) -> dict:
    p = study_dir / "clock.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _spent(study_dir: Path) -> float:
    return float(_clock(study_dir).get("spent_s", 0.0))


def _run_workers(opts: TuneOptions, study_dir: Path, base: TrainConfig, plan: Plan, space: dict, study: Any) -> int:
    deadline1, deadline = _deadlines(opts, plan, study_dir, study)
    device = _device(base)
    n = opts.workers
    # each worker and each session its own sampler seed (equal seeds would propose equal first trials), reproducible
    session = _clock(study_dir).get("sessions", 0)
    threads = max(1, (os.cpu_count() or 1) // n) if device == "cpu" else None
    specs = []
    for i in range(n):
        dev = f"cuda:{i % _gpus()}" if device == "cuda" and n > 1 and _gpus() > 1 else None
        specs.append(WorkerSpec(study_dir=str(study_dir), storage_url=opts.storage, base=base.to_dict(), space=space,
                                plan=plan.to_dict(), deadline1=deadline1, deadline=deadline, index=i,
                                seed=base.run.seed * 1000 + 100 * session + i, threads=threads, device=dev,
                                owner=i == 0 and opts.resume and opts.storage is None))
    # this session's time counts from its start: measuring and planning are part of the limit
    clock, t0, code = {"spent_s": _spent(study_dir), "sessions": session + 1}, opts.started_at, 0
    if n == 1:  # in this process: a kill -9 or Ctrl-C of tune reaches its trial's run, nothing else to stop
        try:
            Worker(specs[0]).run()
        except KeyboardInterrupt:
            code = 130
    else:
        code = _run_processes(specs, study, opts.storage, study_dir, clock, t0)
    atomic_write_text(study_dir / "clock.json", json.dumps({**clock, "spent_s": clock["spent_s"] + time.time() - t0}))
    if code:
        print(f"convnext-fast tune: stopped; continue with: convnext-fast tune --resume {study_dir}", file=sys.stderr)
    return code


def _run_processes(specs: list[WorkerSpec], study: Any, storage: str | None, study_dir: Path, clock: dict,
                   t0: float) -> int:
    """One spawned process per worker; the clock kept while they run; a dead one's trials failed and retried."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for spec in specs:
        p = ctx.Process(target=worker_main, args=(spec,), name=f"tune-worker-{spec.index}")
        p.start()
        procs.append(p)
    code = 0
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=2.0 / len(procs))
            atomic_write_text(study_dir / "clock.json",
                              json.dumps({**clock, "spent_s": clock["spent_s"] + time.time() - t0}))
            for p in procs:
                if p.exitcode not in (None, 0) and not getattr(p, "_seen", False):
                    p._seen = True  # type: ignore[attr-defined]
                    code = _worker_died(p, study, storage)
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: each saves its trial's checkpoint and stops
        for p in procs:
            p.join()
        code = 130
    return code


def _worker_died(p: Any, study: Any, storage: str | None) -> int:
    if p.exitcode == 130:
        return 130
    print(f"convnext-fast tune: worker {p.name} (pid {p.pid}) died with exit code {p.exitcode}", file=sys.stderr)
    if storage is None:  # one machine: its running trials are known dead now (RDB storages: heartbeats)
        import socket
        me = f"{socket.gethostname()}:{p.pid}"
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "RUNNING" and t.user_attrs.get("worker") == me:
                study._storage.set_trial_user_attr(t._trial_id, "error", f"worker died (exit code {p.exitcode})")
                study._storage.set_trial_state_values(t._trial_id, st.optuna().trial.TrialState.FAIL)
                st.retry_callback()(study, study._storage.get_trial(t._trial_id))
    return 1


def _gpus() -> int:
    import torch
    return max(torch.cuda.device_count(), 1)


def finish(study: Any, study_dir: Path, base: TrainConfig, preset: str | None, space: dict) -> None:
    """leaderboard.csv, the terminal leaderboard, best.toml and report.html from the study as it stands."""
    from rich.console import Console

    from convnext_fast.tune import leaderboard as lb
    from convnext_fast.tune.report import build_report

    table = lb.rows(study)
    names = list(space)
    lb.write_csv(study_dir / "leaderboard.csv", table, names)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file: the whole row rather than 80 columns of ellipses
    console.print(lb.terminal_table(table, names, title=f"tune leaderboard: {study_dir}"))
    w = st.winner(study)
    if w is not None:
        path = lb.write_best_toml(study_dir / "best.toml", Path(w.user_attrs["run_dir"]), preset,
                                  f"tune winner: trial {w.number} (stage 2, val top-1 {w.value:.2f}%), "
                                  f"from stage-1 trial {w.user_attrs.get('source')}")
        print(f"best recipe: {path} (val top-1 {w.value:.2f}%, trial {w.number}); "
              f"train it with: convnext-fast train --config {path}")
    page = build_report(study, study_dir, table, names)
    print(f"report: {page}  (leaderboard: {study_dir / 'leaderboard.csv'}; "
          f"{fmt_duration(_spent(study_dir))} spent)")
