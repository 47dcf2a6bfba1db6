"""`convnext-fast tune DATA --out STUDY_DIR --time-limit 8h [train's flags]`: flags -> options -> tune.session.run.

`train`'s own flags (--img-size, --epochs, --device, --config, --preset, ...) set the base recipe that the search
varies; train's --workers (loader workers) is --loader-workers here, since --workers counts tune's worker
processes. The logic lives in convnext_fast/tune/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from convnext_fast.commands import train as train_cmd
from convnext_fast.config import build_config, field_doc

_OWN = {"--workers", "--out", "--name", "--time-limit"}  # train flags that mean something else (or nothing) here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("convnext-fast tune DATA --out STUDY_DIR (--time-limit 8h | --trials N) [--preset NAME] "
                    "[--space FILE.toml] [--workers N] [--storage URL] [train's flags] | tune --resume STUDY_DIR")
    parser.epilog = ("Stage 1 runs short low-resolution trials (pruned by successive halving), stage 2 the best "
                     "--finalists at full fidelity (the base's size and epochs; its time is reserved up front), then "
                     "the winner and the default with a second seed. Writes STUDY_DIR/leaderboard.csv, best.toml "
                     "(convnext-fast train --config best.toml) and report.html.")
    parser.add_argument("data", nargs="?", default=None, metavar="DATA", help="image folder (as for train)")
    t = parser.add_argument_group("tune")
    t.add_argument("--out", default=None, metavar="STUDY_DIR", help="the study directory (trials/, report.html, ...)")
    t.add_argument("--time-limit", default=None, metavar="DURATION",
                   help="wall time for the whole study, e.g. 8h, 90m (stage 2 reserved up front; a running trial "
                        "stops at an epoch boundary when it is up)")
    t.add_argument("--trials", default=None, metavar="N", help="stage-1 trials at most (with or without --time-limit)")
    t.add_argument("--trial-epochs", default=None, metavar="N",
                   help="epochs of a stage-1 trial (default: an eighth of --epochs, at least 3)")
    t.add_argument("--finalists", default="3", metavar="K", help="stage-1 trials re-run at full fidelity (default 3)")
    t.add_argument("--space", default=None, metavar="FILE.toml",
                   help="override ranges (name = [low, high]) or freeze (name = value) of the searched parameters")
    t.add_argument("--workers", default="1", metavar="N",
                   help="worker processes on this machine: one per GPU; on a CPU they split the cores (default 1)")
    t.add_argument("--storage", default=None, metavar="URL",
                   help="shared Optuna storage, e.g. postgresql://user@host/db, for workers on several machines "
                        "(default: a journal file in STUDY_DIR)")
    t.add_argument("--resume", default=None, metavar="STUDY_DIR", help="continue an interrupted study")
    parser.add_argument("--preset", default=None, metavar="NAME", help="base recipe preset (as for train)")
    parser.add_argument("--config", default=None, metavar="FILE", help="base recipe TOML (as for train)")
    parser.add_argument("--loader-workers", dest=train_cmd._dest("--workers"), default=argparse.SUPPRESS,
                        metavar="N", help=field_doc("data", "num_workers"))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (section, key, parse, metavar) in train_cmd.FLAGS.items():
        if flag in _OWN:
            continue
        group = groups.setdefault(section, parser.add_argument_group(f"base recipe: {section}"))
        help_text = field_doc(section, key).replace("%", "%%")
        if parse == "bool":
            group.add_argument(flag, dest=train_cmd._dest(flag), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=train_cmd._dest(flag), default=argparse.SUPPRESS, metavar=metavar,
                               help=help_text)


def _int(flag: str, text: str | None, low: int = 1) -> int | None:
    if text is None:
        return None
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"{flag}: expected an integer, got {text!r}") from None
    if v < low:
        raise ValueError(f"{flag}: must be >= {low}, got {v}")
    return v


def run(args: argparse.Namespace) -> int:
    import time
    started_at = time.time()  # --time-limit counts from the command's start (measuring and planning in it)
    from convnext_fast.budget import parse_duration
    from convnext_fast.tune.session import TuneOptions, run as run_study

    limit = parse_duration(args.time_limit, flag="--time-limit") if args.time_limit else None
    common = dict(time_limit_s=limit, time_limit_text=args.time_limit, workers=_int("--workers", args.workers),
                  storage=args.storage, trials=_int("--trials", args.trials),
                  trial_epochs=_int("--trial-epochs", args.trial_epochs), finalists=_int("--finalists", args.finalists),
                  space_file=args.space, started_at=started_at)
    if args.resume is not None:
        if args.data or args.out or args.preset or args.config:
            raise ValueError("--resume STUDY_DIR continues a study with its saved plan; DATA, --out, --preset and "
                             "--config cannot be added")
        return run_study(TuneOptions(study_dir=Path(args.resume).resolve(), resume=True, **common))
    if args.out is None:
        raise ValueError("--out STUDY_DIR is required (where the trials, leaderboard and report go)")
    if args.data is None and args.config is None:
        raise ValueError("DATA is required (the image folder to tune on)")
    flags = train_cmd.flag_overrides(args)
    if args.data is not None:  # absolute: best.toml and the workers must find it from any directory
        flags["data"]["path"] = str(Path(args.data).resolve())
    base = build_config(preset=args.preset, config_file=args.config, flags=flags)
    return run_study(TuneOptions(study_dir=Path(args.out).resolve(), base=base, preset=args.preset, **common))
