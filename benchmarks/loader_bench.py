"""Loader-only benchmark: the DALI loader against the torchvision baseline, side by side, on the same images.

Both loaders get the same CPU budget (DALI threads = DataLoader worker processes), the same train transforms
(random-resized-crop, flip, RandAugment, normalize) and the same batches of files (`epoch_indices`). Each
(size, RandAugment) setting builds both loaders once, runs one warm-up epoch of each (pipeline build, worker
start, page cache; excluded), then alternates timed epochs: dali, torchvision, torchvision, dali, ... so a noisy,
shared machine slows both alike. Reported: images/s per epoch, the median over repeats, and the dali/torchvision
ratio of medians (plus the median of the per-repeat ratios).

The warm-up epoch (the first: DALI does not know the image headers yet) measures `main_thread_ms_per_batch`: the
consuming thread's own CPU time inside next(loader) (`time.thread_time`), median over the epoch's batches after
the first, while the consumer sleeps `--consumer-ms` per batch as a training thread does while its GPU step runs.
That is the host work a loader leaves on the training thread; `main_thread_wall_ms_per_batch` is the wall time.

    .venv/bin/python benchmarks/loader_bench.py                      # demo data, 128/176/192, RandAugment on+off
    .venv/bin/python benchmarks/loader_bench.py --data DIR --sizes 176 --repeats 5
    .venv/bin/python benchmarks/loader_bench.py --sizes 32 --batch-size 256 --randaugment on --repeats 1

Results go to benchmarks/results/loader-<device>-<cores>core-<UTC date>.{json,md} with the environment (CPU, core
count, load, versions, git commit, command). Results are added, never edited: an existing name gets a suffix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os

# Before torch loads OpenMP, as the CLI does (convnext_fast/cli.py): spinning OpenMP threads starve DALI's threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convnext_fast.benchmark.env import collect_environment  # noqa: E402
from convnext_fast.benchmark.timing import main_thread_cost, sync  # noqa: E402
from convnext_fast.data import BackendUnavailable, build_loader, default_num_workers, scan_folder  # noqa: E402

BACKENDS = ("dali", "torchvision")


_TICK = os.sysconf("SC_CLK_TCK")


def _process_tree() -> list[int]:
    """This process and its descendants (the DataLoader's worker processes), from /proc."""
    pids, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids`, all threads included."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / _TICK


def time_epoch(loader, epoch: int, device: torch.device) -> tuple[float, float, int]:
    """(images/s, CPU ms per image, images) over one whole epoch; nothing else is done per batch.

    CPU time counts this process (main thread + DALI threads) and its worker processes: on a shared machine the
    wall-clock rate depends on the neighbours, CPU per image much less so. On CUDA the device is synchronized
    before both clock reads: a GPU loader's last batches are finished work, not just queued kernels.
    """
    loader.set_epoch(epoch)
    n = 0
    pids = _process_tree()  # persistent workers: the same processes for the whole epoch
    sync(device)
    cpu0, start = _cpu_seconds(pids), time.perf_counter()
    for images, _ in loader:
        n += images.shape[0]
    sync(device)
    wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu0
    return n / wall, 1000 * cpu / max(n, 1), n


def first_epoch_main_thread(loader, busy_ms: float) -> dict:
    """main_thread_cost over the whole of epoch 0 (the warm-up), its first batch (start-up) reported apart."""
    loader.set_epoch(0)
    return main_thread_cost(iter(loader), len(loader), busy_ms / 1000, skip_first=True)


def build_loaders(index, size: int, randaugment, args) -> tuple[dict, dict]:
    """({backend: loader}, {backend: why not}): a backend whose library is missing (DALI) is reported, not fatal."""
    loaders, missing = {}, {}
    for b in args.backends:
        try:
            loaders[b] = build_loader(index, train=True, img_size=size, batch_size=args.batch_size, backend=b,
                                      device=args.device, num_workers=args.workers, randaugment=randaugment,
                                      reprob=args.reprob, seed=0)
        except BackendUnavailable as e:
            missing[b] = e.status
            print(f"  {e.status}: not measured", flush=True)
    return loaders, missing


def bench_setting(index, size: int, randaugment, args) -> dict:
    loaders, missing = build_loaders(index, size, randaugment, args)
    present = tuple(b for b in args.backends if b in loaders)
    head = {"img_size": size, "randaugment": list(randaugment) if randaugment else None, "reprob": args.reprob,
            "unavailable": missing}
    main = {}
    try:
        for b in present:  # warm-up, excluded from the throughput; the main-thread cost of a first epoch
            main[b] = first_epoch_main_thread(loaders[b], args.consumer_ms)
            print(f"  size {size} ra={randaugment} epoch 0: {b:12s} main thread {main[b]['main_thread_ms_per_batch']} "
                  f"CPU ms/batch, {main[b]['main_thread_wall_ms_per_batch']} wall ms/batch (consumer busy "
                  f"{args.consumer_ms} ms/batch, load {os.getloadavg()[0]:.1f})", flush=True)
        head.update(first_epoch=main,
                    main_thread_ms_per_batch={b: main[b]["main_thread_ms_per_batch"] for b in present})
        if args.repeats == 0:  # the first epoch's main-thread figure only
            return head
        runs = {b: [] for b in present}
        cpu = {b: [] for b in present}
        for r in range(args.repeats):
            for b in (present if r % 2 == 0 else present[::-1]):
                rate, cpu_ms, n = time_epoch(loaders[b], r + 1, torch.device(args.device))
                runs[b].append(rate)
                cpu[b].append(cpu_ms)
                print(f"  size {size} ra={randaugment} repeat {r}: {b:12s} {rate:8.1f} img/s "
                      f"{cpu_ms:6.2f} CPU ms/img ({n} images, load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for ld in loaders.values():
            ld.close()
    med = {b: statistics.median(v) for b, v in runs.items()}
    both = all(b in runs for b in BACKENDS)
    paired = [d / t for d, t in zip(runs["dali"], runs["torchvision"])] if both else []
    return {
        **head,
        "img_per_s": {b: [round(v, 1) for v in runs[b]] for b in present},
        "median_img_per_s": {b: round(med[b], 1) for b in present},
        "spread_img_per_s": {b: [round(min(runs[b]), 1), round(max(runs[b]), 1)] for b in present},
        "ratio_dali_over_torchvision": round(med["dali"] / med["torchvision"], 3) if both else None,
        "median_paired_ratio": round(statistics.median(paired), 3) if both else None,
        "cpu_ms_per_img": {b: [round(v, 3) for v in cpu[b]] for b in present},
        "median_cpu_ms_per_img": {b: round(statistics.median(cpu[b]), 3) for b in present},
        "cpu_ratio_torchvision_over_dali": round(statistics.median(cpu["torchvision"]) /
                                                 statistics.median(cpu["dali"]), 3) if both else None,
    }


def _row(r: dict, ra: str) -> str:
    """One table row; '-' where a backend was not measured (not installed)."""
    d, t, c, m = r["median_img_per_s"], r["spread_img_per_s"], r["median_cpu_ms_per_img"], r["main_thread_ms_per_batch"]

    def cell(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)
    rate = {b: f"{d[b]:.0f} ({t[b][0]:.0f}-{t[b][1]:.0f})" if b in d else "not measured" for b in BACKENDS}
    return (f"| {r['img_size']} | {ra} | {rate['dali']} | {rate['torchvision']} | "
            f"{cell(r['ratio_dali_over_torchvision'], '{:.2f}x')} | {cell(c.get('dali'))} | "
            f"{cell(c.get('torchvision'))} | {cell(r['cpu_ratio_torchvision_over_dali'], '{:.2f}x')} | "
            f"{m.get('dali', '-')} | {m.get('torchvision', '-')} |")


def to_markdown(record: dict) -> str:
    env, cfg = record["environment"], record["config"]
    lines = [
        f"# Loader benchmark: DALI vs torchvision ({env['device']}, {env['date_utc']})",
        "",
        f"- machine: {env['cpu']['model']}, {env['cpu']['cores_usable']} usable cores, "
        f"load avg at start {env['cpu']['load_avg_1m']}; GPU: {env['gpu'] or 'none'}",
        f"- versions: torch {env['versions']['torch']}, torchvision {env['versions']['torchvision']}, "
        f"DALI {env['versions']['nvidia_dali']}; git {env['git']}",
        f"- data: {cfg['data']} ({cfg['num_images']} images); batch {cfg['batch_size']}; "
        f"{cfg['workers']} DALI threads = {cfg['workers']} DataLoader workers; {cfg['repeats']} timed epochs per "
        "loader after one warm-up epoch, alternating loaders",
        f"- command: `{env['argv']}`",
        "",
        "| size | RandAugment | DALI img/s (min-max) | torchvision img/s (min-max) | DALI / torchvision "
        "| CPU ms/img DALI | CPU ms/img torchvision | CPU ratio | main thread ms/batch DALI | torchvision |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in record["results"]:
        ra = "off" if r["randaugment"] is None else f"n={r['randaugment'][0]}, m={r['randaugment'][1]}"
        notes += [why for why in r.get("unavailable", {}).values() if why not in notes]
        m = r["main_thread_ms_per_batch"]
        if "median_img_per_s" not in r:  # --repeats 0
            lines.append(f"| {r['img_size']} | {ra} | - | - | - | - | - | - | {m.get('dali', '-')} | "
                         f"{m.get('torchvision', '-')} |")
            continue
        lines.append(_row(r, ra))
    if notes:
        lines += [""] + [f"- {why}: not measured" for why in notes]
    lines += ["", "Medians over the timed epochs; the ratio is of the medians (median of paired ratios in the JSON). "
              "CPU ms/img: user+system CPU of the loader's process and its DataLoader workers per image, less "
              "sensitive than img/s to other load on a shared machine; CPU ratio = torchvision / DALI. "
              f"Main thread ms/batch: the consumer's own CPU time inside next(loader) in the first epoch (median "
              f"over its batches after the first), the consumer sleeping {cfg['consumer_ms']} ms per batch."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="class-folder image directory (default: the demo dataset's train split)")
    ap.add_argument("--sizes", default="128,176,192")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="DALI threads = DataLoader workers (default: cores)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per loader (0: only the first epoch's "
                    "main-thread figure)")
    ap.add_argument("--randaugment", choices=("on", "off", "both"), default="both")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="with --repeats 0: measure only these")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (seed recipe: 0.25)")
    ap.add_argument("--consumer-ms", type=float, default=150.0,
                    help="first epoch: the consumer's time per batch outside next(loader), as a GPU step's")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.workers = default_num_workers() if args.workers is None else args.workers
    args.backends = tuple(args.backends.split(","))
    if args.repeats > 0 and sorted(args.backends) != sorted(BACKENDS) or not set(args.backends) <= set(BACKENDS):
        ap.error(f"--backends: {', '.join(BACKENDS)} (a subset only with --repeats 0)")
    if args.data is None:
        from convnext_fast.data.demo import ensure_demo_dataset

        args.data = str(ensure_demo_dataset() / "train")
    index = scan_folder(args.data)
    settings = {"on": [(2, 9)], "off": [None], "both": [(2, 9), None]}[args.randaugment]
    device = torch.device(args.device)
    env = collect_environment(device)
    results = []
    for ra in settings:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(bench_setting(index, size, ra, args))
            r = results[-1]
            if r.get("ratio_dali_over_torchvision") is not None:
                print(f"size {size} ra={ra}: dali {r['median_img_per_s']['dali']:.0f} img/s, torchvision "
                      f"{r['median_img_per_s']['torchvision']:.0f} img/s -> {r['ratio_dali_over_torchvision']:.2f}x",
                      flush=True)
    record = {
        "environment": env,
        "config": {"data": args.data, "num_images": len(index), "batch_size": args.batch_size,
                   "workers": args.workers, "repeats": args.repeats, "device": args.device, "reprob": args.reprob,
                   "consumer_ms": args.consumer_ms,
                   "transforms": "RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + flip 0.5 + RandAugment + "
                                 "normalize (+ random erasing when reprob > 0); float32 channels_last"},
        "results": results,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"loader-{device.type}-{env['cpu']['cores_usable']}core-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    if (out_dir / f"{name}.json").exists():
        name += f"-{dt.datetime.now(dt.timezone.utc):%H%M%S}"
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(to_markdown(record))
    print(f"wrote {out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
