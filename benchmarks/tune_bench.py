"""Does `convnext-fast tune` beat the preset within one wall-time budget, on real photos?

Data: a class-balanced subset of Debian's dataset-fashion-mnist (real product photos, 28x28 grey), written as
RGB JPEGs in an image folder (train/ and val/ class folders). Model: convnext_atto at 32 px. One
`convnext-fast tune --time-limit BUDGET` study on the `demo` preset: stage 1 short trials, stage 2 the finalists
at the preset's epochs, then the winner and the preset (the enqueued default) each with a second seed. Reported:
the winner's val top-1 against the preset's at the same final budget (the preset's epochs), two seeds each, the
seed noise, and the stage-1/stage-2 rank correlation (Spearman) of the finalists.

    apt-get install dataset-fashion-mnist
    .venv/bin/python benchmarks/tune_bench.py --budget 20m --per-class 40

Results: benchmarks/results/tune-<device>-<cores>core-<UTC date>.{json,md} (machine, load, command, figures).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _idx(path: Path):
    import numpy as np
    raw = gzip.open(path).read()
    if raw[2] == 8 and raw[3] == 3:
        n, h, w = (int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    n = int.from_bytes(raw[4:8], "big")
    return np.frombuffer(raw, np.uint8, offset=8)


def make_folder(root: Path, per_class: int, val_per_class: int) -> Path:
    """train/ from the first ``per_class`` train images of each class, val/ from the test set; RGB JPEGs."""
    from PIL import Image

    if (root / "done").exists():
        return root
    for split, images, labels, n in (("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", per_class),
                                     ("val", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", val_per_class)):
        x, y = _idx(FMNIST / images), _idx(FMNIST / labels)
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i, j in enumerate((y == c).nonzero()[0][:n]):
                Image.fromarray(x[j]).convert("RGB").save(d / f"{j}.jpg", quality=95)
    (root / "done").write_text("ok")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6, help="the preset's (final) epochs")
    ap.add_argument("--trial-epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/convnext-fast-tune-bench")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not FMNIST.exists():
        print("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 2
    work = Path(args.work)
    data = make_folder(work / f"fmnist-{args.per_class}-{args.val_per_class}", args.per_class, args.val_per_class)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    out = work / f"study-{stamp}"
    cmd = [sys.executable, "-m", "convnext_fast.cli", "tune", str(data), "--out", str(out), "--preset", "demo",
           "--time-limit", args.budget, "--img-size", "32", "--epochs", str(args.epochs), "--trial-epochs",
           str(args.trial_epochs), "--finalists", "3", "--device", args.device, "--loader", "torchvision",
           "--loader-workers", "0"]
    load0, t0 = os.getloadavg()[0], time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    (work / f"tune-{stamp}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from convnext_fast.tune import report as rep
    from convnext_fast.tune import study as st

    study = optuna.load_study(study_name=st.STUDY_NAME,
                              storage=JournalStorage(JournalFileBackend(str(out / "journal.log"))))
    states: dict[str, int] = {}
    for t in st.trials(study, stage=st.STAGE1):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    comp, agree = rep.comparison(study), rep.rank_agreement(study)
    plan_line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith("total:")), "")
    result = {
        "command": shlex.join(cmd), "budget": args.budget, "wall_s": round(wall, 1), "load_before": load0,
        "load_after": os.getloadavg()[0], "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.system()} (shared VM)", "device": args.device,
        "data": f"fashion-mnist {args.per_class}/class train, {args.val_per_class}/class val, 10 classes, RGB JPEG",
        "stage1_states": states, "comparison": comp, "spearman": agree["rho"],
        "finalists": [{"stage1_trial": n, "stage1_top1": a, "stage2_top1": b} for a, b, n in agree["pairs"]],
        "plan": plan_line.strip(), "study_dir": str(out),
        "git": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
    }
    dest = REPO / "benchmarks" / "results" / f"tune-{args.device}-{os.cpu_count()}core-{stamp[:10]}"
    if dest.with_suffix(".json").exists():  # results are added, never overwritten
        dest = dest.with_name(f"{dest.name}-{stamp[11:]}")
    dest.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# tune vs the preset on fashion-mnist ({stamp} UTC)", "", f"- machine: {result['machine']}",
             f"- command: `{result['command']}`", f"- wall time {wall / 60:.1f} min (budget {args.budget}); "
             f"load {load0:.1f} -> {result['load_after']:.1f}", f"- stage 1 trials: {states}", ""]
    if comp:
        lines += [f"- winner (trial {comp['winner']['trial']}): seeds {comp['winner']['seeds']} mean "
                  f"{comp['winner']['mean']:.2f}%", f"- preset (trial {comp['default']['trial']}): seeds "
                  f"{comp['default']['seeds']} mean {comp['default']['mean']:.2f}%",
                  f"- seed noise {comp['noise']}; verdict: {comp['verdict']}"]
    lines += [f"- Spearman stage 1 vs stage 2 over {len(agree['pairs'])} finalists: {agree['rho']}"]
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
