"""Decoded-image cache benchmark: the DALI loader with `--cache` against the same loader without it.

Same images, same train transforms, same batches (the cached loader's batches equal the uncached ones pixel for
pixel), same threads. Per (size, RandAugment) setting: each loader's first epoch is timed on its own (the cached
loader's includes its decode pass: what a run's first epoch costs), then timed epochs alternate uncached, cached,
cached, uncached, ... so a noisy shared machine slows both alike. Reported: images/s and epoch time (median,
min-max), CPU ms per image (this process: main thread + DALI threads), the cached/uncached ratios, the decode
pass's time and the cache's memory.

    .venv/bin/python benchmarks/cache_bench.py                        # demo data, 176, RandAugment on+off, host
    .venv/bin/python benchmarks/cache_bench.py --device cuda --caches host,device --sizes 176,192

Results: benchmarks/results/cache-<device>-<cores>core-<UTC date>.{json,md} with the environment (CPU, load,
versions, git commit, command). Results are added, never edited: an existing name gets a suffix.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from loader_bench import time_epoch  # noqa: E402

from convnext_fast.benchmark.env import collect_environment  # noqa: E402
from convnext_fast.data import build_loader, default_num_workers, scan_folder  # noqa: E402


def _first_epoch(loader) -> float:
    """Wall seconds of epoch 0 from a fresh loader: pipeline build (+ the cache's decode pass) included."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def _stats(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "all": [round(v, digits) for v in values]}


def bench_setting(index, size: int, randaugment, args) -> dict:
    modes = ["off"] + args.caches
    loaders = {m: build_loader(index, train=True, img_size=size, batch_size=args.batch_size, backend="dali",
                               device=args.device, num_workers=args.workers, randaugment=randaugment, seed=0,
                               cache=m, cache_size=args.cache_size) for m in modes}
    rate = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    secs = {m: [] for m in modes}
    try:
        first = {m: _first_epoch(loaders[m]) for m in modes}
        for r in range(args.repeats):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                ips, cpu_ms, n = time_epoch(loaders[m], r + 1)
                rate[m].append(ips)
                cpu[m].append(cpu_ms)
                secs[m].append(n / ips)
                print(f"  size {size} ra={randaugment} repeat {r}: cache {m:6s} {ips:8.1f} img/s {cpu_ms:6.3f} CPU "
                      f"ms/img (load {os.getloadavg()[0]:.1f})", flush=True)
        info = {m: loaders[m].cache_info for m in args.caches}
    finally:
        for ld in loaders.values():
            ld.close()
    out = {"img_size": size, "randaugment": list(randaugment) if randaugment else None,
           "images_per_epoch": len(loaders["off"]) * args.batch_size,
           "first_epoch_s": {m: round(v, 2) for m, v in first.items()},
           "img_per_s": {m: _stats(rate[m]) for m in modes}, "epoch_s": {m: _stats(secs[m], 3) for m in modes},
           "cpu_ms_per_img": {m: _stats(cpu[m], 3) for m in modes}, "cache": info, "ratios": {}}
    for m in args.caches:
        paired = [c / o for c, o in zip(rate[m], rate["off"])]
        out["ratios"][m] = {
            "img_per_s": round(statistics.median(rate[m]) / statistics.median(rate["off"]), 3),
            "median_paired_img_per_s": round(statistics.median(paired), 3),
            "paired_range": [round(min(paired), 3), round(max(paired), 3)],
            "cpu_off_over_cached": round(statistics.median(cpu["off"]) / statistics.median(cpu[m]), 3),
        }
    return out


def to_markdown(record: dict) -> str:
    env, cfg = record["environment"], record["config"]
    lines = [
        f"# Cache benchmark: DALI loader with vs without the decoded-image cache ({env['device']}, "
        f"{env['date_utc']})",
        "",
        f"- machine: {env['cpu']['model']}, {env['cpu']['cores_usable']} usable cores, load avg at start "
        f"{env['cpu']['load_avg_1m']}; GPU: {env['gpu'] or 'none'}",
        f"- versions: torch {env['versions']['torch']}, DALI {env['versions']['nvidia_dali']}; git {env['git']}",
        f"- data: {cfg['data']} ({cfg['num_images']} images); batch {cfg['batch_size']}; {cfg['workers']} DALI "
        f"threads; cache size bound {cfg['cache_size']}; first epoch timed alone, then {cfg['repeats']} timed "
        "epochs per loader, alternating",
        f"- command: `{env['argv']}`",
        "",
        "| size | RandAugment | cache | img/s (min-max) | epoch s | CPU ms/img | img/s vs off (paired range) "
        "| CPU off/cached | 1st epoch s | decode pass s | cache memory |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        ra = "off" if r["randaugment"] is None else f"n={r['randaugment'][0]}, m={r['randaugment'][1]}"
        for m, s in r["img_per_s"].items():
            q, info = r["ratios"].get(m), (r["cache"] or {}).get(m) or {}
            ratio = f"{q['img_per_s']:.2f}x ({q['paired_range'][0]:.2f}-{q['paired_range'][1]:.2f})" if q else "1"
            cpu_ratio = f"{q['cpu_off_over_cached']:.2f}x" if q else "1"
            mem = f"{info['bytes'] / (1 << 20):.0f} MiB {info['storage']}" if info else "-"
            decode = f"{info['decode_s']:.2f}" if info.get("decode_s") is not None else "-"
            lines.append(f"| {r['img_size']} | {ra} | {m} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | "
                         f"{r['epoch_s'][m]['median']:.2f} | {r['cpu_ms_per_img'][m]['median']:.3f} | {ratio} | "
                         f"{cpu_ratio} | {r['first_epoch_s'][m]:.2f} | {decode} | {mem} |")
    lines += ["", "Medians over the timed epochs. 'img/s vs off' is the ratio of medians (range of the per-round "
              "paired ratios in parentheses); CPU ms/img counts this process's CPU time (main thread + DALI "
              "threads) per image, less sensitive than img/s to other load on a shared machine. The first epoch "
              "of a cached loader includes its decode pass."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="class-folder image directory (default: the demo dataset's train split)")
    ap.add_argument("--sizes", default="176")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="DALI threads (default: cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--randaugment", choices=("on", "off", "both"), default="both")
    ap.add_argument("--caches", default="host", help="cache modes compared with off: host, device, auto")
    ap.add_argument("--cache-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.workers = default_num_workers() if args.workers is None else args.workers
    args.caches = [c for c in args.caches.split(",") if c]
    if args.data is None:
        from convnext_fast.data.demo import ensure_demo_dataset

        args.data = str(ensure_demo_dataset() / "train")
    index = scan_folder(args.data)
    settings = {"on": [(2, 9)], "off": [None], "both": [None, (2, 9)]}[args.randaugment]
    device = torch.device(args.device)
    env = collect_environment(device)
    results = []
    for ra in settings:
        for size in (int(s) for s in args.sizes.split(",")):
            r = bench_setting(index, size, ra, args)
            results.append(r)
            gains = [f"{m} {q['img_per_s']:.2f}x img/s, {q['cpu_off_over_cached']:.2f}x CPU"
                     for m, q in r["ratios"].items()]
            print(f"size {size} ra={ra}: " + ", ".join(gains), flush=True)
    record = {"environment": env,
              "config": {"data": args.data, "num_images": len(index), "batch_size": args.batch_size,
                         "workers": args.workers, "repeats": args.repeats, "device": args.device,
                         "caches": args.caches, "cache_size": args.cache_size,
                         "transforms": "RandomResizedCrop(0.08-1, 3/4-4/3) + flip 0.5 + RandAugment (or off) + "
                                       "normalize; float32 channels_last"},
              "results": results}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"cache-{device.type}-{env['cpu']['cores_usable']}core-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    if (out_dir / f"{name}.json").exists():
        name += f"-{dt.datetime.now(dt.timezone.utc):%H%M%S}"
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(to_markdown(record))
    print(f"wrote {out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
