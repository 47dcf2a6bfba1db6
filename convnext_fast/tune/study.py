"""The Optuna side of a study: storage, sampler, pruner, the enqueued jobs of each stage, and repair after a crash.

The study is the index of trials; each trial's run directory holds everything else. One Optuna study holds both
stages: a trial's ``user_attrs["stage"]`` says which (1 = short low-resolution trial, 2 = finalist at full
fidelity, 3 = second-seed rerun). Stage 2 starts only once every stage-1 trial has finished, so the pruner
never compares a stage-1 trial with a full-fidelity one and the sampler is never asked during stage 2.

Storage: a journal file in STUDY_DIR by default (Optuna's JournalFileBackend: safe for several processes on one
machine), or ``--storage postgresql://...`` for workers on several machines (with heartbeats: a dead worker's
trial is failed and retried once). SQLite is refused with more than one worker (Optuna's own advice: its
locking does not take concurrent writers).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

STUDY_NAME = "convnext-fast"
HEARTBEAT_S, GRACE_S = 30, 120  # a worker silent for 2 minutes is dead (its trial is failed and retried once)
STAGE1, STAGE2, RERUN = 1, 2, 3
ACTIVE = ("RUNNING", "WAITING")


def optuna():
    try:
        import optuna as _optuna
    except ImportError:
        raise ValueError("convnext-fast tune needs Optuna: pip install 'convnext-fast[tune]'") from None
    _optuna.logging.set_verbosity(_optuna.logging.WARNING)
    return _optuna


def retry_callback() -> Any:
    """Retry a dead worker's trial once (a copy with its params and user attrs: its run directory, resumed)."""
    o = optuna()
    with warnings.catch_warnings():  # experimental since Optuna 2.8, and the documented way to do this
        warnings.simplefilter("ignore", o.exceptions.ExperimentalWarning)
        return o.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)


def check_storage(url: str | None, workers: int) -> None:
    """One-line errors for a storage that cannot work before anything is measured."""
    if url is None:
        return
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite" and workers > 1:
        raise ValueError(f"--storage {url}: SQLite does not take concurrent writers (Optuna's advice); use the "
                         f"default journal file or PostgreSQL with --workers {workers}")
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(f"--storage {url}: expected postgresql://USER@HOST/DB (or sqlite:///FILE for one worker)")


def make_storage(study_dir: Path, url: str | None) -> Any:
    """The journal file in ``study_dir`` (default) or the RDB at ``url`` with heartbeats and one retry."""
    o = optuna()
    if url is None:
        from optuna.storages.journal import JournalFileBackend
        return o.storages.JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    if url.startswith("postgresql://"):  # the driver the `tune` extra installs (SQLAlchemy 2.1's default is psycopg 3)
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    try:
        with warnings.catch_warnings():  # heartbeats: "experimental" since Optuna 2.9, and what finds dead workers
            warnings.simplefilter("ignore", o.exceptions.ExperimentalWarning)
            return o.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                         heartbeat_stale_trial_callback=retry_callback())
    except Exception as e:  # noqa: BLE001 - a wrong URL / unreachable server: one line, before any trial
        raise ValueError(f"--storage {url}: cannot open the study storage: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def sampler(seed: int) -> Any:
    # TPE: Optuna's default; its first trials are random (n_startup_trials), then it models good vs bad.
    return optuna().samplers.TPESampler(seed=seed, n_startup_trials=5)


def pruner(min_resource: int, reduction_factor: int) -> Any:
    # Asynchronous successive halving: a trial goes on at a rung if it is in the best 1/reduction_factor of the
    # trials that reached that rung so far; no trial waits for another (ASHA).
    return optuna().pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)


def open_study(storage: Any, *, seed: int, min_resource: int, reduction_factor: int, create: bool) -> Any:
    o = optuna()
    kw = dict(study_name=STUDY_NAME, storage=storage, sampler=sampler(seed), pruner=pruner(min_resource,
                                                                                           reduction_factor))
    if create:
        return o.create_study(direction="maximize", load_if_exists=True, **kw)
    return o.load_study(**kw)


def study_exists(storage: Any) -> bool:
    return any(s.study_name == STUDY_NAME for s in storage.get_all_studies())


