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

import gc
import math
import re
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


def plan_epochs(cfg: TrainConfig, seconds: float, epoch_seconds: dict[int, float]) -> int:
    """The largest epoch count N <= ``cfg.run.epochs`` whose whole schedule (the progressive ramp laid over N, an
    evaluation each epoch, the once-only overhead) fits in ``seconds``. ValueError with the estimate when not even
    one epoch fits."""
    if not epoch_seconds:
        raise ValueError("plan_epochs: no measured epoch time")
    best = 0
    for n in range(1, cfg.run.epochs + 1):
        if schedule_seconds(cfg, n, epoch_seconds) <= seconds:
            best = n
    if best == 0:
        one = schedule_seconds(cfg, 1, epoch_seconds)
        how = epoch_seconds.describe() if isinstance(epoch_seconds, EpochTimes) else \
            ", ".join(f"{s}px {t:.1f}s" for s, t in sorted(epoch_seconds.items()))
        raise ValueError(f"--time-limit {format_duration(seconds)} is too short: one epoch takes "
                         f"~{one:.0f} s here (measured {how})")
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

    from convnext_fast.benchmark.timing import Meter, endless, interleave
    from convnext_fast.data import build_loader
    from convnext_fast.data.splits import resolve_train_val
    from convnext_fast.engine import build_engine

    t0 = time.perf_counter()
    dev = torch.device(device if device is not None else
                       (cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    d, schedule = cfg.data, cfg.resolution_schedule()
    eval_size = d.eval_img_size or d.img_size
    train_index, val_index = resolve_train_val(d, seed=cfg.run.seed, keep_bad_train=d.skip_bad)
    common = dict(backend=d.loader, device=dev, seed=cfg.run.seed, num_workers=d.num_workers, crop_pct=d.crop_pct,
                  skip_bad=d.skip_bad)
    engine = build_engine(cfg.model.name, len(train_index.classes), device=dev, speed=cfg.speed, recipe=cfg.recipe,
                          optim=cfg.optim, lr=cfg.optim.resolved_lr(d.batch_size), drop_path=cfg.model.drop_path,
                          seed=cfg.run.seed, num_sizes=len(schedule.sizes))
    warmup = warmup if warmup is not None else (2 if engine.speed.compile else 1)
    per_size, record_sizes, overhead = {}, [], time.perf_counter() - t0
    loaders = []
    try:
        for size in schedule.sizes:
            loader = build_loader(train_index, train=True, img_size=size, batch_size=d.batch_size, scale=d.scale,
                                  hflip=d.hflip, randaugment=d.randaugment, reprob=d.reprob, **common)
            loaders.append(loader)
            if len(loader) == 0:
                raise ValueError(f"--batch-size {d.batch_size} is larger than the {len(train_index)} training images")
            meter = Meter.loop_of(endless(loader), lambda x, y: engine.train_step(x, y), batch_size=d.batch_size,
                                  device=dev, steps=steps, warmup=warmup, track_memory=False)
            (timing,) = interleave([meter], repeats)
            train_s = len(loader) * timing.step_time_ms / 1000
            compile_s = timing.warmup_overhead_s if engine.speed.compile else 0.0
            overhead += compile_s
            per_size[size] = train_s
            record_sizes.append({"img_size": size, "steps_per_epoch": len(loader), "step_time_ms": timing.step_time_ms,
                                 "train_s": train_s, "compile_s": compile_s})
            if log:
                log(f"time limit: measured {size}px: {timing.step_time_ms:.1f} ms/step x {len(loader)} steps")
            loader.close()
        val = build_loader(val_index, train=False, img_size=eval_size,
                           batch_size=d.eval_batch_size or 2 * d.batch_size, **common)
        loaders.append(val)
        eval_s = _measure_eval(cfg, engine, val, dev, min(eval_batches, len(val)), Meter, endless, interleave)
    finally:
        for loader in loaders:
            loader.close()
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    record = {"device": str(dev), "steps": steps, "warmup": warmup, "repeats": repeats, "sizes": record_sizes,
              "eval_img_size": eval_size, "eval_s": eval_s, "overhead_s": overhead,
              "measure_s": time.perf_counter() - t0, "compile": "counted once per size in overhead_s"}
    return EpochTimes({s: t + eval_s for s, t in per_size.items()}, overhead, record)


def _measure_eval(cfg: TrainConfig, engine, val, dev, batches: int, Meter, endless, interleave) -> float:
    """Seconds of one evaluation pass: ``len(val)`` x a batch through the weights (+ EMA), with TTA if on."""
    import torch

    if batches < 1:
        return 0.0
    models = [False] + ([True] if engine.ema is not None else [])

    def step(images, labels):
        with torch.no_grad():
            for use_ema in models:
                engine.eval_logits(images, tta=cfg.recipe.tta, use_ema=use_ema)
    meter = Meter.loop_of(endless(val), step, batch_size=cfg.data.eval_batch_size or 2 * cfg.data.batch_size,
                          device=dev, steps=batches, warmup=1, track_memory=False)
    (timing,) = interleave([meter], 1)
    return len(val) * timing.step_time_ms / 1000


# ---------------------------------------------------------------------------------------------------------------
# The safety net.
# ---------------------------------------------------------------------------------------------------------------

class DeadlineSink:
    """An epoch sink (`convnext_fast.sinks`) that stops the run at an epoch boundary when the next epoch would end
    past ``limit_s`` of training wall time (this session since ``started_at`` + earlier sessions' epochs).

    The next epoch is predicted from the epoch just finished (its ``epoch_time_s``, scaled by the measured ratio
    of the two sizes' times), so a measurement that was wrong is caught by what the run actually does.
    """

    name = "time limit"

    def __init__(self, limit_s: float, epoch_seconds: dict[int, float], per_epoch: list[int], *,
                 started_at: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.limit_s, self.epoch_seconds, self.per_epoch = float(limit_s), dict(epoch_seconds), list(per_epoch)
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.used_s = 0.0
        self.stop_reason = ""

    @classmethod
    def from_record(cls, budget: dict, **kw) -> "DeadlineSink":
        """From config.json's "budget" record (what `--resume` reads back)."""
        seconds = {int(s): float(t) for s, t in budget["epoch_seconds"].items()}
        return cls(budget["limit_s"], seconds, budget["per_epoch"], **kw)

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        if resumed:  # earlier sessions' training time counts against the same limit
            from convnext_fast.run_files import read_jsonl

            self.used_s = sum(r.get("epoch_time_s", 0.0) for r in read_jsonl(Path(run_dir) / "metrics.jsonl"))

    def epoch(self, row: dict) -> bool:
        done = int(row["epoch"])
        if done >= len(self.per_epoch):
            return False
        now, this, nxt = self.used_s + self.clock() - self.started_at, self.per_epoch[done - 1], self.per_epoch[done]
        ratio = _seconds_at(self.epoch_seconds, nxt) / _seconds_at(self.epoch_seconds, this)
        predicted = float(row.get("epoch_time_s") or _seconds_at(self.epoch_seconds, this)) * ratio
        if now + predicted <= self.limit_s:
            return False
        self.stop_reason = (f"time limit {format_duration(self.limit_s)}: epoch {done + 1} would end at "
                            f"~{format_duration(now + predicted)}")
        return True


def budget_record(limit: str | float, limit_s: float, epochs: int, max_epochs: int, cfg: TrainConfig,
                  epoch_seconds: EpochTimes) -> dict:
    """config.json's "budget": the limit, the measurement, the chosen count and what it replaced."""
    fitted = fit_to_epochs(cfg, epochs)
    return {"time_limit": limit, "limit_s": limit_s, "epochs": epochs, "max_epochs": max_epochs,
            "warmup_epochs": fitted.optim.warmup_epochs, "max_warmup_epochs": cfg.optim.warmup_epochs,
            "estimated_s": schedule_seconds(cfg, epochs, epoch_seconds),
            "epoch_seconds": {str(s): t for s, t in sorted(epoch_seconds.items())},
            "per_epoch": fitted.resolution_schedule().per_epoch, "measurement": epoch_seconds.record}

