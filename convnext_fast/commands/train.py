"""`convnext-fast train [DATA] [--out RUN_DIR] [flags]`: flags -> TrainConfig -> convnext_fast.train.train.

Every flag defaults to "not given" (argparse.SUPPRESS), so the config precedence holds:
field defaults < --preset < --config FILE < flags given on the command line. Values are parsed here, not by
argparse, so a bad value is a ValueError that the CLI prints as one line (exit 2).
With no DATA (and no --preset, --config or --resume) the demo dataset is built (cached) and --preset demo runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from convnext_fast.config import TrainConfig, build_config, field_doc
from convnext_fast.schedule import parse_ramp


def _number(kind: type) -> Callable[[str, str], Any]:
    def parse(flag: str, text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{flag}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return parse


def _optional(parse: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    def parse_or_off(flag: str, text: str) -> Any:
        return None if text.lower() in ("off", "none", "auto") else parse(flag, text)
    return parse_or_off


def _randaugment(flag: str, text: str) -> tuple[int, int] | None:
    if text.lower() in ("off", "none"):
        return None
    parts = text.split(",")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{flag}: expected N,M (e.g. 2,9) or off, got {text!r}") from None
    return (n, m)


def _text(flag: str, text: str) -> str:
    return text


_INT, _FLOAT = _number(int), _number(float)
# flag -> (section, key, parser or "bool" for --x/--no-x, metavar)
FLAGS: dict[str, tuple[str, str, Any, str | None]] = {
    "--val-split": ("data", "val_split", _FLOAT, "FRACTION"),
    "--loader": ("data", "loader", _text, "dali|torchvision|synthetic"),
    "--img-size": ("data", "img_size", _INT, "PX"),
    "--progressive": ("data", "progressive", _optional(_INT), "START_PX|off"),
    "--ramp": ("data", "ramp", parse_ramp, "START:END|auto"),
    "--res-step": ("data", "res_step", _INT, "PX"),
    "--eval-img-size": ("data", "eval_img_size", _optional(_INT), "PX|auto"),
    "--batch-size": ("data", "batch_size", _INT, "N"),
    "--eval-batch-size": ("data", "eval_batch_size", _INT, "N"),
    "--randaugment": ("data", "randaugment", _randaugment, "N,M|off"),
    "--reprob": ("data", "reprob", _FLOAT, "P"),
    "--hflip": ("data", "hflip", _FLOAT, "P"),
    "--crop-pct": ("data", "crop_pct", _FLOAT, "F"),
    "--workers": ("data", "num_workers", _INT, "N"),
    "--skip-bad-files": ("data", "skip_bad", "bool", None),
    "--verify-images": ("data", "verify_images", "bool", None),
    "--cache": ("data", "cache", _text, "off|auto|device|host"),
    "--cache-size": ("data", "cache_size", _optional(_INT), "PX|off"),
    "--model": ("model", "name", _text, "NAME"),
    "--drop-path": ("model", "drop_path", _FLOAT, "RATE"),
    "--lr": ("optim", "lr", _optional(_FLOAT), "LR|auto"),
    "--weight-decay": ("optim", "weight_decay", _FLOAT, "WD"),
    "--warmup-epochs": ("optim", "warmup_epochs", _FLOAT, "N"),
    "--min-lr": ("optim", "min_lr", _FLOAT, "LR"),
    "--mixup": ("recipe", "mixup", _FLOAT, "ALPHA"),
    "--cutmix": ("recipe", "cutmix", _FLOAT, "ALPHA"),
    "--mixup-prob": ("recipe", "mixup_prob", _FLOAT, "P"),
    "--mixup-switch-prob": ("recipe", "mixup_switch_prob", _FLOAT, "P"),
    "--smoothing": ("recipe", "smoothing", _FLOAT, "S"),
    "--focal-gamma": ("recipe", "focal_gamma", _FLOAT, "GAMMA"),
    "--model-ema": ("recipe", "model_ema", "bool", None),
    "--model-ema-decay": ("recipe", "model_ema_decay", _FLOAT, "DECAY"),
    "--tta": ("recipe", "tta", "bool", None),
    "--compile": ("speed", "compile", "bool", None),
    "--amp": ("speed", "amp", _text, "bf16|fp16|off"),
    "--channels-last": ("speed", "channels_last", "bool", None),
    "--fused-adamw": ("speed", "fused_adamw", "bool", None),
    "--device-mixup": ("speed", "device_mixup", "bool", None),
    "--epochs": ("run", "epochs", _INT, "N"),
    "--seed": ("run", "seed", _INT, "N"),
    "--patience": ("run", "patience", _optional(_INT), "N|off"),
    "--device": ("run", "device", _text, "cuda|cuda:N|cpu"),
    "--out": ("run", "out", _text, "RUN_DIR"),
    "--name": ("run", "name", _text, "NAME"),
    "--log-every": ("run", "log_every", _INT, "STEPS"),
    "--deterministic": ("run", "deterministic", "bool", None),
    "--allow-data-change": ("run", "allow_data_change", "bool", None),
    "--time-limit": ("run", "time_limit", _optional(_text), "DURATION|off"),
}


def _dest(flag: str) -> str:
    return "cfg_" + flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "convnext-fast train [DATA] [--out RUN_DIR] [--preset NAME] [--config FILE] [flags] (see -h)"
    parser.epilog = ("Defaults shown are the built-in ones; a preset and then a --config file replace them, and flags "
                     "given here replace both. --lr auto = 4e-3 x global batch / 4096 (ConvNeXt), weight decay "
                     "unchanged. The resolved config is saved as RUN_DIR/config.json.")
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="image folder with train/ and val/ class folders, or class folders with --val-split; "
                             "omitted: the demo dataset with --preset demo")
    parser.add_argument("--preset", default=None, metavar="NAME", help="seed-recipe | seed-recipe-progressive | demo")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML file with [data] [model] [optim] [recipe] [speed] [run] tables; flags override it")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue RUN_DIR exactly from checkpoints/last.pt (its saved config; flags override)")
    parser.add_argument("--report", action="store_true",
                        help="at the end, write RUN_DIR/report/report.html: the error report of the exported weights")
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for flag, (section, key, parse, metavar) in FLAGS.items():
        group = groups.setdefault(section, parser.add_argument_group(section))
        default = getattr(getattr(defaults, section), key)
        shown = "auto" if default is None and (section == "speed" or key in ("ramp", "eval_img_size")) else default
        shown = "off" if default is None and key == "progressive" else shown
        help_text = f"{field_doc(section, key)} (default: {shown})".replace("%", "%%")
        if parse == "bool":
            group.add_argument(flag, dest=_dest(flag), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The values given on the command line, parsed and nested by config section."""
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key, parse, _) in FLAGS.items():
        if not hasattr(args, _dest(flag)):
            continue
        raw = getattr(args, _dest(flag))
        value = raw if parse == "bool" else parse(flag, raw)
        out.setdefault(section, {})[key] = value
    if args.data is not None:
        out.setdefault("data", {})["path"] = str(args.data)
    return out


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """(config, resume?) from the parsed arguments."""
    flags = flag_overrides(args)
    if args.resume is not None:
        if args.preset or args.config:
            raise ValueError("--resume continues a run with its saved config.json; --preset/--config cannot be added "
                             "(flags can override single values)")
        run_dir = Path(args.resume)
        saved_path = run_dir / "config.json"
        if not saved_path.is_file():
            raise ValueError(f"--resume {run_dir}: no config.json (not a run directory)")
        saved = json.loads(saved_path.read_text())
        saved.pop("resolved", None)
        saved.pop("budget", None)  # the time limit's plan: read back by budget.apply_time_limit, never re-made
        base = TrainConfig.from_dict(saved, source=str(saved_path))
        base.run.allow_data_change = False  # a one-time consent: each resume onto changed data must ask again
        flags.setdefault("run", {})["out"] = str(run_dir)
        return build_config(base=base, flags=flags), True
    preset = args.preset
    if args.data is None and preset is None and args.config is None:
        preset = "demo"  # `convnext-fast train` alone: the CPU demo
    return build_config(preset=preset, config_file=args.config, flags=flags), False


