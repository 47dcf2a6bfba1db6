"""predict vs eval throughput on the same images, and the ONNX export's parity and cost per exporter.

Images: random crops (96-256 px, JPEG q90) of scikit-image's sample photos, one class per photo (real pixels; `pip
install scikit-image` for this script only). Weights: a freshly built model whose layer scales and head are
perturbed (an untrained ConvNeXt is near the identity), saved in the weights format.

1. Throughput: `convnext-fast eval W DATA` and `convnext-fast predict W DATA -o preds.csv` through the CLI in this
   process, rounds interleaved (eval, predict, predict, eval, ...) so a noisy shared machine slows both alike;
   each run's wall time covers the whole command (model load, listing + preflight, the pass, the output). Reported:
   img/s per arm (median) and predict/eval.
2. Export: for each exporter (torchscript, dynamo) the export time, file size, and ONNX Runtime vs PyTorch on
   `--parity-images` real crops through the eval loader, at the trained size and +32 (``--dynamic-size``).

    .venv/bin/python benchmarks/predict_bench.py                       # convnext_atto 128 px, 600 images, DALI
    .venv/bin/python benchmarks/predict_bench.py --loader torchvision --model convnext_tiny --size 224

Results: benchmarks/results/predict-cpu-<cores>core-<UTC date>.{json,md} (a suffix when the name exists).
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (convnext_fast/cli.py)
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def photo_crops(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG crops of scikit-image's RGB sample photos into ``root/<photo>/``."""
    from PIL import Image
    from skimage import data as sk

    photos = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        try:
            img = np.asarray(getattr(sk, name)())
        except Exception:  # a photo that needs pooch/network in this scikit-image version
            continue
        if img.ndim == 3 and img.shape[2] == 3:
            photos[name] = img
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    for i in range(n):
        name = names[i % len(names)]
        img = photos[name]
        h, w = img.shape[:2]
        ch, cw = (int(rng.integers(96, min(256, h, w) + 1)) for _ in range(2))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[y:y + ch, x:x + cw]).save(root / name / f"{i:05d}.jpg", quality=90)
    return root


def perturbed_weights(path: Path, model_name: str, classes: list[str], size: int) -> Path:
    from convnext_fast.checkpoint import export_safetensors
    from convnext_fast.model import create_model

    torch.manual_seed(0)
    model = create_model(model_name, len(classes), device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0.3, 0.1)
            elif name.startswith("head.fc"):
                p.normal_(0.0, 0.5)
    return export_safetensors(model.state_dict(), path, {"model_name": model_name, "num_classes": len(classes),
                                                         "classes": classes, "img_size": size,
                                                         "crop_pct": 0.875})


def throughput(weights: Path, data: Path, out: Path, args) -> dict:
    from convnext_fast.cli import main

    common = ["--loader", args.loader, "--batch-size", str(args.batch_size), "--device", "cpu",
              *(["--workers", str(args.workers)] if args.workers else [])]
    arms = {"eval": ["eval", str(weights), str(data), *common],
            "predict": ["predict", str(weights), str(data), "-o", str(out), *common]}
    main(arms["predict"])  # warm-up: page cache, DALI/torch imports, first pipeline build
    walls: dict[str, list[float]] = {"eval": [], "predict": []}
    for r in range(args.rounds):
        for arm in (("eval", "predict") if r % 2 == 0 else ("predict", "eval")):
            t0 = time.perf_counter()
            assert main(arms[arm]) == 0
            walls[arm].append(time.perf_counter() - t0)
    n = sum(1 for _ in data.rglob("*.jpg"))
    med = {arm: statistics.median(v) for arm, v in walls.items()}
    return {"images": n, "wall_s": walls, "img_per_s": {arm: n / med[arm] for arm in med},
            "predict_over_eval_throughput": med["eval"] / med["predict"],
            "commands": {arm: "convnext-fast " + " ".join(a) for arm, a in arms.items()}}


