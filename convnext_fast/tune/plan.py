"""The two-stage plan of a study, fixed once from measured throughput before any trial starts (DESIGN.md §7).

Stage 1: many short trials at a low resolution (the base's progressive start size, else its own size), each
with a fixed epoch budget; setting ``run.epochs`` is what stretches the warmup (scaled with it) and the decay
to end at that budget. Pruned by asynchronous successive halving whose first rung is the first epoch after
warmup (never Optuna's "auto": a rung inside warmup compares learning rates, not recipes).
Stage 2: the best few (the default always among them) at full fidelity: the base's size, epochs and schedule.
Then the winner and the default each once more with a second seed: the noise below which they tie.

Stage 2 and the reruns are reserved up front: stage 1 gets only what is left of ``--time-limit``, so the limit
never returns an under-trained winner.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from convnext_fast.budget import fit_to_epochs, format_duration, schedule_seconds
from convnext_fast.config import TrainConfig, apply_overrides

REDUCTION_FACTOR = 3  # successive halving keeps the best third at each rung (Optuna's ASHA; Li et al. 2020)


@dataclass
class Plan:
    stage1_size: int
    stage1_epochs: int
    stage1_trials: int
    min_resource: int  # the first pruning rung (epoch)
    stage2_epochs: int
    finalists: int
    reruns: int  # second-seed runs of the winner and the default
    trial1_s: float  # estimated seconds per stage-1 trial (unpruned)
    run2_s: float  # estimated seconds per full-fidelity run
    workers: int
    parallel: int  # runs that proceed side by side (GPU workers; CPU workers share the cores: 1)
    time_limit_s: float | None
    steps_per_epoch: int
    stage1_max: int | None = None  # --trials: a hard cap; without it stage 1 runs until its share of the limit

    @property
    def stage2_s(self) -> float:
        return math.ceil((self.finalists + self.reruns) / self.parallel) * self.run2_s

    @property
    def stage1_s(self) -> float:
        return math.ceil(self.stage1_trials / self.parallel) * self.trial1_s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(**d)

    def describe(self, base: TrainConfig, device: str) -> str:
        limit = f" of the {fmt_duration(self.time_limit_s)} limit" if self.time_limit_s else ""
        side = f"{self.workers} worker(s)" + ("" if self.parallel == self.workers else
                                               f" sharing {device}'s cores (no speed-up assumed)")
        return "\n".join([
            f"tune plan ({side}; times estimated from measured throughput on {device}):",
            f"  stage 1: {'' if self.stage1_max else 'at least '}{self.stage1_trials} trials x {self.stage1_epochs} "
            f"epochs at {self.stage1_size} px{'' if self.stage1_max else ' (more as pruning stops some early)'}, "
            f"pruned by successive halving from epoch {self.min_resource} (keeps 1/{REDUCTION_FACTOR} per rung): "
            f"~{fmt_duration(self.trial1_s)} per trial, at most ~{fmt_duration(self.stage1_s)}",
            f"  stage 2: {self.finalists} finalists (the default among them) + {self.reruns} second-seed reruns "
            f"(winner, default) x {self.stage2_epochs} epochs at {base.resolution_schedule().describe()}: "
            f"~{fmt_duration(self.run2_s)} each, ~{fmt_duration(self.stage2_s)} reserved",
            f"  total: at most ~{fmt_duration(self.stage1_s + self.stage2_s)}{limit}",
        ])


def stage1_size(base: TrainConfig) -> int:
    """The low resolution of stage 1: the progressive start size, else the base's own training size."""
    return base.data.progressive or base.data.img_size


def stage1_config(base: TrainConfig, epochs: int) -> TrainConfig:
    """``base`` as a short low-resolution trial: fixed size (also for evaluation), ``epochs`` epochs, warmup scaled
    by the same factor as the run; early stopping off (the pruner decides)."""
    size = stage1_size(base)
    short = fit_to_epochs(base, min(epochs, base.run.epochs))  # the warmup shrinks with the run (budget's rule)
    return apply_overrides(short, {
        "data": {"img_size": size, "progressive": None, "ramp": None, "eval_img_size": size},
        "run": {"epochs": epochs, "patience": None}}, "tune stage 1")


def default_trial_epochs(base: TrainConfig) -> int:
    """Stage 1's epoch budget when --trial-epochs is not given: an eighth of the base's, at least 3."""
    return max(3, round(base.run.epochs / 8))


def first_rung(trial_cfg: TrainConfig) -> int:
    """The first epoch after warmup (at least 1); successive halving's min_resource."""
    return min(max(1, math.floor(trial_cfg.optim.warmup_epochs) + 1), trial_cfg.run.epochs)


def run_seconds(cfg: TrainConfig, epoch_seconds: dict[int, float]) -> float:
    """Estimated seconds for a whole run of ``cfg`` (its scheduled epochs, evaluation and set-up included)."""
    return schedule_seconds(cfg, cfg.run.epochs, epoch_seconds)


def make_plan(base: TrainConfig, *, trial_epochs: int, trials: int | None, time_limit_s: float | None,
              finalists: int, workers: int, parallel: int, epoch_s1: dict[int, float], epoch_s2: dict[int, float],
              steps_per_epoch: int, limit_text: str | None = None) -> Plan:
    """The plan; ValueError with the estimate when ``time_limit_s`` cannot hold stage 2 and one stage-1 trial."""
    s1 = stage1_config(base, trial_epochs)
    trial1_s, run2_s = run_seconds(s1, epoch_s1), run_seconds(base, epoch_s2)
    plan = Plan(stage1_size=stage1_size(base), stage1_epochs=trial_epochs, stage1_trials=trials or 0,
                min_resource=first_rung(s1), stage2_epochs=base.run.epochs, finalists=finalists, reruns=2,
                trial1_s=trial1_s, run2_s=run2_s, workers=workers, parallel=parallel, time_limit_s=time_limit_s,
                steps_per_epoch=steps_per_epoch)
    if time_limit_s is not None:
        left = time_limit_s - plan.stage2_s
        fit = math.floor(left / trial1_s) * parallel if left > 0 else 0
        if fit < 1:
            raise ValueError(
                f"{limit_text or '--time-limit ' + fmt_duration(time_limit_s)} is too short: stage 2 "
                f"({finalists} finalists + 2 reruns of ~{fmt_duration(run2_s)} each) needs ~{fmt_duration(plan.stage2_s)} and one stage-1 "
                f"trial ~{fmt_duration(trial1_s)} (measured throughput); give at least "
                f"~{fmt_duration(plan.stage2_s + trial1_s)}, or fewer --finalists / --trial-epochs")
        plan.stage1_trials = min(trials, fit) if trials else fit
    elif not trials:
        raise ValueError("tune needs --time-limit DURATION or --trials N (or both)")
    plan.stage1_max = trials
    plan.finalists = min(finalists, plan.stage1_trials)
    return plan


def fmt_duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)
