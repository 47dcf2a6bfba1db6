"""`convnext-fast eval WEIGHTS DATA [--tta] [--json FILE]`: top-1/top-5, per-class accuracy, confusion matrix.

WEIGHTS is a checkpoint (``checkpoints/best.pt``/``last.pt``; its EMA weights when it has them) or a
``model.safetensors`` export (model name, image size and classes in its metadata, or ``classes.json`` beside it).
DATA is a folder of class folders, or a dataset root whose ``val/`` is used. Its classes must be exactly the
model's classes (same names, same order), otherwise the indices would silently mean different things.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from convnext_fast.report import atomic_write_text, to_jsonable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", metavar="WEIGHTS", help="checkpoint .pt or model.safetensors")
    parser.add_argument("data", metavar="DATA", help="class folders, or a dataset root with val/")
    parser.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
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


def evaluate_weights(weights: str | Path, data: str | Path, *, tta: bool = False, loader: str = "dali",
                     batch_size: int = 64, workers: int | None = None, device: str | None = None,
                     amp: str | None = None) -> tuple[dict, list[str], dict]:
    """(metrics, classes, meta): ``ClassificationMeter.compute()`` of WEIGHTS on DATA."""
    import torch

    from convnext_fast.checkpoint import load_weights
    from convnext_fast.config import AMP_MODES
    from convnext_fast.data import build_loader, resolve_device, scan_folder
    from convnext_fast.evaluate import evaluate, predict
    from convnext_fast.model import create_model

    if amp is not None and amp not in AMP_MODES:
        raise ValueError(f"--amp: expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    state, meta = load_weights(weights)
    classes = list(meta["classes"])
    index = scan_folder(_eval_root(Path(data)))
    if index.classes != classes:
        missing = [c for c in classes if c not in index.class_to_idx]
        extra = [c for c in index.classes if c not in classes]
        detail = f"missing in DATA: {missing[:5]}, not in the model: {extra[:5]}" if missing or extra else \
            "same names in a different order"
        raise ValueError(f"class mismatch between {weights} ({len(classes)} classes) and {index.root} "
                         f"({len(index.classes)} classes): {detail}")
    dev = resolve_device(device)
    model = create_model(meta["model_name"], len(classes), device=dev)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not fit {meta['model_name']} ({str(e).splitlines()[0]})") from None
    amp = amp or ("bf16" if dev.type == "cuda" else "off")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    val = build_loader(index, train=False, img_size=int(meta["img_size"]), batch_size=batch_size, backend=loader,
                       device=dev, crop_pct=float(meta.get("crop_pct", 0.875)), num_workers=workers)
    try:
        forward = lambda images: predict(model, images, tta=tta, amp_dtype=amp_dtype)  # noqa: E731
        metrics = evaluate({"model": forward}, val, num_classes=len(classes), device=dev)["model"]
    finally:
        val.close()
    return metrics, classes, meta


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from convnext_fast.report import render_eval_report

    metrics, classes, meta = evaluate_weights(args.weights, args.data, tta=args.tta, loader=args.loader,
                                              batch_size=args.batch_size, workers=args.workers, device=args.device,
                                              amp=args.amp)
    console = Console(highlight=False)
    console.print(f"{args.weights}: {meta['model_name']} {meta['img_size']}px on {args.data}"
                  f"{' with flip TTA' if args.tta else ''}")
    console.print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
                  f"({metrics['count']} images)")
    render_eval_report(console, classes, metrics)
    if args.json:
        out = {"weights": str(args.weights), "data": str(args.data), "tta": args.tta, "model": meta["model_name"],
               "classes": classes, **metrics}
        atomic_write_text(Path(args.json), json.dumps(to_jsonable(out), indent=2) + "\n")
    return 0