def export_parity(weights: Path, data: Path, tmp: Path, args) -> list[dict]:
    from convnext_fast.inference.model import load_model
    from convnext_fast.inference.onnx_export import check_batches, export_onnx, parity

    lm = load_model(weights, device="cpu", amp="off")
    sizes = [lm.img_size, lm.img_size + 32]
    what, batches = check_batches(lm, str(data), sizes, args.parity_images, args.loader)
    rows = []
    for exporter in ("torchscript", "dynamo"):
        out = tmp / f"{exporter}.onnx"
        try:
            info = export_onnx(lm, out, dynamic_size=True, exporter=exporter)
        except Exception as e:  # e.g. onnxscript missing for dynamo: recorded, not fatal
            rows.append({"exporter": exporter, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        checks = [parity(out, lm, b, False) for b in batches]
        rows.append({**info, "mib": info["bytes"] / 2**20, "checked_on": what, "checks": checks})
    return rows


def _markdown(rec: dict) -> str:
    t, m = rec["throughput"], rec["machine"]
    lines = [f"# predict vs eval, and ONNX export parity ({rec['date_utc']} UTC)", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m['platform']}; load {rec['load_avg_start'][0]:.1f}"
             f" -> {rec['load_avg_end'][0]:.1f}. torch {rec['versions']['torch']}, onnxruntime "
             f"{rec['versions']['onnxruntime']}. Commit {rec['git_commit'][:10]}.", "",
             f"Model {rec['model']} at {rec['img_size']} px (perturbed weights), {t['images']} crops of scikit-image "
             f"photos, loader {rec['loader']}, batch {rec['batch_size']}, {rec['rounds']} interleaved rounds.", "",
             "| command | img/s (median) | wall s per run |", "|---|---|---|"]
    for arm in ("eval", "predict"):
        lines.append(f"| {arm} | {t['img_per_s'][arm]:.1f} | {', '.join(f'{w:.1f}' for w in t['wall_s'][arm])} |")
    lines += ["", f"predict / eval throughput: **{t['predict_over_eval_throughput']:.3f}**", "",
              "| exporter | export s | MiB | check | max abs logit diff | top-1 agreement |", "|---|---|---|---|---|---|"]
    for row in rec["export"]:
        if "error" in row:
            lines.append(f"| {row['exporter']} | failed: {row['error']} | | | | |")
            continue
        for c in row["checks"]:
            lines.append(f"| {row['exporter']} | {row['seconds']:.1f} | {row['mib']:.1f} | {c['images']} images at "
                         f"{c['size']} px | {c['max_abs_diff']:.2e} | {100 * c['top1_agree']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--loader", default="dali")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parity-images", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    import onnxruntime

    tmp = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    data = photo_crops(tmp / "data", args.images)
    classes = sorted(p.name for p in data.iterdir())
    weights = perturbed_weights(tmp / "w.safetensors", args.model, classes, args.size)
    load = os.getloadavg()
    rec = {"what": __doc__.splitlines()[0], "model": args.model, "img_size": args.size, "loader": args.loader,
           "batch_size": args.batch_size, "rounds": args.rounds, "command": " ".join(sys.argv), "load_avg_start": load,
           "throughput": throughput(weights, data, tmp / "preds.csv", args),
           "export": export_parity(weights, data, tmp, args), "load_avg_end": os.getloadavg(),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                    if ln.startswith("model name")), platform.processor())},
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
           "git_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip(),
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    name = f"predict-cpu-{os.cpu_count()}core-{time.strftime('%Y-%m-%d', time.gmtime())}"
    out = Path(args.out)
    k = 1
    while (out / f"{name}.json").exists():
        k += 1
        name = f"{name.rsplit('-run', 1)[0]}-run{k}"
    (out / f"{name}.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / f"{name}.md").write_text(_markdown(rec))
    print(_markdown(rec))
    print(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    main()