def trials(study: Any, *, stage: int | None = None, states: tuple[str, ...] | None = None) -> list[Any]:
    """The study's trials (not the stray ones: see `worker`), optionally of one stage / in some states."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("stray"):
            continue
        if stage is not None and trial_stage(t) != stage:
            continue
        if states is not None and t.state.name not in states:
            continue
        out.append(t)
    return out


def trial_stage(t: Any) -> int:
    return int(t.user_attrs.get("stage", STAGE1))


def is_retry(t: Any) -> bool:
    return t.system_attrs.get("failed_trial") is not None


def stage1_originals(study: Any) -> list[Any]:
    """Stage-1 trials counted against the plan (retries of a dead worker's trial are not new trials)."""
    return [t for t in trials(study, stage=STAGE1) if not is_retry(t)]


def claim(storage: Any, phase: str) -> bool:
    """True for exactly one caller per ``phase`` across all workers and machines: creating a study of that name
    is atomic in both storages (a unique name in the journal's replay and in the RDB)."""
    o = optuna()
    try:
        o.create_study(study_name=f"{STUDY_NAME}/phase/{phase}", storage=storage)
        return True
    except o.exceptions.DuplicatedStudyError:
        return False


def enqueue_default(study: Any, params: dict[str, float]) -> None:
    """The base recipe as trial 0 (stage 1), so the search cannot report something worse than the default."""
    study.enqueue_trial(params, user_attrs={"stage": STAGE1, "default": True, "job": "default"},
                        skip_if_exists=False)


def _jobs(study: Any) -> set[str]:
    return {t.user_attrs.get("job") for t in study.get_trials(deepcopy=False) if t.user_attrs.get("job")}


def enqueue_stage2(study: Any, finalists: int, base_seed: int) -> list[str]:
    """The best ``finalists`` stage-1 trials (the default always among them) at full fidelity, plus the default
    again with a second seed. Idempotent (jobs already in the study are skipped)."""
    done = sorted(trials(study, stage=STAGE1, states=("COMPLETE",)), key=lambda t: t.value, reverse=True)
    default = next((t for t in done if t.user_attrs.get("default")), None)
    others = [t for t in done if t is not default]
    picked = ([default] if default else []) + others[:max(finalists - bool(default), 0)]
    have, added = _jobs(study), []
    for t in picked:
        for stage, seed, job in ((STAGE2, base_seed, f"s2:{t.number}"), (RERUN, base_seed + 1, f"seed2:{t.number}")):
            if stage == RERUN and t is not default:
                continue
            if job in have:
                continue
            study.enqueue_trial(t.params, user_attrs={"stage": stage, "job": job, "source": t.number,
                                                      "default": bool(t.user_attrs.get("default")), "seed": seed})
            added.append(job)
    return added


def enqueue_winner_rerun(study: Any, base_seed: int) -> list[str]:
    """The stage-2 winner again with a second seed (the default's rerun is enqueued with stage 2)."""
    w = winner(study)
    if w is None or w.user_attrs.get("default"):
        return []
    job = f"seed2:{w.user_attrs['source']}"
    if job in _jobs(study):
        return []
    study.enqueue_trial(w.params, user_attrs={"stage": RERUN, "job": job, "source": w.user_attrs["source"],
                                              "default": False, "seed": base_seed + 1})
    return [job]


def winner(study: Any) -> Any | None:
    done = trials(study, stage=STAGE2, states=("COMPLETE",))
    # a tie goes to the default: the search reports something else only when it measured better
    return max(done, key=lambda t: (t.value, bool(t.user_attrs.get("default")))) if done else None


def repair(study: Any, why: str) -> list[int]:
    """Fail the trials a dead process left RUNNING (and those a Ctrl-C interrupted) and retry each once, resuming
    from its run directory's checkpoint. Only called while this process alone drives the study (the STUDY_DIR
    lock is held), so RUNNING means dead. Returns the failed trial numbers."""
    o = optuna()
    storage, retry, failed = study._storage, retry_callback(), []
    # the callback records the chain it retried in retry_history: the last entry is the trial it replaced
    retried = {t.system_attrs["retry_history"][-1] for t in study.get_trials(deepcopy=False)
               if t.system_attrs.get("retry_history")}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("stray"):
            continue
        dead = t.state == o.trial.TrialState.RUNNING
        interrupted = t.state == o.trial.TrialState.FAIL and t.user_attrs.get("interrupted")
        if not (dead or interrupted):
            continue
        if dead:
            storage.set_trial_user_attr(t._trial_id, "error", why)
            storage.set_trial_state_values(t._trial_id, o.trial.TrialState.FAIL)
        if t.number not in retried:  # the callback itself stops after one retry (max_retry=1)
            retry(study, storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


def wait_until_idle(study: Any, poll_s: float = 1.0) -> None:
    """Block while other workers still run trials (none WAITING here: the caller runs waiting ones itself)."""
    from optuna.storages import fail_stale_trials
    while True:
        if getattr(study._storage, "get_heartbeat_interval", lambda: None)():
            fail_stale_trials(study)
        states = {t.state.name for t in study.get_trials(deepcopy=False, states=None)}
        if "RUNNING" not in states or "WAITING" in states:
            return
        time.sleep(poll_s)
