"""benchmarks/gpu_check.sh (dry runs, a stand-in Python for the plumbing: no GPU here), benchmarks/stage_dali.py
(reassembly and a no-index install of fake wheels) and loader_bench.py's first-epoch main-thread figure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ["tests", "bench", "sizes", "ablations", "cache"]


def _gpu_check(*stages, env=None, timeout=60):
    return subprocess.run(["bash", str(GPU_CHECK), *stages], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _fake_bin(tmp_path, name, body):
    """An executable `name` in tmp_path/bin (a stand-in for nvidia-smi or for the Python the stages run)."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def test_gpu_check_stages_on_a_gpu_machine_keep_to_one_compile_each(tmp_path):
    """Stage by stage, what a GPU machine (a stand-in nvidia-smi here) would run: GPU tests without the
    benchmark's own GPU test, then ConvNeXt-Tiny at 176 px, batch 256, dali + torchvision, no ablations."""
    _fake_bin(tmp_path, "nvidia-smi", "echo 'NVIDIA H100 80GB HBM3'\n")
    env = {"DRY_RUN": "1", "PY": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "w"),
           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    proc = _gpu_check("all", env=env)
    assert proc.returncode == 0, proc.stderr
    steps = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert {"pytest-gpu-step", "pytest-gpu-dali", "bench", "sizes", "ablations", "cache"} <= set(steps)
    step, dali = steps["pytest-gpu-step"], steps["pytest-gpu-dali"]
    assert "-m pytest -m gpu" in step and "tests/test_engine.py" in step and "tests/test_gpu_sync.py" not in step
    assert "tests/test_gpu_sync.py" in dali and "tests/test_dali_gpu_vs_cpu.py" in dali
    assert "test_engine.py" not in dali and "test_benchmark.py" not in step + dali
    bench = steps["bench"].split()
    for flag, value in (("--model", "convnext_tiny"), ("--sizes", "176"), ("--batch-size", "256"),
                        ("--loaders", "dali,torchvision"), ("--ablation-sizes", "none"), ("--device", "cuda")):
        assert bench[bench.index(flag) + 1] == value, (flag, steps["bench"])
    assert "--quick" not in bench
    assert "--ablation-sizes 176" in steps["ablations"] and "--loaders synthetic" in steps["ablations"]
    assert "--sizes 128,192" in steps["sizes"] and "--progressive 128" in steps["sizes"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()  # a dry run writes nothing


def test_gpu_check_refuses_without_a_gpu_or_a_stage(tmp_path):
    usage = _gpu_check()
    assert usage.returncode == 2 and "step tests bench sizes ablations cache" in usage.stderr
    unknown = _gpu_check("bogus", env={"DEVICE": "cpu"})
    assert unknown.returncode == 2 and "unknown stage 'bogus'" in unknown.stderr
    if subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0:
        pytest.skip("this machine has nvidia-smi")
    proc = _gpu_check("tests", env={"OUT": str(tmp_path / "x")})
    assert proc.returncode == 2 and "needs a GPU machine" in proc.stderr and not (tmp_path / "x").exists()


def test_gpu_check_refreshes_one_archive_after_every_step(tmp_path):
    """DEVICE=cpu with a stand-in Python that logs its arguments: after each stage OUT holds the same two files,
    the archive grows with each finished step, a failing step is recorded and the next stage still runs."""
    py = _fake_bin(tmp_path, "python", 'echo "fake python $* DALI_USE_VMM=${DALI_USE_VMM:-unset}"\n'
                   'case "$*" in *"--sizes 32,48"*) echo "sizes went wrong" >&2; exit 3 ;;\n'
                   '  *dali_smoke.py*) echo \'{"memory_pool": "works only with DALI_USE_VMM=0"}\' > "${@: -1}" ;;\n'
                   'esac\n')
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"DEVICE": "cpu", "PY": str(py), "OUT": str(out), "WORK": str(work)}
    seen = []
    for stage in ("tests", "bench", "sizes", "cache"):
        proc = _gpu_check(stage, env=env)
        assert proc.returncode == (1 if stage == "sizes" else 0), proc.stdout + proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]
        with tarfile.open(out / "gpu-check.tar.gz") as tar:
            seen.append({Path(n).name for n in tar.getnames()})
    # The smoke test found that DALI's pool needs DALI_USE_VMM=0: set for the steps after it, and the next calls.
    assert "DALI_USE_VMM=0" in (work / "pytest-gpu-dali.log").read_text()
    assert "DALI_USE_VMM=0" in (work / "bench.log").read_text()
    assert {"dali-smoke.log", "pytest-gpu-dali.log", "dali-smoke.json"} <= seen.pop(0)
    assert {"bench.log", "summary.txt"} <= seen[0] and "sizes.log" not in seen[0]
    assert {"bench.log", "sizes.log"} <= seen[1] and {"bench.log", "sizes.log", "cache.log"} <= seen[2]
    summary = (out / "summary.txt").read_text()
    assert "bench: ok" in summary and "sizes: FAILED (exit 3" in summary and "cache: ok" in summary
    assert "--model convnext_atto" in (work / "bench.log").read_text()


