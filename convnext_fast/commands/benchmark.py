"""`convnext-fast benchmark [DATA]`: loader-only, step-only and end-to-end throughput, baseline vs fast.

Flags left unset get per-device defaults. CUDA: batch 128, 10 warm-up + 3 x 50 timed steps, the fast step with
every speed feature on. CPU: batch 16, 2 + 3 x 5 steps, and the fast step without torch.compile and bf16
autocast (both make ConvNeXt slower on a CPU; the `fast-with_*` ablations measure that). `--quick` swaps in a
smoke run (convnext_atto, 32/48 px, batch 8, 1 + 2 x 2 steps, ablations at the first size, no `with_compile`)
that exercises every code path in seconds. Explicit flags always win.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import shlex
from pathlib import Path

from convnext_fast.data import BACKENDS, default_num_workers, resolve_device

DEFAULT_SIZES = (128, 176, 192)
DEFAULT_LOADERS = ("dali", "torchvision", "synthetic", "dali-cached")
LOADER_NAMES = (*BACKENDS, "dali-cached")  # dali-cached: the dali backend with --cache auto (decode once)
QUICK = {"model": "convnext_atto", "sizes": (32, 48), "batch_size": 8, "steps": 2, "warmup": 1, "repeats": 2}
PER_DEVICE = {  # (batch_size, steps, warmup) when not given
    "cuda": (128, 50, 10),
    "cpu": (16, 5, 2),
}
LOADER_STEPS_FACTOR = 4  # loader-only windows: 4x the steps (a batch costs far less than a step)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="image folder (class folders, or train/ and val/); default: the built-in demo dataset")
    parser.add_argument("--sizes", default=None, help="image sizes, comma-separated (default 128,176,192)")
    parser.add_argument("--loaders", default=None,
                        help=f"loaders to measure, comma-separated from {','.join(LOADER_NAMES)} (default all); "
                             "the baseline loop needs torchvision, the fast loop dali, the cached fast loop "
                             "dali-cached (the dali loader with the decoded-image cache)")
    parser.add_argument("--model", default=None, help="timm model name (default convnext_tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 128 CUDA, 16 CPU)")
    parser.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 50 CUDA, 5 CPU)")
    parser.add_argument("--loader-steps", type=int, default=None,
                        help=f"timed batches per repeat in loader-only runs (default {LOADER_STEPS_FACTOR} x --steps)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up steps, compile included (default 10 CUDA, 2 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows; median and min-max (default 3)")
    parser.add_argument("--dataset-size", type=int, default=70000,
                        help="images per epoch for the projected epoch time (default 70000)")
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU threads of DALI = DataLoader workers (default: usable cores, at most 8)")
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                        help="autocast of the fast step (default bf16 on CUDA, off on a CPU, where bf16 autocast "
                             "slows ConvNeXt's depthwise convolutions down)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the fast step (default on with CUDA, off on a CPU)")
    parser.add_argument("--ablation-sizes", default=None,
                        help="sizes at which to run the ablations (one speed feature flipped at a time): "
                             "comma-separated, 'all' or 'none' (default all; --quick: the first size)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak TFLOP/s for MFU where the built-in table does not know the device")
    parser.add_argument("--progressive", default=None, metavar="START_PX|off",
                        help="project a whole run's step time with progressive resolution from START_PX to the "
                             "largest --sizes (FFCV-style ramp, as `train --progressive`) against that size fixed, "
                             "from the measured step throughput (default: the smallest of --sizes; off: none)")
    parser.add_argument("--epochs", type=int, default=150, help="epochs of the projected run (default 150)")
    parser.add_argument("--ramp", default=None, metavar="START:END",
                        help="ramp of the projected run, as `train --ramp` (default 3/4:7/8 of --epochs)")
    parser.add_argument("--res-step", type=int, default=32, help="size rounding of the projected run (default 32)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results as markdown here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: convnext_atto, sizes 32,48, batch 8, few steps (numbers are not a benchmark)")


def _int_list(flag: str, text: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers, e.g. 128,176,192") from None
    if any(v < minimum for v in values):
        raise ValueError(f"{flag} {text!r}: every value must be >= {minimum}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r}: repeated value")
    return values


def _positive(flag: str, value: int | float | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def build_config(args: argparse.Namespace):
    """Resolve flags, --quick and per-device defaults into a BenchConfig; ValueError names a bad flag."""
    from convnext_fast.benchmark.run import BenchConfig, resolve_data
    from convnext_fast.engine import FAST_SPEED

    device = resolve_device(args.device)
    quick = QUICK if args.quick else {}
    batch, steps, warmup = PER_DEVICE[device.type]
    sizes = _int_list("--sizes", args.sizes, 32) if args.sizes else quick.get("sizes", DEFAULT_SIZES)
    loaders = tuple(args.loaders.split(",")) if args.loaders else DEFAULT_LOADERS
    bad = [b for b in loaders if b not in LOADER_NAMES]
    if bad or len(set(loaders)) != len(loaders):
        raise ValueError(f"--loaders {args.loaders!r}: expected distinct names from {', '.join(LOADER_NAMES)}")
    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--loader-steps", args.loader_steps), ("--warmup", args.warmup),
                        ("--repeats", args.repeats), ("--dataset-size", args.dataset_size),
                        ("--workers", args.workers)):
        _positive(flag, value)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    model = args.model or quick.get("model", "convnext_tiny")
    import timm

    if not timm.is_model(model):
        raise ValueError(f"--model: unknown timm model {model!r}")
    ablation = (args.ablation_sizes or ("all" if not args.quick else str(sizes[0]))).strip()
    if ablation == "all":
        ablation_sizes = sizes
    elif ablation == "none":
        ablation_sizes = ()
    else:
        ablation_sizes = _int_list("--ablation-sizes", ablation, 32)
        if not set(ablation_sizes) <= set(sizes):
            raise ValueError(f"--ablation-sizes {ablation!r}: every size must be one of --sizes {sizes}")
    # On a CPU, compile (minutes of C++ build) and bf16 autocast slow ConvNeXt down: off unless asked for.
    cuda = device.type == "cuda"
    fast = dataclasses.replace(FAST_SPEED, compile=cuda if args.compile is None else args.compile,
                               amp=args.amp or (FAST_SPEED.amp if cuda else "off"))
    schedule = _schedule(args, sizes)
    data, note = resolve_data(args.data)
    steps = args.steps or quick.get("steps", steps)
    return BenchConfig(
        data=data, sizes=sizes, loaders=loaders, model=model, device=device,
        batch_size=args.batch_size or quick.get("batch_size", batch), steps=steps,
        loader_steps=args.loader_steps or LOADER_STEPS_FACTOR * steps,
        warmup=args.warmup or quick.get("warmup", warmup),
        repeats=args.repeats or quick.get("repeats", 3), dataset_size=args.dataset_size,
        workers=args.workers or default_num_workers(), fast=fast, ablation_sizes=ablation_sizes,
        peak_tflops=args.peak_tflops, quick=bool(args.quick), data_note=note, schedule=schedule)


def _schedule(args: argparse.Namespace, sizes: tuple[int, ...]):
    """The projected run's ResolutionSchedule (None: --progressive off, or a single size and no --progressive)."""
    from convnext_fast.schedule import ResolutionSchedule, parse_ramp

    text = args.progressive
    if text is not None and text.lower() in ("off", "none"):
        return None
    if text is None and len(sizes) < 2:
        return None
    start = min(sizes) if text is None else _positive_int("--progressive", text)
    ramp = parse_ramp("--ramp", args.ramp) if args.ramp else None
    return ResolutionSchedule(img_size=max(sizes), epochs=args.epochs, start_size=start, ramp=ramp,
                              res_step=args.res_step)


