"""`convnext-fast eval WEIGHTS DATA [--tta] [--img-size PX[,PX...]] [--report DIR] [--json FILE]`.

Prints top-1/top-5, per-class accuracy and the confusion matrix; with several sizes (``--img-size 160,192,224``)
it evaluates at each and prints a table, so the test size can be chosen; ``--report DIR`` saves the pass's
logits, labels and paths (``predictions.npz``) and builds the browsable error report from them
(:mod:`convnext_fast.error_report`).

WEIGHTS is a checkpoint (``checkpoints/best.pt``/``last.pt``; its EMA weights when it has them) or a
``model.safetensors`` export (model name, image size and classes in its metadata, or ``classes.json`` beside it).
DATA is a folder of class folders, or a dataset root whose ``val/`` is used. Its classes must be exactly the
model's classes (same names, same order), otherwise the indices would silently mean different things.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convnext_fast.inference.model import parse_sizes  # noqa: F401  (also imported from here by others)
from convnext_fast.run_files import atomic_write_text, to_jsonable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", metavar="WEIGHTS", help="checkpoint .pt or model.safetensors")
    parser.add_argument("data", metavar="DATA", help="class folders, or a dataset root with val/")
    parser.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
    parser.add_argument("--img-size", default=None, metavar="PX[,PX...]",
                        help="test size(s); several (e.g. 160,192,224) print a table of top-1/top-5 per size "
                             "(default: the size the weights were trained at)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write DIR/report.html (per-class recall with intervals, top-loss images, confusions, "
                             "calibration) and the data behind it: predictions.npz, per_class.csv, top_losses.csv")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to FILE as JSON")
    parser.add_argument("--loader", default="dali", metavar="dali|torchvision|synthetic", help="data backend")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="loader threads/workers")
    parser.add_argument("--device", default=None, metavar="cuda|cpu", help="default: cuda when available")
    parser.add_argument("--amp", default=None, metavar="bf16|fp16|off", help="default: bf16 on CUDA, off on CPU")


def _eval_root(data: Path) -> Path:
    if not data.is_dir():
        raise ValueError(f"DATA {data}: no such directory")
    return data / "val" if (data / "val").is_dir() else data


def check_classes(weights: Any, classes: list[str], index: Any) -> None:
    """The one-line error naming both sides when DATA's classes are not the model's (names, count or order)."""
    if index.classes == classes:
        return
    missing = [c for c in classes if c not in index.class_to_idx]
    extra = [c for c in index.classes if c not in classes]
    detail = f"missing in DATA: {missing[:5]}, not in the model: {extra[:5]}" if missing or extra else \
        "same names in a different order"
    raise ValueError(f"class mismatch between {weights} ({len(classes)} classes) and {index.root} "
                     f"({len(index.classes)} classes): {detail}")


def weights_are_ema(weights: str | Path, meta: dict) -> bool | None:
    """Whether WEIGHTS hold EMA weights: a checkpoint's config says so; an export's run config.json beside it."""
    config = meta.get("config")
    if config is None:
        beside = Path(weights).with_name("config.json")
        try:
            config = json.loads(beside.read_text()) if beside.is_file() else None
        except (OSError, ValueError):
            config = None
    if not isinstance(config, dict):
        return None
    return bool(config.get("recipe", {}).get("model_ema"))


@dataclass
class EvalResult:
    """Metrics per evaluated size (``by_size[0]`` is the first size listed) and, when kept, the predictions."""

    classes: list[str]
    meta: dict
    img_sizes: list[int]
    by_size: list[dict]
    seconds: list[float]
    predictions: Any = None  # convnext_fast.predictions.Predictions when keep_outputs
    info: dict = field(default_factory=dict)


def evaluate_sizes(weights: str | Path, data: Any, *, img_sizes: list[int] | None = None, tta: bool = False,
                   loader: str = "dali", batch_size: int = 64, workers: int | None = None, device: str | None = None,
                   amp: str | None = None, keep_outputs: bool = False, allow_empty: bool = True) -> EvalResult:
    """Evaluate WEIGHTS on DATA (a folder, or an ``ImageIndex``) at each of ``img_sizes`` (default: the trained
    size); with ``keep_outputs`` also return the logits, labels and paths as ``Predictions``."""
    import numpy as np

    from convnext_fast.data import scan_folder
    from convnext_fast.data.index import ImageIndex
    from convnext_fast.evaluate import evaluate_outputs
    from convnext_fast.inference.model import load_model

    if keep_outputs and loader == "synthetic":
        raise ValueError("--report needs the images of DATA; --loader synthetic makes up its own")
    lm = load_model(weights, device=device, amp=amp)  # the model and preprocessing predict and export use too
    index = data if isinstance(data, ImageIndex) else scan_folder(_eval_root(Path(data)), allow_empty=allow_empty)
    classes, meta, dev = lm.classes, lm.meta, lm.device
    check_classes(weights, classes, index)
    sizes = img_sizes or [int(meta["img_size"])]
    by_size, seconds, all_logits, labels = [], [], [], None
    forward = lambda images: lm.forward(images, tta=tta)  # noqa: E731
    for size in sizes:
        t0 = time.perf_counter()
        val = lm.loader(index, size, backend=loader, batch_size=batch_size, workers=workers)
        try:
            metrics, logits, labels = evaluate_outputs(forward, val, num_classes=len(classes), device=dev)
        finally:
            val.close()
        seconds.append(time.perf_counter() - t0)
        by_size.append(metrics)
        if keep_outputs:
            all_logits.append(logits.numpy())
    info = {"weights": str(weights), "data": str(index.root), "model": meta["model_name"],
            "trained_img_size": int(meta["img_size"]), "tta": tta, "ema": weights_are_ema(weights, meta),
            "amp": lm.amp, "device": str(dev), "loader": loader, "images": len(index),
            "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "eval_seconds": seconds}
    result = EvalResult(classes, meta, sizes, by_size, seconds, info=info)
    if keep_outputs:
        from convnext_fast.predictions import Predictions

        if not np.array_equal(labels.numpy(), np.asarray(index.targets, dtype=np.int64)):
            raise RuntimeError("eval loader order differs from the index order; paths would not match")
        result.predictions = Predictions(classes=classes, labels=labels.numpy(), paths=[p for p, _ in index.samples],
                                         img_sizes=sizes, logits=np.stack(all_logits), meta=info)
    return result


def evaluate_weights(weights: str | Path, data: str | Path, *, tta: bool = False, loader: str = "dali",
                     batch_size: int = 64, workers: int | None = None, device: str | None = None,
                     amp: str | None = None) -> tuple[dict, list[str], dict]:
    """(metrics, classes, meta): ``ClassificationMeter.compute()`` of WEIGHTS on DATA at the trained size."""
    r = evaluate_sizes(weights, data, tta=tta, loader=loader, batch_size=batch_size, workers=workers, device=device,
                       amp=amp)
    return r.by_size[0], r.classes, r.meta


def write_report(result: EvalResult, out_dir: str | Path) -> tuple[Path, float]:
    """Save ``predictions.npz`` in ``out_dir`` and build the report from that file. (report.html, seconds)."""
    from convnext_fast.error_report import build_report
    from convnext_fast.predictions import Predictions

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    saved = result.predictions.save(out_dir / "predictions.npz")
    page = build_report(Predictions.load(saved), out_dir)
    return page, time.perf_counter() - t0


def check_report_dir(out_dir: Path) -> None:
    """Fail before the evaluation if ``--report DIR`` cannot be written (a file, or a read-only parent)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--report {out_dir}: exists and is not a directory")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--report {out_dir}: {parent} is not writable")