def test_gpu_check_cuts_a_step_off_at_its_time_box(tmp_path):
    """A step that overruns is cut off at the stage's time box (STAGE_BUDGET), the archive still comes back; with
    several stages in one call, TOTAL_BUDGET bounds them all and a stage left with under 15 s is skipped."""
    py = _fake_bin(tmp_path, "python", 'case "$1" in -c) exit 0 ;; esac\nsleep 60\n')  # -c: the summary's header
    out = tmp_path / "out"
    env = {"DEVICE": "cpu", "PY": str(py), "OUT": str(out), "WORK": str(tmp_path / "w"), "STAGE_BUDGET": "15",
           "TOTAL_BUDGET": "20"}
    start = time.monotonic()
    proc = _gpu_check("bench", "cache", env=env, timeout=90)
    assert time.monotonic() - start < 40 and proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "bench: CUT OFF at its 15 s time box" in summary and "stage bench: done" in summary
    assert "cache: skipped (the stage's time box is spent)" in summary
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        assert "./bench.log" in tar.getnames()


NVIDIA_INIT = b"__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"  # as nvImageCodec's wheel has


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (dist-info with METADATA, WHEEL, RECORD)."""
    dist = f"{name}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def stage_dali():
    spec = importlib.util.spec_from_file_location("stage_dali", REPO / "benchmarks" / "stage_dali.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_dali_slims_a_wheel_and_rewrites_its_record(tmp_path, stage_dali):
    """--slim drops headers and other Pythons' C extensions, strips ELF files; RECORD matches what is left."""
    so = Path(sysconfig.get_config_var("DESTSHARED")) / f"_json{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not so.is_file():
        pytest.skip(f"no {so} to strip")
    src = tmp_path / "src"
    src.mkdir()
    wheel = _wheel(src, "nvidia_fake", "1.0", {
        "nvidia/dali/__init__.py": b"x = 1\n", "nvidia/dali/include/big.h": b"h" * 5000,
        "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so": so.read_bytes(),
        "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so": so.read_bytes()})
    (tmp_path / "dst").mkdir()
    out, saved = stage_dali.restore_wheel(wheel, tmp_path / "dst", slim=True, py_tag="312")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        record = z.read("nvidia_fake-1.0.dist-info/RECORD").decode().splitlines()
        kept = z.read("nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so")
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            if digest:
                assert stage_dali._record_line(path, z.read(path)) == line
    assert "nvidia/dali/include/big.h" not in names
    assert "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so" not in names
    assert kept[:4] == b"\x7fELF" and len(kept) <= so.stat().st_size and saved >= 5000 + so.stat().st_size
    assert {r.split(",")[0] for r in record} == names


def test_stage_dali_parts_reassemble_and_install_with_no_index(tmp_path, stage_dali):
    """Fake wheels packed into parts of 4 KiB; install names a missing part, refuses a corrupt one, and with all
    of them installs with pip --no-index; a non-NVIDIA wheel already installed here (pytest) is kept."""
    rng = np.random.default_rng(0)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "nvidia_fake_dali", "2.4.0", {"nvidia/__init__.py": NVIDIA_INIT,
                                                 "nvidia/fake_dali/__init__.py": b"VERSION = '2.4.0'\n",
                                                 "nvidia/fake_dali/blob.bin": rng.bytes(20_000)})
    _wheel(wheels, "pytest", "0.0.1", {"pytest_fake_marker.py": b""})
    stage = tmp_path / "stage"
    manifest = stage_dali.pack(wheels, stage, part_mib=4 / 1024, level=1)
    assert manifest["parts"] >= 3 and all(c["bytes"] <= 4096 for c in manifest["chunks"])
    assert sorted(p.name for p in stage.iterdir()) == [f"part{i}" for i in range(1, manifest["parts"] + 1)]
    install = [sys.executable, str(REPO / "benchmarks" / "stage_dali.py"), "install", "--stage", str(stage),
               "--target", str(tmp_path / "site"), "--no-smoke"]
    moved = stage / "part2" / f"{stage_dali.CHUNK}02"
    moved.rename(tmp_path / "held")
    proc = subprocess.run(install, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "part2/dali.tar.xz.02" in proc.stderr and "missing" in proc.stderr
    (tmp_path / "held").rename(moved)
    data = bytearray(moved.read_bytes())
    data[100] ^= 0xFF
    moved.write_bytes(bytes(data))
    proc = subprocess.run(install, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "corrupt" in proc.stderr
    data[100] ^= 0xFF
    moved.write_bytes(bytes(data))
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "nvidia" / "fake_dali" / "blob.bin").stat().st_size == 20_000
    assert not (tmp_path / "site" / "pytest_fake_marker.py").exists() and "kept as they are: pytest" in proc.stdout
    # On PYTHONPATH (the --target fallback), the installed `nvidia` package spans the environment's nvidia/ folders
    # too (torch's CUDA libraries; here the real DALI), instead of hiding them.
    probe = ("import importlib.util as u, nvidia.fake_dali as f; print(f.VERSION, "
             "u.find_spec('nvidia.cu13') is not None or u.find_spec('nvidia.dali') is not None)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert shown.stdout.split() == ["2.4.0", "True"], shown.stderr


def test_dali_smoke_decodes_one_batch_and_says_how(tmp_path):
    """The smoke test run right after a no-index install: on the CPU here (the same graph with device_id=None)."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dali_smoke.py"), "--device", "cpu", "--json",
                           str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["ok"] and res["pixels_ok"] and res["batch_shape"] == [8, 224, 224, 3]
    assert res["dali"] and res["decoded_by"].startswith("CPU") and len(res["tries"]) == 1
    assert f"decoded_by: {res['decoded_by']}" in proc.stdout


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
