"""Typed, strict, documented training configuration.

One dataclass per concern (data, model, optim, recipe, speed, run); each component receives only its own
section. Every field has a type, a default and a one-line doc (``metadata["doc"]``, reused as the ``--help``
text). A value is resolved with this precedence, lowest first::

    field defaults  <  --preset NAME  <  --config FILE (TOML)  <  explicit command-line flags

An unknown key or a value of the wrong type/range is a ``ValueError`` that names it (a misspelt key is never
silently dropped). ``TrainConfig.to_dict()`` is what a run saves as ``config.json``; ``from_dict`` reads it back
(used by ``--resume``).

Learning-rate scaling (ConvNeXt paper, Liu et al. 2022: AdamW, lr 4e-3 at batch 4096, weight decay 0.05)::

    lr = ref_lr * global_batch / ref_batch          # linear scaling rule (Goyal et al. 2017)
                                                     # e.g. batch 256: 4e-3 * 256 / 4096 = 2.5e-4
    weight_decay = 0.05                              # unchanged, see below

PyTorch's AdamW decays ``p -= lr * weight_decay * p`` every step. With the lr scaled by ``B/4096`` and
``4096/B`` times as many steps per epoch, the decay applied per epoch (``steps * lr * wd``) is already the
paper's; scaling ``weight_decay`` as well would count the batch ratio twice. So only the lr is scaled; an
explicit ``--lr`` disables the scaling.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convnext_fast.schedule import ResolutionSchedule

LOADERS = ("dali", "torchvision", "synthetic")
CACHE_MODES = ("off", "auto", "device", "host")
AMP_MODES = ("bf16", "fp16", "off")


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataConfig:
    path: str | None = _f(None, "dataset root: train/ and val/ class folders, or class folders with val_split; "
                                "None = the bundled demo dataset")
    val_split: float | None = _f(None, "fraction of each class held out for validation (stratified, seeded) when "
                                       "the root has no train/ and val/")
    loader: str = _f("dali", "data backend: dali | torchvision | synthetic")
    img_size: int = _f(224, "training image size in pixels (the final one with progressive); also the "
                            "evaluation size unless eval_img_size is set")
    progressive: int | None = _f(None, "progressive resolution: start training at this size and ramp linearly to "
                                       "img_size (FFCV-style); None = fixed img_size")
    ramp: tuple[int, int] | None = _f(None, "progressive ramp START:END in epochs (1-based): START epochs at the "
                                            "start size, the final size from END on; None = FFCV's proportions "
                                            "3/4:7/8 of the run (their 88-epoch ResNet-50: 65->76)")
    res_step: int = _f(32, "progressive sizes are rounded to a multiple of this (at most 8 distinct sizes)")
    eval_img_size: int | None = _f(None, "evaluation size during training; None = the final training size")
    batch_size: int = _f(128, "images per step per process (global batch = batch_size * world size)")
    eval_batch_size: int | None = _f(None, "images per evaluation batch; None = 2 * batch_size")
    randaugment: tuple[int, int] | None = _f((2, 9), "RandAugment (num_ops, magnitude 0..30); None = off")
    reprob: float = _f(0.0, "random-erasing probability per image")
    hflip: float = _f(0.5, "horizontal-flip probability per image")
    scale: tuple[float, float] = _f((0.08, 1.0), "random-resized-crop area range")
    crop_pct: float = _f(0.875, "eval center-crop fraction: resize to img_size / crop_pct, then crop")
    num_workers: int | None = _f(None, "loader worker threads/processes; None = backend default")
    skip_bad: bool = _f(False, "exclude bad image files found by the preflight scan (their number is logged)")
    verify_images: bool = _f(False, "preflight also decodes every image (slower); the cheap checks always run")
    cache: str = _f("off", "dali loader: decode every image once, keep the pixels, later epochs only augment: "
                           "off | device | host | auto (device, else host, else off, by free memory)")
    cache_size: int | None = _f(None, "cache images resized to fit NxN (aspect kept); None = as stored "
                                      "(sizes must be alike: at most half the cache may be padding)")


@dataclass
class ModelConfig:
    name: str = _f("convnext_tiny", "any timm model name (created with pretrained=False)")
    drop_path: float = _f(0.0, "stochastic-depth rate")


@dataclass
class OptimConfig:
    lr: float | None = _f(None, "peak learning rate; None = ref_lr * global_batch / ref_batch")
    ref_lr: float = _f(4e-3, "reference lr for the linear scaling rule (ConvNeXt paper)")
    ref_batch: int = _f(4096, "global batch at which ref_lr applies (ConvNeXt paper)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to norms, biases, other 1-D params)")
    warmup_epochs: float = _f(5.0, "linear warmup length in epochs, then cosine decay")
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")

    def resolved_lr(self, global_batch: int) -> float:
        """The peak lr for this global batch: the explicit ``lr``, else linearly scaled ``ref_lr``."""
        return self.lr if self.lr is not None else self.ref_lr * global_batch / self.ref_batch


@dataclass
class RecipeConfig:
    mixup: float = _f(0.0, "Mixup alpha; 0 = off")
    cutmix: float = _f(0.0, "CutMix alpha; 0 = off")
    mixup_prob: float = _f(1.0, "probability of applying Mixup or CutMix to a batch")
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of Mixup when both are on")
    smoothing: float = _f(0.1, "label smoothing")
    focal_gamma: float = _f(0.0, "focal-loss gamma on (soft) targets; 0 = soft-target cross-entropy")
    model_ema: bool = _f(False, "keep an exponential moving average of the weights (evaluated and exported)")
    model_ema_decay: float = _f(0.9998, "EMA decay (reached after timm's warmup)")
    tta: bool = _f(False, "evaluate with horizontal-flip test-time augmentation (mean of both logits)")


@dataclass
class SpeedConfig:
    compile: bool | None = _f(None, "torch.compile the training module; None = on with CUDA")
    amp: str | None = _f(None, "autocast dtype: bf16 | fp16 (with GradScaler) | off; None = bf16 on CUDA, off on CPU")
    channels_last: bool = _f(True, "channels-last memory format for model and images")
    fused_adamw: bool | None = _f(None, "fused AdamW kernel; None = fused on CUDA; False = "
                                        "multi-tensor foreach AdamW (PyTorch's default)")
    device_mixup: bool = _f(True, "batched Mixup/CutMix on the device without host sync; False = timm's Mixup "
                                  "(host-drawn lambda, the usual timm loop)")
    ema: bool = _f(True, "EMA update with foreach ops (timm ModelEmaV3); False = one tensor at a time")

    def resolve(self, device_type: str) -> "SpeedConfig":
        """Replace the ``None`` (auto) fields by their value for ``device_type`` ("cuda" or "cpu")."""
        cuda = device_type == "cuda"
        return dataclasses.replace(
            self,
            compile=cuda if self.compile is None else self.compile,
            amp=("bf16" if cuda else "off") if self.amp is None else self.amp,
            fused_adamw=cuda if self.fused_adamw is None else self.fused_adamw,
        )


@dataclass
class RunConfig:
    epochs: int = _f(100, "number of training epochs")
    seed: int = _f(0, "seed for data order, augmentation, initialization and Mixup")
    patience: int | None = _f(None, "stop after this many epochs without a better validation top-1; None = off")
    device: str | None = _f(None, "cuda | cpu | cuda:N; None = cuda when available")
    out: str | None = _f(None, "run directory; None = runs/<name or timestamp>")
    name: str | None = _f(None, "run name used for the default run directory")
    log_every: int = _f(50, "steps between host syncs for loss logging and the non-finite check")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms (slower; bitwise-repeatable on one device)")
    allow_data_change: bool = _f(False, "--resume continues even if the image files changed since the checkpoint "
                                        "(no longer an exact resume); without it such a resume is refused")
    time_limit: float | str | None = _f(None, "wall-time budget (8h, 90m, 1h30m, seconds): the epoch count (at most "
                                              "epochs) is fixed up front from measured throughput; None = off")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                             "recipe": RecipeConfig, "speed": SpeedConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def resolution_schedule(self) -> ResolutionSchedule:
        """The training size per epoch (data.img_size / progressive / ramp / res_step, run.epochs); validated."""
        d = self.data
        return ResolutionSchedule(img_size=d.img_size, epochs=self.run.epochs, start_size=d.progressive,
                                  ramp=d.ramp, res_step=d.res_step)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a nested dict such as a saved config.json; unknown keys raise ValueError."""
        return apply_overrides(cls(), d, source)


