"""benchmarks/gpu_check.sh (dry run: no GPU here) and loader_bench.py's first-epoch main-thread figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_the_three_steps_into_one_folder(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "DRY_RUN": "1", "DEVICE": "cpu", "OUT": str(out), "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(steps) == ["pytest-gpu", "bench", "cache"]
    assert "-m pytest -q -m gpu" in steps["pytest-gpu"]
    bench = steps["bench"]
    for part in ("--model convnext_tiny", "--sizes 128,176,192", "--ablation-sizes 176", "--batch-size 256"):
        assert part in bench
    assert "cache_bench.py" in steps["cache"]
    for cmd in steps.values():  # everything lands in the one results folder
        assert str(out) in cmd
    assert not out.exists()  # a dry run writes nothing


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    if subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("this machine has nvidia-smi")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "x")}, timeout=60)
    assert proc.returncode == 2 and "needs a GPU machine" in proc.stderr and not (tmp_path / "x").exists()


def test_loader_bench_reports_the_first_epochs_main_thread_cost(tmp_path):
    pytest.importorskip("nvidia.dali")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.jpg")
    cmd = [sys.executable, str(REPO / "benchmarks" / "loader_bench.py"), "--data", str(tmp_path / "data"),
           "--sizes", "24", "--batch-size", "4", "--workers", "1", "--randaugment", "on", "--repeats", "0",
           "--consumer-ms", "20", "--out-dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(next((tmp_path / "out").glob("*.json")).read_text())["results"]
    for backend in ("dali", "torchvision"):
        first = result["first_epoch"][backend]
        assert first["main_thread_batches"] == 16 // 4 - 1 and first["consumer_busy_ms"] == 20
        assert first["main_thread_ms_per_batch"] == result["main_thread_ms_per_batch"][backend] >= 0
    bad = subprocess.run(cmd[:-2] + ["--repeats", "1", "--backends", "dali"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "--backends" in bad.stderr
