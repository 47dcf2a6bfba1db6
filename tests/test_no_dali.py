"""Without NVIDIA DALI (a GPU machine where it is not installed yet): every tool says so and measures the rest.
DALI is made unimportable (None in sys.modules), in this process or in a subprocess for the scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext_fast.data import BackendUnavailable, build_loader

REPO = Path(__file__).resolve().parents[1]
# Runs `code` with DALI unimportable; `import nvidia.dali` then raises ImportError (ModuleNotFoundError).
NO_DALI = "import sys; sys.modules['nvidia.dali'] = None; "


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("no_dali") / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-c", NO_DALI + code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def test_dali_loader_without_dali_is_a_one_line_user_error(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(BackendUnavailable) as info:
        build_loader(folder, train=True, img_size=32, batch_size=4, backend="dali", device="cpu")
    err = info.value
    assert isinstance(err, ValueError) and err.backend == "dali"  # the CLI prints a ValueError as one line
    assert str(err).startswith("--loader dali: not installed (NVIDIA DALI: ") and "--loader torchvision" in str(err)
    assert "\n" not in str(err)


def test_benchmark_records_dali_not_installed_and_measures_the_rest(folder, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["benchmark", str(folder), "--quick", "--device", "cpu", "--sizes", "32", "--ablation-sizes", "none",
            "--batch-size", "4", "--steps", "1", "--loader-steps", "2", "--warmup", "1", "--repeats", "1",
            "--workers", "1", "--no-compile", "--progressive", "off", "--json", str(out)]
    proc = _run(f"from convnext_fast.cli import main; sys.exit(main({argv!r}))", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dali: not installed" in proc.stdout
    doc = json.loads(out.read_text())
    rec = {(r["kind"], r["name"]): r for r in doc["results"]}
    for key in (("loader", "dali"), ("loop", "fast")):
        assert rec[key]["unavailable"] and rec[key]["error"].startswith("dali: not installed (NVIDIA DALI: ")
        assert "nvidia.dali" in rec[key]["error"]
    for key in (("loader", "torchvision"), ("loader", "synthetic"), ("step", "baseline"), ("step", "fast"),
                ("loop", "baseline")):
        assert "error" not in rec[key] and rec[key]["samples_per_sec"] > 0, key
    assert doc["summary"][0]["verdict"].startswith("no verdict")
    assert doc["peak_gpu_memory"] == [{"img_size": 32, "max_memory_allocated_mib": None,
                                       "max_memory_reserved_mib": None, "device_used_mib_at_end": None}]  # CPU
    jpeg = doc["environment"]["jpeg_backend"]
    assert jpeg["dali"] is None and jpeg["expected"].startswith("nothing: DALI is not installed")
    # Both arms ran under training's backend policy, and the JSON says which.
    backends = doc["environment"]["backends"]
    assert backends["float32_matmul_precision"] == "high" and backends["cudnn_benchmark"] is True


def test_loader_bench_measures_torchvision_alone_without_dali(folder, tmp_path):
    argv = ["--data", str(folder), "--sizes", "24", "--batch-size", "4", "--workers", "1", "--randaugment", "off",
            "--repeats", "1", "--consumer-ms", "1", "--out-dir", str(tmp_path / "out")]
    code = (f"sys.argv = ['loader_bench.py', *{argv!r}]; import runpy; "
            f"runpy.run_path({str(REPO / 'benchmarks' / 'loader_bench.py')!r}, run_name='__main__')")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dali: not installed" in proc.stdout
    (result,) = json.loads(next((tmp_path / "out").glob("*.json")).read_text())["results"]
    assert list(result["unavailable"]) == ["dali"]
    assert list(result["median_img_per_s"]) == ["torchvision"] and result["median_img_per_s"]["torchvision"] > 0
    assert result["ratio_dali_over_torchvision"] is None
    md = next((tmp_path / "out").glob("*.md")).read_text()
    assert "dali: not installed" in md and "| not measured |" in md
