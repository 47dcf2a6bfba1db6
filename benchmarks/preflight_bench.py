"""Preflight cost on an image folder: the cheap checks alone, cheap + header parse (what every run now does), the
sample-list fingerprint the trainer records, and `--verify-images` with a fresh verification record (first run)
and with the record it left (second run).

    python benchmarks/preflight_bench.py DATA [--repeats 3] [--extrapolate 70000]

DATA is a class-folder tree (e.g. the demo dataset's train/). Every figure is the median of --repeats runs, in
ms per image, with the projection to --extrapolate images at the same per-image cost. The page cache is warm
after the first repeat (as on a second run on the same machine); a cold network filesystem costs more.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convnext_fast.data import index as I  # noqa: E402
from convnext_fast.data.headers import header_check  # noqa: E402


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extrapolate", type=int, default=70000)
    args = ap.parse_args()
    root = Path(args.data)
    index = I.scan_folder(root)  # also warms the page cache
    paths = [p for p, _ in index.samples]
    n = len(paths)
    rows = {
        "cheap checks only (before this change)": lambda: I._check_all(I.cheap_check, paths),
        "cheap + header parse (every run now)": lambda: I._check_all(lambda p: I.cheap_check(p) or header_check(p),
                                                                    paths),
    }
    from convnext_fast.checkpoint import data_fingerprint

    rows["sample-list fingerprint (every run; stat + hash of paths)"] = lambda: data_fingerprint(index)
    results = {name: _time(fn, args.repeats) for name, fn in rows.items()}

    def verify(fresh: bool) -> float:
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as record_dir:
                os.environ["CONVNEXT_FAST_VERIFY_DIR"] = record_dir
                if not fresh:
                    I.scan_folder(root, verify_images=True)  # leaves the record
                start = time.perf_counter()
                I.scan_folder(root, verify_images=True)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    results["--verify-images, first run (no record)"] = verify(True)
    results["--verify-images, second run (record, nothing changed)"] = verify(False)
    load = os.getloadavg()
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"# preflight on {root} ({n} images), {os.cpu_count()} cores ({cpu}), load {load[0]:.2f}, "
          f"median of {args.repeats}\n")
    print(f"| check | total s | ms per image | projected for {args.extrapolate} images |")
    print("|---|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s:.2f} | {1000 * s / n:.3f} | {s / n * args.extrapolate:.1f} s |")


if __name__ == "__main__":
    main()