def _positive_int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag}: expected an integer or off, got {text!r}") from None


def resolved_command(cfg, data_arg: str | None) -> str:
    """The command line that reruns exactly this configuration (every default spelt out)."""
    parts = ["convnext-fast", "benchmark"] + ([data_arg] if data_arg else [])
    parts += ["--sizes", ",".join(map(str, cfg.sizes)), "--loaders", ",".join(cfg.loaders), "--model", cfg.model,
              "--batch-size", str(cfg.batch_size), "--device", str(cfg.device), "--steps", str(cfg.steps),
              "--loader-steps", str(cfg.loader_steps), "--warmup", str(cfg.warmup), "--repeats", str(cfg.repeats),
              "--dataset-size", str(cfg.dataset_size), "--workers", str(cfg.workers), "--amp", cfg.fast.amp,
              "--compile" if cfg.fast.compile else "--no-compile",
              "--ablation-sizes", ",".join(map(str, cfg.ablation_sizes)) or "none"]
    s = cfg.schedule
    parts += (["--progressive", str(s.start_size), "--epochs", str(s.epochs), "--ramp",
               "{}:{}".format(*s.resolved_ramp), "--res-step", str(s.res_step)] if s else ["--progressive", "off"])
    if cfg.peak_tflops is not None:
        parts += ["--peak-tflops", str(cfg.peak_tflops)]
    return shlex.join(parts + (["--quick"] if cfg.quick else []))


def _outputs(args: argparse.Namespace) -> dict[str, Path]:
    out = {k: getattr(args, k) for k in ("json", "markdown", "plot") if getattr(args, k) is not None}
    if out:
        return out
    # Nothing asked for: keep every result anyway, with its provenance, under runs/.
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path("runs") / f"benchmark-{stamp}"
    return {"json": folder / "benchmark.json", "markdown": folder / "benchmark.md", "plot": folder / "benchmark.png"}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from convnext_fast.benchmark.run import run_benchmark
    from convnext_fast.benchmark.tables import render_tables, write_json, write_markdown, write_plot

    cfg = build_config(args)
    outputs = _outputs(args)
    for path in outputs.values():
        if path.exists() and path.is_dir():
            raise ValueError(f"output {path} is a directory; give a file name")
    console = Console()
    if not console.is_terminal:
        console.width = 160  # a log file or a pipe: keep the table's columns readable
    doc = run_benchmark(cfg, log=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True),
                        command=resolved_command(cfg, args.data))
    render_tables(doc, console)
    writers = {"json": write_json, "markdown": write_markdown, "plot": write_plot}
    for kind, path in outputs.items():
        console.print(f"wrote {writers[kind](doc, path)}")
    return 0
