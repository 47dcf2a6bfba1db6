"""How much `--report` adds to `convnext-fast eval`: the same eval with and without `--report DIR`, each a fresh
process (so the report pays its imports), rounds interleaved (A B B A ...) on a shared machine.

    python benchmarks/report_overhead.py [--weights W] [--images 3000] [--rounds 3] [--out results/x.json]

Without --weights: convnext_atto with random weights at 48 px (the report's cost does not depend on accuracy:
it thumbnails each class's top losses either way). Data: the demo generator, 21 classes, 128 px JPEGs.
Prints and records: eval wall time, eval --report wall time, the report's own time as the CLI reports it, the
extra share; the machine, load average, command and git commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _weights(tmp: Path, classes: list[str], size: int) -> Path:
    import torch

    from convnext_fast.checkpoint import export_safetensors
    from convnext_fast.model import create_model

    torch.manual_seed(0)
    model = create_model("convnext_atto", len(classes), device="cpu")
    return export_safetensors(model.state_dict(), tmp / "model.safetensors",
                              {"model_name": "convnext_atto", "num_classes": len(classes), "classes": classes,
                               "img_size": size, "crop_pct": 0.875})


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return wall, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=None, help="class folders (default: demo data generated in a temp dir)")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--loader", default="dali")
    ap.add_argument("--out", default=None, help="write the record here (JSON)")
    args, extra = ap.parse_known_args()
    sys.path.insert(0, str(ROOT))
    from convnext_fast.data.demo import class_names, make_demo_dataset

    tmp = Path(tempfile.mkdtemp(prefix="report-bench-"))
    data = Path(args.data) if args.data else make_demo_dataset(
        tmp / "demo", train_per_class=1, val_per_class=-(-args.images // 21)) / "val"
    weights = Path(args.weights) if args.weights else _weights(tmp, sorted(class_names()), args.size)
    base = [sys.executable, "-m", "convnext_fast", "eval", str(weights), str(data), "--loader", args.loader, *extra]
    load = os.getloadavg()
    plain, with_report, report_s, eval_s = [], [], [], []
    for r in range(args.rounds):
        arms = ("plain", "report") if r % 2 == 0 else ("report", "plain")
        for arm in arms:
            if arm == "plain":
                plain.append(_run(base)[0])
            else:
                wall, out = _run([*base, "--report", str(tmp / f"report{r}")])
                with_report.append(wall)
                m = re.search(r"built in ([\d.]+)s after an eval pass of ([\d.]+)s", out)
                report_s.append(float(m.group(1)))
                eval_s.append(float(m.group(2)))
    med = statistics.median
    record = {
        "what": "eval vs eval --report, fresh process per run, interleaved rounds",
        "images": sum(1 for _ in data.rglob("*.jpg")), "classes": len(class_names()), "img_size": args.size,
        "command": " ".join(base), "rounds": args.rounds,
        "eval_wall_s": plain, "eval_report_wall_s": with_report,
        "report_s_in_process": report_s, "eval_pass_s_in_process": eval_s,
        "extra_wall_share": med(with_report) / med(plain) - 1, "report_over_eval_pass": med(report_s) / med(eval_s),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu": _cpu_model()},
        "load_avg_start": load, "load_avg_end": os.getloadavg(),
        "git_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    print(json.dumps(record, indent=2))
    print(f"\neval {med(plain):.1f}s, eval --report {med(with_report):.1f}s (median of {args.rounds}): "
          f"+{100 * record['extra_wall_share']:.0f}% wall; report itself {med(report_s):.2f}s = "
          f"{100 * record['report_over_eval_pass']:.0f}% of the eval pass ({med(eval_s):.1f}s); "
          f"load {load[0]:.1f} -> {record['load_avg_end'][0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
