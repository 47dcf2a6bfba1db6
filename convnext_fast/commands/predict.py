"""`convnext-fast predict WEIGHTS [WEIGHTS ...] DATA -o FILE`: the model's predictions on unlabelled images.

DATA is a folder (searched recursively; class sub-folders are allowed and ignored), one image, or a list of paths
(.txt, .csv).
The preprocessing is eval's, read from each weights file (``convnext_fast.inference``); ``--img-size`` (one or
several sizes) and ``--tta`` average the logits of every view of a model; several WEIGHTS average their
probabilities. The output's extension picks its format (see ``convnext_fast.inference.outputs``); rows are sorted
by id whatever the loader, batch size or worker count.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", metavar="WEIGHTS", nargs="+",
                        help="checkpoint .pt or model.safetensors; several: an ensemble (mean of probabilities)")
    parser.add_argument("data", metavar="DATA",
                        help="a folder of images (recursive), one image, or a .txt/.csv list of paths")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="predictions: .csv, .jsonl, .parquet (needs pyarrow) or .npz (eval's predictions.npz)")
    parser.add_argument("--tta", action="store_true", help="also average the logits of each image's mirror")
    parser.add_argument("--img-size", default=None, metavar="PX[,PX...]",
                        help="test size(s); several are averaged (mean of logits) (default: each model's trained size)")
    parser.add_argument("--ensemble-weights", default=None, metavar="W[,W...]",
                        help="one weight per WEIGHTS file for the mean of probabilities (default: equal)")
    parser.add_argument("--id-format", default=None, choices=["relpath", "name", "stem"],
                        help="the id column: path relative to DATA (default), file name, or file name without "
                             "extension")
    parser.add_argument("--topk", type=int, default=1, metavar="K",
                        help="K label/prob column pairs (label, prob, label_2, prob_2, ...)")
    parser.add_argument("--probs", action="store_true", help="one probability column per class")
    parser.add_argument("--sample-submission", default=None, metavar="CSV",
                        help="fill this template's rows in its order (id, then a label column or one column per "
                             "class); ids that match no image are refused")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="leave out images that cannot be read (default: a row with an empty prediction and "
                             "the reason in 'error')")
    parser.add_argument("--loader", default="dali", metavar="dali|torchvision", help="data backend (eval's loader)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="loader threads/workers")
    parser.add_argument("--device", default=None, metavar="cuda|cpu", help="default: cuda when available")
    parser.add_argument("--amp", default=None, metavar="bf16|fp16|off", help="default: bf16 on CUDA, off on CPU")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from convnext_fast.inference import outputs
    from convnext_fast.inference.inputs import list_inputs
    from convnext_fast.inference.model import load_model, parse_sizes
    from convnext_fast.inference.run import check_same_classes, parse_ensemble_weights, predict_inputs

    if args.loader not in ("dali", "torchvision"):
        raise ValueError(f"--loader {args.loader!r}: predict reads images (dali or torchvision)")
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    sizes = parse_sizes(args.img_size)
    ensemble = parse_ensemble_weights(args.ensemble_weights, len(args.weights))
    out = outputs.check_output(args.output, sample_submission=args.sample_submission)
    inputs = list_inputs(args.data, id_format=args.id_format or "relpath")
    models = [load_model(w, device=args.device, amp=args.amp) for w in args.weights]
    check_same_classes(models)
    if args.topk > len(models[0].classes):
        raise ValueError(f"--topk {args.topk}: the model has {len(models[0].classes)} classes")
    result = predict_inputs(models, inputs, sizes=sizes, tta=args.tta, ensemble_weights=ensemble,
                            backend=args.loader, batch_size=args.batch_size, workers=args.workers)
    if args.sample_submission:
        rows = outputs.write_submission(result, args.sample_submission, out, id_format=args.id_format)
    else:
        rows = outputs.write(result, out, topk=args.topk, probs=args.probs, skip_bad=args.skip_bad_files)
    info = result.info
    views = "+".join("/".join(f"{s}px" for s in v) for v in info["img_sizes"])
    console = Console(highlight=False, stderr=False)
    console.print(f"{len(models)} model(s) at {views}{' with flip TTA' if args.tta else ''} on {len(inputs)} images: "
                  f"{info['seconds']:.1f}s ({info['img_per_sec']:,.1f} img/s per view)", soft_wrap=True)
    if result.bad:
        from convnext_fast.inference.inputs import describe_bad

        verb = "left out" if args.skip_bad_files and not args.sample_submission else "written with no prediction"
        console.print(f"{len(result.bad)} image(s) cannot be read, {verb}:\n{describe_bad(result.bad)}", soft_wrap=True)
    console.print(f"wrote {rows} rows to {Path(out)}", soft_wrap=True)
    return 0
