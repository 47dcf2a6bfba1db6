"""The search space of `convnext-fast tune`: which recipe knobs vary, their ranges, and how a point becomes a config.

Held fixed (DESIGN.md §7, issue 20): the model, the batch size (it changes speed, not what is reachable; the lr
follows it by the config's scaling rule), the optimizer and the final image size. Searched:

    lr              optim.lr                 log    around the base's resolved lr (x1/4 .. x4)
    weight_decay    optim.weight_decay       log    0.005 .. 0.3
    drop_path       model.drop_path                 0 .. 0.4
    randaugment_m   data.randaugment[1]      int    0 .. 20  (the base's num_ops kept; off in the base = frozen)
    mixup_prob      recipe.mixup_prob               0 .. 1   (a base without Mixup/CutMix gets the ConvNeXt
                                                             alphas 0.8/1.0 when the probability is > 0)
    smoothing       recipe.smoothing                0 .. 0.2
    ema_horizon     recipe.model_ema_decay   log    0.01 .. 0.3 of the run's optimizer steps (EMA off = frozen)

The EMA decay is stated per step count: ``horizon = 1 / (1 - decay)`` as a fraction of the run's steps, so a
value found in a short stage-1 trial means the same averaging window in a long stage-2 run (a fixed decay such
as 0.9998 averages over 5000 steps: all of a short trial, a sliver of a long run).

``--space FILE.toml`` overrides: ``name = [low, high]`` a new range, ``name = value`` frozen at that value.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnext_fast.config import TrainConfig, apply_overrides

# The alphas a base without Mixup/CutMix gets when a trial turns them on (ConvNeXt's ImageNet recipe).
MIX_ALPHAS = (0.8, 1.0)


@dataclass(frozen=True)
class Param:
    """One searched parameter: a range (``value is None``) or frozen at ``value``."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    value: float | None = None

    def suggest(self, trial: Any) -> float:
        if self.value is not None:
            return self.value
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def distribution(self) -> Any:
        import optuna

        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


def default_space(base: TrainConfig) -> dict[str, Param]:
    """The built-in ranges for ``base`` (the lr's around its own resolved lr; EMA/RandAugment frozen when off)."""
    lr = base.optim.resolved_lr(base.data.batch_size)
    space = {
        "lr": Param("lr", lr / 4, lr * 4, log=True),
        "weight_decay": Param("weight_decay", 0.005, 0.3, log=True),
        "drop_path": Param("drop_path", 0.0, 0.4),
        "randaugment_m": Param("randaugment_m", 0, 20, integer=True),
        "mixup_prob": Param("mixup_prob", 0.0, 1.0),
        "smoothing": Param("smoothing", 0.0, 0.2),
        "ema_horizon": Param("ema_horizon", 0.01, 0.3, log=True),
    }
    if base.data.randaugment is None:
        space.pop("randaugment_m")
    if not base.recipe.model_ema:
        space.pop("ema_horizon")
    return space


def load_space(base: TrainConfig, path: str | Path | None, total_steps: int) -> dict[str, Param]:
    """The space for ``base``, with ``path``'s overrides; every bound checked against the config's own limits.

    Raises ValueError naming the file and the parameter for an unknown name, an empty range, a non-number.
    """
    space = default_space(base)
    if path is None:
        return space
    p = Path(path)
    try:
        with p.open("rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--space: file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--space {p}: invalid TOML: {e}") from None
    known = default_space(dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, model_ema=True),
                                              data=dataclasses.replace(base.data, randaugment=(2, 9))))
    for name, spec in table.items():
        if name not in known:
            raise ValueError(f"--space {p}: unknown parameter {name!r} (known: {', '.join(known)})")
        if name == "ema_horizon" and not base.recipe.model_ema:
            raise ValueError(f"--space {p}: ema_horizon needs the EMA on in the base recipe (--model-ema)")
        if name == "randaugment_m" and base.data.randaugment is None:
            raise ValueError(f"--space {p}: randaugment_m needs RandAugment on in the base recipe (--randaugment N,M)")
        ref = known[name]
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            space[name] = dataclasses.replace(ref, value=int(spec) if ref.integer else float(spec))
            bounds = (spec,)
        elif isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in spec):
            low, high = spec
            if not low < high:
                raise ValueError(f"--space {p}: {name} range [{low}, {high}] is empty (low must be below high; "
                                 f"a single value freezes it: {name} = {low})")
            if ref.log and low <= 0:
                raise ValueError(f"--space {p}: {name} is searched on a log scale: low must be > 0, got {low}")
            if ref.integer and (low != int(low) or high != int(high)):
                raise ValueError(f"--space {p}: {name} takes integers, got [{low}, {high}]")
            space[name] = dataclasses.replace(ref, low=low, high=high)
            bounds = (low, high)
        else:
            raise ValueError(f"--space {p}: {name} must be [low, high] or a single number, got {spec!r}")
        for v in bounds:  # the config's own checks, before any trial runs
            apply_params(base, {name: v}, total_steps, source=f"--space {p}: {name} = {v}")
    return space


