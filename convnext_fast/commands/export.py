"""`convnext-fast export WEIGHTS [DATA] --format onnx -o model.onnx`: an ONNX file for a service, checked.

After writing the file it checks itself: ONNX Runtime against PyTorch on a batch of DATA's images (or
``--check-data``) prepared by eval's loader, at the trained size and, with ``--dynamic-size``, at a second size;
it prints the max |logit difference| and the top-1 agreement, and fails (exit 1) above ``--tolerance``. Without
images it says that it checked random inputs only. Needs the ``onnx`` extra (onnx, onnxruntime).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", metavar="WEIGHTS", help="checkpoint .pt or model.safetensors")
    parser.add_argument("data", metavar="DATA", nargs="?", default=None,
                        help="images to check the export on (a folder or a list of paths); same as --check-data")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="height and width dynamic too (several test sizes); checked at a second size")
    parser.add_argument("--with-preprocessing", action="store_true",
                        help="input uint8 NHWC (resized, center-cropped RGB); normalization inside the graph")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                        help="torch's ONNX exporter (torchscript: measured faster, same parity; dynamo: needs "
                             "onnxscript)")
    parser.add_argument("--check-data", default=None, metavar="DATA", help="images for the self-check")
    parser.add_argument("--check-images", type=int, default=32, metavar="N", help="images in the self-check")
    parser.add_argument("--tolerance", type=float, default=1e-3, metavar="T",
                        help="fail when ONNX Runtime and PyTorch logits differ by more than T")
    parser.add_argument("--loader", default="dali", metavar="dali|torchvision", help="loader of the check images")


def run(args: argparse.Namespace) -> int:
    from convnext_fast.inference.model import load_model

    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"-o {out}: --format onnx writes a .onnx file")
    if not out.parent.is_dir():
        raise ValueError(f"-o {out}: folder {out.parent} does not exist")
    if args.data and args.check_data and args.data != args.check_data:
        raise ValueError("give the check images once: DATA or --check-data")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ValueError(f"export needs onnx and onnxruntime: pip install 'convnext_fast[onnx]' ({e.name} missing)")
    if args.exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError("--exporter dynamo needs onnxscript (pip install onnxscript)") from None
    from convnext_fast.inference.onnx_export import check_batches, export_onnx, parity

    lm = load_model(args.weights, device="cpu", amp="off")
    sizes = [lm.img_size] + ([lm.img_size + 32] if args.dynamic_size else [])
    what, batches = check_batches(lm, args.data or args.check_data, sizes, args.check_images, args.loader)
    info = export_onnx(lm, out, dynamic_size=args.dynamic_size, with_preprocessing=args.with_preprocessing,
                       exporter=args.exporter)
    print(f"wrote {out} ({info['bytes'] / 2**20:.1f} MiB, {info['exporter']} exporter, {info['seconds']:.1f}s): "
          f"input images {'uint8 N,H,W,3' if args.with_preprocessing else 'float N,3,H,W normalized'}, output logits "
          f"N,{len(lm.classes)}; preprocessing in its metadata", flush=True)
    worst = 0.0
    for batch in batches:
        r = parity(out, lm, batch, args.with_preprocessing)
        worst = max(worst, r["max_abs_diff"])
        print(f"check: ONNX Runtime vs PyTorch on {what} at {r['size']}px: max |logit diff| "
              f"{r['max_abs_diff']:.2e}, top-1 agreement {100 * r['top1_agree']:.1f}% ({r['images']} images)",
              flush=True)
    if worst > args.tolerance:
        print(f"convnext-fast export: error: ONNX Runtime differs from PyTorch by {worst:.2e} > --tolerance "
              f"{args.tolerance:g}; {out} is not trustworthy", flush=True)
        return 1
    return 0
