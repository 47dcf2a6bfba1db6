"""`convnext-fast benchmark --quick` end to end on a tiny image folder: every code path, real measurements."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convnext_fast.benchmark.run import SPEED_FEATURES

TIMM_KEYS = ("samples_per_sec", "step_time_ms", "batch_size", "img_size")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run over all three loaders (3 classes x 12 JPEGs of 48 px: epochs of 4 batches of 8)."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "data" / "train" / f"class_{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / "train" / f"class_{c}" / f"{i}.jpg", quality=90)
    out = {"json": root / "out" / "bench.json", "markdown": root / "out" / "bench.md", "plot": root / "out" / "b.png"}
    # OMP_WAIT_POLICY=PASSIVE: on a shared 2-core machine spinning OpenMP threads slow the steps many-fold.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "convnext_fast", "benchmark", str(root / "data"), "--quick", "--device", "cpu",
           "--dataset-size", "1000", *[x for k, p in out.items() for x in (f"--{k}", str(p))]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out["json"].read_text()), out, proc.stdout


def _records(doc, kind):
    return [r for r in doc["results"] if r["kind"] == kind]


def test_every_measurement_ran_with_timm_style_keys(quick):
    doc, _, _ = quick
    cfg = doc["config"]
    assert cfg["sizes"] == [32, 48] and cfg["model"] == "convnext_atto" and cfg["batch_size"] == 8
    for size in (32, 48):
        names = {(r["kind"], r["name"]) for r in doc["results"] if r["img_size"] == size}
        assert {("loader", "dali"), ("loader", "torchvision"), ("loader", "synthetic"), ("step", "baseline"),
                ("step", "fast"), ("loop", "baseline"), ("loop", "fast"), ("loader", "dali-cached"),
                ("loop", "fast-cached")} <= names
    for r in doc["results"]:
        assert "error" not in r, r
        for key in TIMM_KEYS:
            assert r[key] is not None
        assert r["samples_per_sec"] > 0 and r["batch_size"] == 8
        windows = r["samples_per_sec_windows"]
        assert len(windows) == cfg["repeats"]
        assert r["samples_per_sec"] == pytest.approx(statistics.median(windows), rel=1e-3)
        assert r["samples_per_sec_min"] <= r["samples_per_sec"] <= r["samples_per_sec_max"]
        assert r["peak_mem_mib"] > 0
    for r in _records(doc, "step") + _records(doc, "loop"):
        assert r["param_count"] == pytest.approx(doc["param_count"]) and r["loss_finite"]
    for r in _records(doc, "loop"):
        assert 0 <= r["data_wait_pct"] <= 100
        assert r["reprob"] == 0.25  # the seed recipe's random erasing, beside the steps' Mixup/CutMix
        assert r["loader"] == {"baseline": "torchvision", "fast": "dali", "fast-cached": "dali-cached"}[r["name"]]
    for r in _records(doc, "loader"):
        # What the loader leaves on the consuming thread, measured with the consumer busy between batches.
        assert r["main_thread_ms_per_batch"] >= 0 and r["main_thread_batches"] > 0 and r["consumer_busy_ms"] > 0
        assert r["main_thread_wall_ms_per_batch"] >= 0
        # The cached loader really ran from a cache: the decode pass happened and the memory is accounted.
        if r["name"] == "dali-cached":
            info = r["cache_info"]
            assert info["storage"] in ("host", "device") and info["bytes"] > 0 and info["decode_s"] > 0


def test_steps_are_the_engine_baseline_and_fast_configurations(quick):
    doc, _, _ = quick
    steps = {(r["name"], r["img_size"]): r for r in _records(doc, "step")}
    assert steps["baseline", 32]["speed"] == doc["config"]["baseline"]
    assert steps["fast", 32]["speed"] == doc["config"]["fast"]
    assert not any(steps["baseline", 32]["speed"][f] not in (False, "off") for f in SPEED_FEATURES)
    # Ablations only at the first size under --quick; each flips exactly one feature of the fast step.
    ablations = [r for r in _records(doc, "step") if r["name"].startswith("fast-")]
    assert ablations and {r["img_size"] for r in ablations} == {32}
    for r in ablations:
        flipped = [f for f in SPEED_FEATURES if r["speed"][f] != doc["config"]["fast"][f]]
        assert len(flipped) == 1 and r["name"].endswith(flipped[0])


def test_speedups_and_epoch_times_are_computed_from_the_measurements(quick):
    doc, _, _ = quick

    def ips(kind, name, size):
        (r,) = [r for r in doc["results"] if (r["kind"], r["name"], r["img_size"]) == (kind, name, size)]
        return r["samples_per_sec"]

    for s in doc["summary"]:
        size = s["img_size"]
        assert s["step_speedup"] == pytest.approx(ips("step", "fast", size) / ips("step", "baseline", size))
        assert s["e2e_speedup"] == pytest.approx(ips("loop", "fast", size) / ips("loop", "baseline", size))
        assert s["loader_speedup_dali_vs_torchvision"] == pytest.approx(
            ips("loader", "dali", size) / ips("loader", "torchvision", size))
        assert s["epoch_time_s"]["fast"] == pytest.approx(1000 / ips("loop", "fast", size))
        assert s["loader_speedup_cached_vs_uncached"] == pytest.approx(
            ips("loader", "dali-cached", size) / ips("loader", "dali", size))
        assert s["epoch_time_s"]["fast-cached"] == pytest.approx(1000 / ips("loop", "fast-cached", size))
        assert s["pct_of_step_ceiling"]["fast"] == pytest.approx(
            100 * ips("loop", "fast", size) / ips("step", "fast", size))
        assert s["limited_by"] in ("loader", "model") and f"{s['pct_of_step_ceiling']['fast']:.0f}%" in s["verdict"]


def test_environment_and_flops_are_recorded(quick):
    doc, _, _ = quick
    env = doc["environment"]
    for key in ("torch", "torchvision", "timm", "nvidia_dali"):
        assert env["versions"][key]
    assert env["cpu"]["model"] and env["cpu"]["cores"] >= 1 and env["device"] == "cpu" and env["gpu"] is None
    assert env["command"].startswith("convnext-fast benchmark") and "--quick" in env["command"]
    assert "benchmark" in env["argv"] and env["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert set(env["git"]) == {"commit", "dirty", "changed"}
    flops = {f["img_size"]: f for f in doc["flops"]["per_size"]}
    assert flops[48]["fwd_flops_per_img"] > flops[32]["fwd_flops_per_img"] > 0
    assert flops[32]["train_flops_per_img"] == 3 * flops[32]["fwd_flops_per_img"]
    assert doc["peak_tflops"] is None and all(r.get("mfu_pct") is None for r in doc["results"])  # a CPU: no peak


def test_markdown_plot_and_terminal_tables_are_written(quick):
    doc, out, stdout = quick
    md = out["markdown"].read_text()
    assert doc["environment"]["command"] in md and "| size | measurement |" in md
    assert "end-to-end: fast loop (dali)" in md and doc["summary"][0]["verdict"] in md
    png = out["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "Speed-ups" in stdout and "limited by" in stdout and f"wrote {out['json']}" in stdout


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                    reason="needs NVIDIA DALI, which is not installed here")  # before the fixture's CPU run
def test_quick_on_cuda_records_gpu_memory_and_mfu(quick, tmp_path):
    """The same --quick run on the GPU: DALI's GPU graph, compile and bf16 on, CUDA memory, MFU where known."""
    _, out, _ = quick
    data = out["json"].parent.parent / "data"
    target = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "convnext_fast", "benchmark", str(data), "--quick", "--device", "cuda",
           "--json", str(target), "--markdown", str(tmp_path / "gpu.md"), "--plot", str(tmp_path / "gpu.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(target.read_text())
    assert doc["environment"]["gpu"]["name"] and doc["memory_kind"] == "cuda_max_memory_allocated"
    assert doc["config"]["fast"]["compile"] and doc["config"]["fast"]["amp"] == "bf16"
    fast = [r for r in doc["results"] if r["kind"] == "step" and r["name"] == "fast"]
    assert fast and all(r["compile_s"] is not None and r["loss_finite"] for r in fast)
    assert all("error" not in r for r in doc["results"])
    if doc["peak_tflops"]:
        assert all(r["mfu_pct"] > 0 for r in doc["results"] if r["kind"] in ("step", "loop"))


def test_progressive_projection_from_the_measured_step_throughput(quick):
    """--quick measures 32 and 48 px; the default projection ramps from the smallest to the largest size."""
    doc, out, shown = quick
    p = doc["projection"]
    assert p["schedule"]["img_size"] == 48 and p["schedule"]["start_size"] == 32 and p["schedule"]["epochs"] == 150
    fast = {r["img_size"]: r["samples_per_sec"] for r in _records(doc, "step") if r["name"] == "fast"}
    per = {s["img_size"]: s for s in p["per_size"]}
    assert all(per[s]["source"] == "measured" and per[s]["img_per_sec"] == fast[s] for s in (32, 48))
    expected = sum(1000 / fast[s] for s in p["schedule"]["per_epoch"])
    assert p["progressive_s"] == pytest.approx(expected) and p["fixed_s"] == pytest.approx(150 * 1000 / fast[48])
    assert p["time_ratio"] == pytest.approx(p["progressive_s"] / p["fixed_s"]) and 0 < p["flops_ratio"] < 1
    assert "Progressive resolution" in out["markdown"].read_text() and "x the training FLOPs" in shown
    assert "--progressive 32 --epochs 150" in doc["environment"]["command"]
