"""Time to accuracy: the same recipe trained at a fixed size and with progressive resolution, side by side.

Both arms are `convnext-fast train` runs on the same data, recipe, seed and epochs; they differ only in
`--progressive START` (the default FFCV-proportioned ramp to `--img-size`). They run AT THE SAME TIME, as two
processes with one thread each (OMP/torch threads 1, DALI threads 1), so a shared, noisy machine slows both alike;
the load average is sampled while they run, and each arm's CPU seconds are read at its end (less sensitive to the
load than wall time: an arm that ends first leaves the other more of the machine). Reported per arm: wall time (process, and the run's own training +
eval time), images/s per training size, best and final val top-1; then the ratios.

    .venv/bin/python benchmarks/progressive_bench.py          # demo data (21 classes x 50), atto, 32 -> 48, 8 epochs

Results: benchmarks/results/progressive-<device>-<cores>core-<UTC date>.{json,md} with the environment (CPU, load,
versions, git commit, command). Results are added, never edited: an existing name gets a suffix.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convnext_fast.benchmark.env import collect_environment  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="train/ + val/ image folder (default: a small demo set)")
    p.add_argument("--classes", type=int, default=21, help="demo data: classes (default 21, as the demo)")
    p.add_argument("--train-per-class", type=int, default=50, help="demo data: training images per class")
    p.add_argument("--val-per-class", type=int, default=20, help="demo data: validation images per class")
    p.add_argument("--source-size", type=int, default=64, help="demo data: stored image size (default 64)")
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--img-size", type=int, default=48, help="final (and fixed arm's) training size")
    p.add_argument("--progressive", type=int, default=32, help="progressive arm's start size")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loader", default="dali")
    p.add_argument("--threads", type=int, default=1, help="threads per arm (torch and loader)")
    p.add_argument("--extra", default="", help="more `train` flags for both arms, one string")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _arm_summary(run: Path, wall_s: float) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    per_size: dict[int, list[float]] = {}
    for r in rows:
        per_size.setdefault(r["img_size"], []).append(r["img_per_sec"])
    return {
        "process_wall_s": round(wall_s, 1), "run_wall_s": round(summary["wall_time_s"], 1),
        "train_s": round(sum(r["epoch_time_s"] for r in rows), 1),
        "best_top1": summary["best_top1"], "best_epoch": summary["best_epoch"],
        "final_top1": rows[-1]["val_top1"],
        "img_per_sec_by_size": {str(s): round(sum(v) / len(v), 1) for s, v in per_size.items()},
        "epochs_by_size": {str(s): len(v) for s, v in per_size.items()},
        "rows": rows,
    }


def run_arms(args: argparse.Namespace, data: Path, runs: Path) -> tuple[dict, dict, list]:
    base = [sys.executable, "-m", "convnext_fast", "train", str(data), "--preset", "demo", "--model", args.model,
            "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--loader", args.loader, "--workers", str(args.threads), "--device", "cpu", "--log-every", "1000",
            *shlex.split(args.extra)]
    commands = {"fixed": base + ["--out", str(runs / "fixed")],
                "progressive": base + ["--progressive", str(args.progressive), "--out", str(runs / "progressive")]}
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    procs = {k: subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in commands.items()}
    ended: dict[str, float] = {}
    cpu: dict[str, float] = {}
    loads = []
    while len(ended) < len(procs):
        time.sleep(5)
        loads.append(_load()[0])
        for k, p in procs.items():
            if k in ended:
                continue
            # wait4: the child's own CPU seconds (user + system, all its threads), which a busy shared machine
            # changes far less than the wall time (an arm that ends first leaves the other more of the machine).
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                ended[k], cpu[k] = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
                p.returncode = os.waitstatus_to_exitcode(status)
    logs = {k: p.stdout.read() for k, p in procs.items()}
    for k, p in procs.items():
        if p.returncode != 0:
            raise SystemExit(f"{k} arm failed ({p.returncode}):\n{logs[k][-3000:]}")
    arms = {k: {**_arm_summary(runs / k, ended[k]), "process_cpu_s": round(cpu[k], 1),
                "command": shlex.join(commands[k]),
                "header": [line for line in logs[k].splitlines() if line.startswith("resolution:")]}
            for k in commands}
    return arms["fixed"], arms["progressive"], loads


def _markdown(doc: dict) -> str:
    f, p, env = doc["fixed"], doc["progressive"], doc["environment"]
    r = doc["ratios"]
    sizes = sorted({*map(int, f["img_per_sec_by_size"]), *map(int, p["img_per_sec_by_size"])})

    def ips(arm, s):
        v = arm["img_per_sec_by_size"].get(str(s))
        return "-" if v is None else f"{v:.1f} ({arm['epochs_by_size'][str(s)]} ep)"

    lines = [
        f"# Progressive resolution, time to accuracy: {doc['config']['model']} on {env['cpu']['model']}",
        "",
        f"- date (UTC): {env['date_utc']}; git {env['git']['commit'][:12] if env['git']['commit'] else '?'}",
        f"- command: `{doc['command']}`",
        f"- machine: {env['cpu']['model']}, {env['cpu']['cores_usable']} usable cores (shared with other jobs); "
        f"load average before {doc['load_before']}, during (median of 5 s samples) {doc['load_during_median']}, "
        f"max {doc['load_during_max']}",
        f"- data: {doc['config']['data']}; both arms ran at the same time, one thread each",
        f"- progressive arm: {p['header'][0] if p['header'] else ''}",
        "",
        "| | fixed | progressive | progressive / fixed |",
        "|---|---|---|---|",
        f"| process wall time (s) | {f['process_wall_s']} | {p['process_wall_s']} | {r['process_wall']:.3f} |",
        f"| training time, sum of epochs (s) | {f['train_s']} | {p['train_s']} | {r['train_time']:.3f} |",
        f"| process CPU time (s, user + system) | {f['process_cpu_s']} | {p['process_cpu_s']} | "
        f"{r['process_cpu']:.3f} |",
        f"| best val top-1 (%) | {f['best_top1']:.2f} (ep {f['best_epoch']}) | {p['best_top1']:.2f} "
        f"(ep {p['best_epoch']}) | {r['best_top1_diff']:+.2f} points |",
        f"| final val top-1 (%) | {f['final_top1']:.2f} | {p['final_top1']:.2f} | {r['final_top1_diff']:+.2f} points |",
        *[f"| train img/s at {s}px | {ips(f, s)} | {ips(p, s)} | |" for s in sizes],
        "",
        "Commands:",
        "",
        f"- fixed: `{f['command']}`",
        f"- progressive: `{p['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="progressive-bench-") as tmp:
        data = args.data
        if data is None:
            from convnext_fast.data.demo import make_demo_dataset

            data = make_demo_dataset(Path(tmp) / "data", num_classes=args.classes,
                                     train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                     size=args.source_size)
        env = collect_environment(__import__("torch").device("cpu"))
        load_before = _load()
        fixed, prog, loads = run_arms(args, data, Path(tmp) / "runs")
    data_text = str(args.data) if args.data else (f"demo data, {args.classes} classes x {args.train_per_class} "
                                                  f"train / {args.val_per_class} val, {args.source_size} px JPEGs")
    doc = {
        "schema": "convnext_fast.progressive_bench/1", "environment": env,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "data": data_text},
        "load_before": load_before, "load_during_median": sorted(loads)[len(loads) // 2] if loads else None,
        "load_during_max": max(loads) if loads else None,
        "fixed": fixed, "progressive": prog,
        "ratios": {"process_wall": prog["process_wall_s"] / fixed["process_wall_s"],
                   "train_time": prog["train_s"] / fixed["train_s"],
                   "process_cpu": prog["process_cpu_s"] / fixed["process_cpu_s"],
                   "best_top1_diff": prog["best_top1"] - fixed["best_top1"],
                   "final_top1_diff": prog["final_top1"] - fixed["final_top1"]},
    }
    cores = env["cpu"]["cores_usable"]
    stem = f"progressive-cpu-{cores}core-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    args.out.mkdir(parents=True, exist_ok=True)
    n = 0
    while (args.out / f"{stem}{'-' + str(n) if n else ''}.json").exists():
        n += 1
    stem += f"-{n}" if n else ""
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(doc))
    print(_markdown(doc))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