def run(args: argparse.Namespace) -> int:
    started_at = time.monotonic()  # a --time-limit counts from here, before torch is imported
    from convnext_fast.errors import Interrupted, TrainingError
    from convnext_fast.loop import train

    cfg, resume = resolve_config(args)
    budget, sinks = None, []
    if cfg.run.time_limit is not None or resume:  # a resumed run keeps its plan's record even with the limit off
        from convnext_fast.budget import apply_time_limit

        # The limit counts from the command's start: importing, measuring and setting up are in it.
        cfg, budget, sinks = apply_time_limit(cfg, resume=resume, started_at=started_at)
    try:
        summary = train(cfg, resume=resume, sinks=sinks, budget=budget)
        if getattr(args, "report", False) and os.environ.get("RANK", "0") == "0":  # rank 0 alone, after DDP ends
            from convnext_fast.commands.eval import report_after_training
            report_after_training(cfg, summary)
    except Interrupted as e:
        # Rank 0 alone reports (the process group is already gone here, so ask the launcher's environment).
        if os.environ.get("RANK", "0") == "0":
            print(f"convnext-fast train: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingError as e:
        print(f"convnext-fast train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a write outside a checkpoint save (config.json, plots) failed, e.g. a full disk
        if isinstance(e, FileNotFoundError):
            raise
        print(f"convnext-fast train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: abort without saving (the first one is still saving)
        print("convnext-fast train: aborted; checkpoints/last.pt is the last complete checkpoint", file=sys.stderr)
        return 130
    return 0
