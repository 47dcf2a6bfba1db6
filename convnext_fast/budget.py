"""Time budgets are schedules (DESIGN §7): a wall-time limit becomes an epoch count once, up front.

    parse_duration("1h30m")                    -> 5400.0 seconds
    measure_epoch_seconds(cfg)                 -> {size_px: seconds per epoch at that size, eval included}
    plan_epochs(cfg, seconds, epoch_seconds)   -> the largest N whose whole schedule fits in ``seconds``
    fit_to_epochs(cfg, N)                      -> cfg laid out over N epochs (warmup and an explicit ramp scaled)
    DeadlineSink(...)                          -> the safety net: stops at an epoch boundary if the deadline
                                                  would be overrun anyway (the measurement was wrong)

The count is fixed once and recorded (config.json "budget"); a resumed run keeps it and never re-measures.
Laying a recipe over fewer epochs keeps its shape: ``run.epochs`` is the most the run may take, warmup and an
explicit ``--ramp`` shrink in proportion (N / epochs), the default ramp is proportional already (3/4 : 7/8), the
cosine decays to the run's last step (WarmupCosine's total_steps), and the EMA warmup counts optimizer steps
(timm's), so it needs no change.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from convnext_fast.config import TrainConfig, apply_overrides

__all__ = ["EpochTimes", "DeadlineSink", "fit_to_epochs", "format_duration", "measure_epoch_seconds",
           "parse_duration", "plan_epochs", "plan_lines"]

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_TOKEN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")


def parse_duration(text: str, flag: str = "--time-limit") -> float:
    """Seconds from ``8h``, ``90m``, ``45s``, ``1h30m``, ``2d``, ``3600`` (a bare number is seconds).

    Raises a one-line ValueError naming ``flag`` and the value for anything else, and for a duration <= 0.
    """
    raw = str(text)
    s = raw.strip().lower().replace(" ", "")
    seconds: float | None = None
    try:
        seconds = float(s)
    except ValueError:
        tokens = _TOKEN.findall(s)
        units = [u for _, u in tokens]
        in_order = units == sorted(units, key=list(_UNITS).index) and len(set(units)) == len(units)
        if tokens and "".join(n + u for n, u in tokens) == s and in_order:
            seconds = sum(float(n) * _UNITS[u] for n, u in tokens)
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"{flag}: expected a duration such as 8h, 90m, 45s, 1h30m or seconds, got {raw!r}")
    if seconds <= 0:
        raise ValueError(f"{flag}: the duration must be > 0, got {raw!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; ``75.4`` -> ``1m15s``; under a minute: ``42.0s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m or h else "") + (f"{s}s" if s else "")


class EpochTimes(dict):
    """``{size_px: seconds per epoch}`` (one training epoch at that size + one evaluation pass), plus:

    ``overhead_s``: seconds a run pays once, not per epoch (building the engine and loaders, and with
    torch.compile one compile per size, measured as the warm-up time beyond steady-state steps);
    ``record``: the measurement as plain JSON (config.json's "budget").
    """

    def __init__(self, seconds: dict[int, float], overhead_s: float = 0.0, record: dict | None = None):
        super().__init__(seconds)
        self.overhead_s = float(overhead_s)
        self.record = record or {}

    def describe(self) -> str:
        sizes = ", ".join(f"{s}px {t:.1f}s" for s, t in sorted(self.items()))
        ev = self.record.get("eval_s")
        return f"per epoch {sizes}" + (f" (evaluation {ev:.1f}s of it)" if ev is not None else "") + \
            (f", once {self.overhead_s:.1f}s" if self.overhead_s else "")


def fit_to_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` laid out over ``epochs`` (validated copy): with fewer epochs than ``cfg.run.epochs`` the warmup and
    an explicit progressive ramp shrink in proportion; the default ramp and the cosine follow by themselves."""
    full = cfg.run.epochs
    over: dict[str, dict[str, Any]] = {"run": {"epochs": int(epochs)}}
    if epochs < full:
        f = epochs / full
        over["optim"] = {"warmup_epochs": cfg.optim.warmup_epochs * f}
        if cfg.data.progressive is not None and cfg.data.ramp is not None:
            start = min(epochs, round(cfg.data.ramp[0] * f))
            over["data"] = {"ramp": (start, max(start, min(epochs, round(cfg.data.ramp[1] * f))))}
    return apply_overrides(cfg, over, "--time-limit")


def _seconds_at(epoch_seconds: dict[int, float], size: int) -> float:
    """Seconds per epoch at ``size``: measured, else linear in pixels between the measured neighbours (the
    benchmark's projection rule, `rate_at`), for a ramp size that only a shorter run meets."""
    if size in epoch_seconds:
        return epoch_seconds[size]
    from convnext_fast.benchmark.projection import rate_at

    rate, _ = rate_at({s: 1.0 / t for s, t in epoch_seconds.items()}, size)
    return 1.0 / rate


def schedule_seconds(cfg: TrainConfig, epochs: int, epoch_seconds: dict[int, float]) -> float:
    """Estimated wall time of the whole run of ``epochs`` (fit_to_epochs), once-only overhead included."""
    sizes = fit_to_epochs(cfg, epochs).resolution_schedule().per_epoch
    return getattr(epoch_seconds, "overhead_s", 0.0) + sum(_seconds_at(epoch_seconds, s) for s in sizes)


def plan_epochs(cfg: TrainConfig, seconds: float, epoch_seconds: dict[int, float], *,
                limit_text: str | None = None) -> int:
    """The largest epoch count N <= ``cfg.run.epochs`` whose whole schedule (the progressive ramp laid over N, an
    evaluation each epoch, the once-only overhead) fits in ``seconds``. ValueError with the estimate when not even
    one epoch fits (naming ``limit_text``, the limit as the user gave it, else ``seconds``)."""
    if not epoch_seconds:
        raise ValueError("plan_epochs: no measured epoch time")
    best = 0
    for n in range(1, cfg.run.epochs + 1):
        try:
            fits = schedule_seconds(cfg, n, epoch_seconds) <= seconds
        except ValueError:  # e.g. a ramp over n epochs that meets more than 8 sizes: not a count to choose
            continue
        best = n if fits else best
    if best == 0:
        one = schedule_seconds(cfg, 1, epoch_seconds)
        how = epoch_seconds.describe() if isinstance(epoch_seconds, EpochTimes) else \
            ", ".join(f"{s}px {t:.1f}s" for s, t in sorted(epoch_seconds.items()))
        raise ValueError(f"--time-limit {limit_text or format_duration(seconds)} is too short: one epoch takes "
                         f"~{one:.{1 if one < 10 else 0}f} s here (measured {how})")
    return best


def plan_lines(cfg: TrainConfig, epochs: int, limit_s: float, epoch_seconds: EpochTimes) -> list[str]:
    """The plan as printed before training: measured s/epoch per size, the chosen count, the estimated end."""
    est = schedule_seconds(cfg, epochs, epoch_seconds)
    capped = " (the most --epochs allows)" if epochs == cfg.run.epochs else ""
    return [f"time limit {format_duration(limit_s)}: measured {epoch_seconds.describe()}",
            f"time limit: {epochs} epochs{capped}, estimated {format_duration(est)} "
            f"(warmup {fit_to_epochs(cfg, epochs).optim.warmup_epochs:g} epochs)"]


# ---------------------------------------------------------------------------------------------------------------
# Measurement: the benchmark's timing harness on this config's own loader and engine.
# ---------------------------------------------------------------------------------------------------------------

def measure_epoch_seconds(cfg: TrainConfig, *, device=None, steps: int = 3, warmup: int | None = None, repeats: int = 2,
                          eval_batches: int = 2, log: Callable[[str], None] | None = None) -> EpochTimes:
    """Seconds per epoch at each scheduled size (``cfg.resolution_schedule().sizes``): ``len(train loader)`` x the
    median step time of the real loop (this config's loader feeding this config's engine: `Meter.loop_of`,
    ``repeats`` windows of ``steps`` after ``warmup``), plus one evaluation pass (``len(val loader)`` x the time of
    a batch through every evaluated model: the weights, the EMA, TTA). Single process. ``warmup`` None: 2 steps
    with torch.compile (the first compiles), else 1.

    Compile is excluded from the per-epoch figures and counted once per size in ``overhead_s`` (with the time to
    build the engine and loaders), as the run pays it. A dali ``cache`` is not built for the measurement (an
    uncached epoch: conservative, and what the run's first epoch costs).
    """
    import torch

    from convnext_fast.data import build_loader
    from convnext_fast.data.splits import resolve_train_val
    from convnext_fast.engine import build_engine

    t0 = time.perf_counter()
    dev = torch.device(device if device is not None else
                       (cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    d, schedule = cfg.data, cfg.resolution_schedule()
    eval_size = d.eval_img_size or d.img_size
    train_index, val_index = resolve_train_val(d, seed=cfg.run.seed, keep_bad_train=d.skip_bad)
    if len(train_index) < d.batch_size:  # as the run itself would refuse, before building anything
        raise ValueError(f"--batch-size {d.batch_size} is larger than the {len(train_index)} training images")
    common = dict(backend=d.loader, device=dev, seed=cfg.run.seed, num_workers=d.num_workers, crop_pct=d.crop_pct,
                  skip_bad=d.skip_bad)
    engine = build_engine(cfg.model.name, len(train_index.classes), device=dev, speed=cfg.speed, recipe=cfg.recipe,
                          optim=cfg.optim, lr=cfg.optim.resolved_lr(d.batch_size), drop_path=cfg.model.drop_path,
                          seed=cfg.run.seed, num_sizes=len(schedule.sizes))
    warmup = warmup if warmup is not None else (2 if engine.speed.compile else 1)
    per_size, record_sizes, overhead = {}, [], time.perf_counter() - t0
    try:
        for size in schedule.sizes:
            loader = build_loader(train_index, train=True, img_size=size, batch_size=d.batch_size, scale=d.scale,
                                  hflip=d.hflip, randaugment=d.randaugment, reprob=d.reprob, **common)
            with contextlib.closing(loader):
                rec = _measure_train(engine, loader, dev, d.batch_size, steps, warmup, repeats)
            overhead += rec["compile_s"]
            per_size[size] = rec["train_s"]
            record_sizes.append({"img_size": size, **rec})
            if log:
                log(f"time limit: measured {size}px: {rec['step_time_ms']:.1f} ms/step x {len(loader)} steps")
        val_batch = d.eval_batch_size or 2 * d.batch_size
        val = build_loader(val_index, train=False, img_size=eval_size, batch_size=val_batch, **common)
        with contextlib.closing(val):
            eval_s = _measure_eval(engine, val, dev, val_batch, min(eval_batches, len(val)), cfg.recipe.tta)
    finally:
        compiled = engine.speed.compile
        del engine
        if compiled:  # dynamo's graphs of this engine would count against the run's recompile limit
            torch._dynamo.reset()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    record = {"device": str(dev), "steps": steps, "warmup": warmup, "repeats": repeats, "sizes": record_sizes,
              "eval_img_size": eval_size, "eval_s": eval_s, "overhead_s": overhead,
              "measure_s": time.perf_counter() - t0, "compile": "counted once per size in overhead_s"}
    return EpochTimes({s: t + eval_s for s, t in per_size.items()}, overhead, record)


def _measure_train(engine, loader, dev, batch_size: int, steps: int, warmup: int, repeats: int) -> dict:
    """One size: the loader feeding the engine's train step (the benchmark's end-to-end loop meter)."""
    from convnext_fast.benchmark.timing import Meter, endless, interleave

    meter = Meter.loop_of(endless(loader), lambda x, y: engine.train_step(x, y), batch_size=batch_size, device=dev,
                          steps=steps, warmup=warmup, track_memory=False)
    (timing,) = interleave([meter], repeats)
    return {"steps_per_epoch": len(loader), "step_time_ms": timing.step_time_ms,
            "train_s": len(loader) * timing.step_time_ms / 1000,
            "compile_s": timing.warmup_overhead_s if engine.speed.compile else 0.0}


def _measure_eval(engine, val, dev, batch_size: int, batches: int, tta: bool) -> float:
    """Seconds of one evaluation pass: ``len(val)`` x a batch through the weights (+ EMA), with TTA if on."""
    import torch

    from convnext_fast.benchmark.timing import Meter, endless, interleave

    if batches < 1:
        return 0.0
    models = [False] + ([True] if engine.ema is not None else [])

    def step(images, labels):
        with torch.no_grad():
            for use_ema in models:
                engine.eval_logits(images, tta=tta, use_ema=use_ema)
    meter = Meter.loop_of(endless(val), step, batch_size=batch_size, device=dev, steps=batches, warmup=1,
                          track_memory=False)
    (timing,) = interleave([meter], 1)
    return len(val) * timing.step_time_ms / 1000


# ---------------------------------------------------------------------------------------------------------------
# The safety net.
# ---------------------------------------------------------------------------------------------------------------

class DeadlineSink:
    """An epoch sink (`convnext_fast.sinks`) that stops the run at an epoch boundary when the next epoch (and the
    ``finish_s`` kept for writing the results) would end past ``limit_s`` of wall time (this session since
    ``started_at`` + earlier sessions' epochs).

    The next epoch is predicted from the epochs this session ran (`predict`), so a measurement that was wrong is
    caught by what the run actually does.
    """

    name = "time limit"

    def __init__(self, limit_s: float, epoch_seconds: dict[int, float], per_epoch: list[int], *,
                 started_at: float | None = None, clock: Callable[[], float] = time.monotonic, finish_s: float = 0.0):
        self.limit_s, self.epoch_seconds, self.per_epoch = float(limit_s), dict(epoch_seconds), list(per_epoch)
        self.finish_s = float(finish_s)  # kept free after the last epoch (FINISH_S)
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.used_s = 0.0
        self.seen: dict[int, list[float]] = {}  # this session's epoch times per size
        self.stop_reason = ""

    @classmethod
    def from_record(cls, budget: dict, **kw) -> "DeadlineSink":
        """From config.json's "budget" record (what `--resume` reads back)."""
        seconds = {int(s): float(t) for s, t in budget["epoch_seconds"].items()}
        return cls(budget["limit_s"], seconds, budget["per_epoch"], finish_s=budget.get("kept_for_finish_s", 0.0),
                   **kw)

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        if resumed:  # earlier sessions' training time counts against the same limit
            from convnext_fast.run_files import read_jsonl

            self.used_s = sum(r.get("epoch_time_s", 0.0) for r in read_jsonl(Path(run_dir) / "metrics.jsonl"))

    def epoch(self, row: dict) -> bool:
        done = int(row["epoch"])
        this = self.per_epoch[done - 1] if done <= len(self.per_epoch) else None
        if this is not None and row.get("epoch_time_s"):
            self.seen.setdefault(this, []).append(float(row["epoch_time_s"]))
        if done >= len(self.per_epoch):
            return False
        now, predicted = self.used_s + self.clock() - self.started_at, self.predict(self.per_epoch[done])
        if now + predicted + self.finish_s <= self.limit_s:
            return False
        self.stop_reason = (f"time limit {format_duration(self.limit_s)}: epoch {done + 1} would end at "
                            f"~{format_duration(now + predicted)} (--resume with --time-limit off goes past it)")
        return True

    def predict(self, size: int) -> float:
        """The next epoch's seconds at ``size``, from this session's epochs: the median at that size, leaving out
        the first one there (it pays the size's compile) when there are others; else the nearest observed size
        scaled by the measured ratio; else the measurement itself."""
        steady = {s: statistics.median(ts[1:]) for s, ts in self.seen.items() if len(ts) > 1}
        observed = steady or {s: ts[-1] for s, ts in self.seen.items()}
        if not observed:
            return _seconds_at(self.epoch_seconds, size)
        if size in observed:
            return observed[size]
        ref = min(observed, key=lambda s: abs(s - size))
        return observed[ref] * _seconds_at(self.epoch_seconds, size) / _seconds_at(self.epoch_seconds, ref)


def budget_record(limit: str | float, limit_s: float, epochs: int, max_epochs: int, cfg: TrainConfig,
                  epoch_seconds: EpochTimes) -> dict:
    """config.json's "budget": the limit, the measurement, the chosen count and what it replaced."""
    fitted = fit_to_epochs(cfg, epochs)
    return {"time_limit": limit, "limit_s": limit_s, "epochs": epochs, "max_epochs": max_epochs,
            "warmup_epochs": fitted.optim.warmup_epochs, "max_warmup_epochs": cfg.optim.warmup_epochs,
            "estimated_s": schedule_seconds(cfg, epochs, epoch_seconds),
            "epoch_seconds": {str(s): t for s, t in sorted(epoch_seconds.items())},
            "per_epoch": fitted.resolution_schedule().per_epoch, "measurement": epoch_seconds.record}



# Plan against this share of the time left after measuring: the run's own noise is then caught by the plan, and
# the DeadlineSink is left for a measurement that was plainly wrong.
PLAN_SHARE = 0.95
# Kept free after the last epoch for what the run writes then (plots, summary.json, the epoch table) and the
# process's exit: ~10 s measured on a loaded 2-core CPU; negligible against the hours a real budget has.
FINISH_S = 15.0
def apply_time_limit(cfg: TrainConfig, *, resume: bool, started_at: float,
                     log: Callable[[str], None] = print) -> tuple[TrainConfig, dict, list]:
    """`train --time-limit`: (the config laid over the chosen epochs, config.json's "budget", [DeadlineSink]).

    A fresh run measures (`measure_epoch_seconds`), plans (`plan_epochs` on the time left since ``started_at``,
    a `time.monotonic` reading) and prints the plan; too short a limit is a ValueError before any file is
    written. ``resume`` reads the plan back from the run's config.json: the count is never re-measured; the
    deadline counts the earlier sessions' epochs, and with ``time_limit`` None (``--time-limit off``) there is
    none (the record is kept). A resumed run that never had a limit returns (cfg, None, []).
    """
    import json

    if resume:
        path = Path(cfg.run.out) / "config.json"
        budget = json.loads(path.read_text()).get("budget") if path.is_file() else None
        if cfg.run.time_limit is None:  # never had one, or `--time-limit off`: no deadline this session
            if budget:
                log(f"time limit off: continuing the planned {budget['epochs']} epochs without a deadline")
            return cfg, budget, []
        if not budget:
            raise ValueError(f"--time-limit: {path} was started without one; a run's epoch count is fixed when it "
                             "starts (resume without --time-limit)")
        log(f"time limit {format_duration(budget['limit_s'])}: keeping the planned {budget['epochs']} epochs")
        return cfg, budget, [DeadlineSink.from_record(budget, started_at=started_at)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--time-limit: not supported with several processes yet (measure on one, then pass "
                         "--epochs to torchrun)")
    limit_s = parse_duration(cfg.run.time_limit)
    if cfg.run.out:  # before minutes of measuring: a fresh run into a used directory is refused anyway
        from convnext_fast.run_guard import refuse_finished

        refuse_finished(Path(cfg.run.out), resume=False)
    log(f"time limit {format_duration(limit_s)}: measuring this run's throughput ...")
    times = measure_epoch_seconds(cfg)
    spent = time.monotonic() - started_at
    left = limit_s - spent
    try:
        epochs = plan_epochs(cfg, (left - FINISH_S) * PLAN_SHARE, times, limit_text=str(cfg.run.time_limit))
    except ValueError as e:
        raise ValueError(f"{e}; {spent:.1f} s went to starting up and measuring, {FINISH_S:.0f} s are kept for "
                         "writing the results") from None
    for line in plan_lines(cfg, epochs, limit_s, times):
        log(line)
    budget = budget_record(cfg.run.time_limit, limit_s, epochs, cfg.run.epochs, cfg, times)
    budget.update(left_after_measuring_s=left, kept_for_finish_s=FINISH_S, plan_share=PLAN_SHARE)
    fitted = fit_to_epochs(cfg, epochs)
    return fitted, budget, [DeadlineSink.from_record(budget, started_at=started_at)]