# The reference user's final recipe (see the module docstring for the lr / weight-decay scaling).
_SEED_RECIPE: dict[str, dict[str, Any]] = {
    "data": {"img_size": 192, "batch_size": 256, "randaugment": (2, 9), "hflip": 0.5, "reprob": 0.25},
    "model": {"name": "convnext_tiny", "drop_path": 0.1},
    "optim": {"lr": None, "weight_decay": 0.05, "warmup_epochs": 5.0, "min_lr": 1e-6},
    "recipe": {"mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "smoothing": 0.05,
               "focal_gamma": 2.0, "model_ema": True, "model_ema_decay": 0.9998, "tta": True},
    "run": {"epochs": 150, "patience": 20},
}

# Presets: nested overrides applied on top of the field defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "seed-recipe": _SEED_RECIPE,
    # seed-recipe trained at 128 px for most of the run, ramped to 192 near the end (FFCV's proportions: epochs
    # 1-112 at 128, 192 from 131 on); evaluated at 192. Projected step compute: ~0.55x of fixed 192 (README).
    "seed-recipe-progressive": {**_SEED_RECIPE, "data": {**_SEED_RECIPE["data"], "progressive": 128}},
    # The CPU demo: the bundled demo dataset (21 colour-pair classes, 4200 train / 630 val images), >= 90% val
    # top-1 within 5 minutes on 2 cores. Measured (`convnext-fast train`, shared 2-core EPYC, load ~1.5): 94.4% after
    # 8 epochs in 2:57 including building the dataset (20 s); 10 epochs reach 97.9% but need ~3.5-4 min on a busy
    # machine. Eager fp32: compile and bf16 do not pay for themselves on this CPU.
    "demo": {
        "data": {"loader": "dali", "img_size": 48, "batch_size": 32, "randaugment": None, "hflip": 0.5,
                 "reprob": 0.0, "scale": (0.35, 1.0)},
        "model": {"name": "convnext_atto", "drop_path": 0.0},
        "optim": {"lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1.0, "min_lr": 1e-5},
        "recipe": {"mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1, "focal_gamma": 0.0, "model_ema": False,
                   "tta": False},
        "speed": {"compile": False, "amp": "off"},
        "run": {"epochs": 8, "log_every": 20},
    },
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - internal invariant: only the types above are used in the dataclasses
        raise AssertionError(f"unsupported config type {tp}")
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of ``cfg`` with nested ``overrides`` ({section: {key: value}}) applied and validated.

    ``source`` names where the values came from (a preset, a file, "command line") in error messages.
    """
    new = {name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS}
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ValueError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table of key = value")
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in hints:
                raise ValueError(f"{source}: unknown key {section}.{key!r} "
                                 f"(known: {', '.join(f.name for f in dataclasses.fields(cls))})")
            setattr(new[section], key, _coerce(value, hints[key], f"{source}: {section}.{key}"))
    out = TrainConfig(**new)
    validate(out, source)
    return out


def _check(ok: bool, source: str, key: str, value: Any, must: str) -> None:
    if not ok:
        raise ValueError(f"{source}: {key} must be {must}, got {value!r}")


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Range and choice checks that the type annotations cannot express."""
    d, m, o, r, s, run = cfg.data, cfg.model, cfg.optim, cfg.recipe, cfg.speed, cfg.run
    _check(d.loader in LOADERS, source, "data.loader", d.loader, "one of " + ", ".join(LOADERS))
    _check(d.val_split is None or 0.0 < d.val_split < 1.0, source, "data.val_split", d.val_split, "in (0, 1)")
    _check(d.img_size >= 16, source, "data.img_size", d.img_size, ">= 16")
    _check(d.eval_img_size is None or d.eval_img_size >= 16, source, "data.eval_img_size", d.eval_img_size, ">= 16")
    _check(d.batch_size >= 1, source, "data.batch_size", d.batch_size, ">= 1")
    _check(d.eval_batch_size is None or d.eval_batch_size >= 1, source, "data.eval_batch_size",
           d.eval_batch_size, ">= 1")
    ra = d.randaugment
    _check(ra is None or (ra[0] >= 0 and 0 <= ra[1] <= 30), source, "data.randaugment", ra,
           "N,M with N >= 0 and 0 <= M <= 30")
    for key in ("reprob", "hflip"):
        _check(0.0 <= getattr(d, key) <= 1.0, source, f"data.{key}", getattr(d, key), "in [0, 1]")
    _check(0.0 < d.scale[0] <= d.scale[1] <= 1.0, source, "data.scale", d.scale, "0 < min <= max <= 1")
    _check(0.0 < d.crop_pct <= 1.0, source, "data.crop_pct", d.crop_pct, "in (0, 1]")
    _check(d.num_workers is None or d.num_workers >= 0, source, "data.num_workers", d.num_workers, ">= 0")
    _check(d.cache in CACHE_MODES, source, "data.cache", d.cache, "one of " + ", ".join(CACHE_MODES))
    _check(d.cache_size is None or d.cache_size >= 8, source, "data.cache_size", d.cache_size, ">= 8")
    _check(bool(m.name), source, "model.name", m.name, "a timm model name")
    _check(0.0 <= m.drop_path < 1.0, source, "model.drop_path", m.drop_path, "in [0, 1)")
    _check(o.lr is None or o.lr > 0, source, "optim.lr", o.lr, "> 0")
    _check(o.ref_lr > 0 and o.ref_batch >= 1, source, "optim.ref_lr/ref_batch", (o.ref_lr, o.ref_batch), "> 0")
    _check(o.weight_decay >= 0, source, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(o.warmup_epochs >= 0, source, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
    _check(o.min_lr >= 0, source, "optim.min_lr", o.min_lr, ">= 0")
    _check(all(0.0 <= b < 1.0 for b in o.betas), source, "optim.betas", o.betas, "in [0, 1)")
    for key in ("mixup", "cutmix", "focal_gamma"):
        _check(getattr(r, key) >= 0, source, f"recipe.{key}", getattr(r, key), ">= 0")
    for key in ("mixup_prob", "mixup_switch_prob"):
        _check(0.0 <= getattr(r, key) <= 1.0, source, f"recipe.{key}", getattr(r, key), "in [0, 1]")
    _check(0.0 <= r.smoothing < 1.0, source, "recipe.smoothing", r.smoothing, "in [0, 1)")
    _check(0.0 < r.model_ema_decay < 1.0, source, "recipe.model_ema_decay", r.model_ema_decay, "in (0, 1)")
    _check(s.amp is None or s.amp in AMP_MODES, source, "speed.amp", s.amp, "one of " + ", ".join(AMP_MODES))
    _check(run.epochs >= 1, source, "run.epochs", run.epochs, ">= 1")
    _check(run.patience is None or run.patience >= 1, source, "run.patience", run.patience, ">= 1")
    _check(run.log_every >= 1, source, "run.log_every", run.log_every, ">= 1")
    _check(run.device is None or run.device.split(":")[0] in ("cpu", "cuda"), source, "run.device", run.device,
           "cpu, cuda or cuda:N")
    if run.time_limit is not None:
        from convnext_fast.budget import parse_duration  # config -> budget -> config: imported when used

        parse_duration(run.time_limit, f"{source}: run.time_limit")
    try:
        cfg.resolution_schedule()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if (r.mixup > 0 or r.cutmix > 0) and d.batch_size % 2:
        raise ValueError(f"{source}: data.batch_size must be even with Mixup/CutMix (pairs are mixed), "
                         f"got {d.batch_size}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file: tables named like the sections, plus an optional top-level ``preset``."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--config: file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {p}: invalid TOML: {e}") from None


def build_config(*, preset: str | None = None, config_file: str | Path | None = None,
                 flags: dict[str, dict[str, Any]] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Resolve a config: ``base`` (defaults) < preset < config file < flags.

    ``flags`` holds only the values the user gave explicitly, nested by section. A ``preset`` key at the top of
    the config file is used when no ``preset`` argument is given.
    """
    cfg = base if base is not None else TrainConfig()
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = dict(load_toml(config_file))
        file_preset = file_values.pop("preset", None)
        if file_preset is not None and not isinstance(file_preset, str):
            raise ValueError(f"config file {config_file}: preset must be a string, got {file_preset!r}")
        preset = preset or file_preset
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        cfg = apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if file_values:
        cfg = apply_overrides(cfg, file_values, f"config file {config_file}")
    if flags:
        cfg = apply_overrides(cfg, flags, "command line")
    return cfg


def field_doc(section: str, key: str) -> str:
    """The one-line doc of ``section.key`` (used as --help text)."""
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.metadata["doc"]
    raise KeyError(f"{section}.{key}")