def _size_table(result: EvalResult):
    from rich.table import Table

    table = Table(title="Accuracy by test size")
    for name in ("img size", "top-1 %", "top-5 %", "loss", "seconds"):
        table.add_column(name, justify="right")
    best = max(range(len(result.img_sizes)), key=lambda i: result.by_size[i]["top1"])
    for i, (size, m) in enumerate(zip(result.img_sizes, result.by_size)):
        mark = " (trained)" if size == result.info["trained_img_size"] else ""
        table.add_row(f"{size}{mark}", f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['loss']:.4f}",
                      f"{result.seconds[i]:.1f}", style="bold green" if i == best else "")
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from convnext_fast.run_files import render_eval_report

    sizes = parse_sizes(args.img_size)
    if args.report:
        check_report_dir(Path(args.report))
    result = evaluate_sizes(args.weights, args.data, img_sizes=sizes, tta=args.tta, loader=args.loader,
                            batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                            keep_outputs=args.report is not None)
    classes, meta, metrics = result.classes, result.meta, result.by_size[0]
    console = Console(highlight=False)
    console.print(f"{args.weights}: {meta['model_name']} {result.img_sizes[0]}px on {args.data}"
                  f"{' with flip TTA' if args.tta else ''}", soft_wrap=True)
    console.print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
                  f"({metrics['count']} images)")
    render_eval_report(console, classes, metrics)
    if len(result.img_sizes) > 1:
        console.print(_size_table(result))
        console.print(f"(per-class tables above are at {result.img_sizes[0]}px, the first size listed)")
    if args.report:
        page, seconds = write_report(result, args.report)
        console.print(f"report: {page}  (built in {seconds:.1f}s after an eval pass of {sum(result.seconds):.1f}s)",
                      soft_wrap=True)
    if args.json:
        out = {"weights": str(args.weights), "data": str(args.data), "tta": args.tta, "model": meta["model_name"],
               "img_size": result.img_sizes[0], "classes": classes, **metrics}
        if len(result.img_sizes) > 1:
            out["by_img_size"] = [{"img_size": s, **m} for s, m in zip(result.img_sizes, result.by_size)]
        atomic_write_text(Path(args.json), json.dumps(to_jsonable(out), indent=2) + "\n")
    return 0


def report_after_training(cfg: Any, summary: dict) -> Path:
    """``train --report``: evaluate the run's exported weights on its validation images into RUN_DIR/report."""
    from convnext_fast.data.splits import resolve_train_val

    run_dir = Path(summary["run_dir"])
    _, val_index = resolve_train_val(cfg.data, seed=cfg.run.seed)
    d = cfg.data
    result = evaluate_sizes(run_dir / "model.safetensors", val_index, tta=cfg.recipe.tta, loader=d.loader,
                            batch_size=d.eval_batch_size or 2 * d.batch_size, workers=d.num_workers,
                            device=cfg.run.device, keep_outputs=True)
    page, seconds = write_report(result, run_dir / "report")
    print(f"report: {page} ({seconds:.1f}s)", flush=True)
    return page