def apply_params(cfg: TrainConfig, params: dict[str, float], total_steps: int, source: str = "tune") -> TrainConfig:
    """``cfg`` with a trial's ``params``; ``total_steps`` (optimizer steps of this run) turns ema_horizon into a decay."""
    o: dict[str, dict[str, Any]] = {}
    for name, v in params.items():
        if name == "lr":
            o.setdefault("optim", {})["lr"] = float(v)
        elif name == "weight_decay":
            o.setdefault("optim", {})["weight_decay"] = float(v)
        elif name == "drop_path":
            o.setdefault("model", {})["drop_path"] = float(v)
        elif name == "randaugment_m":
            o.setdefault("data", {})["randaugment"] = ((cfg.data.randaugment or (2, 9))[0], int(v))
        elif name == "mixup_prob":
            r = o.setdefault("recipe", {})
            r["mixup_prob"] = float(v)
            if v > 0 and cfg.recipe.mixup == 0 and cfg.recipe.cutmix == 0:
                r["mixup"], r["cutmix"] = MIX_ALPHAS
        elif name == "smoothing":
            o.setdefault("recipe", {})["smoothing"] = float(v)
        elif name == "ema_horizon":
            o.setdefault("recipe", {})["model_ema_decay"] = ema_decay(float(v), total_steps)
        else:
            raise ValueError(f"{source}: unknown parameter {name!r}")
    return apply_overrides(cfg, o, source)


def ema_decay(horizon: float, total_steps: int) -> float:
    """The per-step EMA decay whose window ``1 / (1 - decay)`` is ``horizon`` of ``total_steps``."""
    window = max(horizon * total_steps, 1.0 + 1e-6)
    return 1.0 - 1.0 / window


def base_params(cfg: TrainConfig, space: dict[str, Param], total_steps: int) -> dict[str, float]:
    """The point of the space that ``cfg`` itself is (what the enqueued default trial records)."""
    out: dict[str, float] = {}
    for name in space:
        if name == "lr":
            out[name] = cfg.optim.resolved_lr(cfg.data.batch_size)
        elif name == "weight_decay":
            out[name] = cfg.optim.weight_decay
        elif name == "drop_path":
            out[name] = cfg.model.drop_path
        elif name == "randaugment_m":
            out[name] = int(cfg.data.randaugment[1]) if cfg.data.randaugment else 0
        elif name == "mixup_prob":
            out[name] = cfg.recipe.mixup_prob if (cfg.recipe.mixup or cfg.recipe.cutmix) else 0.0
        elif name == "smoothing":
            out[name] = cfg.recipe.smoothing
        elif name == "ema_horizon":
            out[name] = 1.0 / ((1.0 - cfg.recipe.model_ema_decay) * max(total_steps, 1))
    return out


def describe(space: dict[str, Param]) -> str:
    parts = []
    for p in space.values():
        if p.value is not None:
            parts.append(f"{p.name}={p.value:g} (frozen)")
        else:
            parts.append(f"{p.name} {p.low:g}..{p.high:g}{' log' if p.log else ''}")
    return ", ".join(parts)


def fmt(name: str, v: float) -> str:
    """A parameter value for a table cell."""
    if name == "randaugment_m":
        return str(int(v))
    return f"{v:.3g}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e3) else f"{v:.3f}".rstrip("0").rstrip(".") or "0"
