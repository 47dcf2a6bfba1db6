"""Provenance and arithmetic for benchmark results: the environment, model FLOPs, the device's peak, MFU.

Every number the benchmark writes carries the machine, the versions, the git commit and the command that made
it (airbench's habit), so a result can be compared, or doubted, later.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["FLOPS_CONVENTION", "collect_environment", "forward_flops", "mfu", "peak_tflops", "peak_tflops_for_name"]

FLOPS_CONVENTION = (
    "FLOPs counted by torch.utils.flop_counter.FlopCounterMode on one forward pass (a multiply-add = 2 FLOPs; "
    "convolutions and matmuls only); training FLOPs per image = 3 x forward (backward ~ 2 x forward). "
    "MFU = training FLOPs per image x images/s / the device's peak dense bf16 tensor FLOP/s, for every step "
    "(fp32 ones too: the fraction of the chip's best a step uses)."
)

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets. Order matters: first match wins.
_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),  # SXM
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops_for_name(gpu_name: str) -> float | None:
    """Datasheet peak dense bf16 TFLOP/s of a GPU named like `torch.cuda.get_device_name`; None if unknown."""
    for pattern, tflops in _PEAK_BF16_TFLOPS:
        if re.search(pattern, gpu_name):
            return tflops
    return None


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from); (None, reason) when unknown (e.g. a CPU): no MFU then."""
    if override is not None:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for CPUs (pass --peak-tflops to get an MFU)"
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops_for_name(name)
    if tflops is None:
        return None, f"no peak known for {name!r} (pass --peak-tflops to get an MFU)"
    return tflops, f"datasheet dense bf16 for {name!r}"


def mfu(samples_per_sec: float, train_flops_per_sample: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in % (None without a known peak)."""
    if not peak:
        return None
    return 100 * samples_per_sec * train_flops_per_sample / (peak * 1e12)


def forward_flops(model_name: str, num_classes: int, img_size: int) -> int:
    """FLOPs of one image's forward pass through `model_name`, counted on the meta device (no compute, no memory)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        x = torch.empty(1, 3, img_size, img_size)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


_ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
             "TORCHINDUCTOR_COMPILE_THREADS", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_CACHE_DIR")


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return None


def _dali_version() -> str | None:
    # DALI ships one distribution per CUDA major (nvidia-dali-cuda120, -cuda130, ...): find whichever is installed.
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git() -> dict:
    root = Path(__file__).resolve().parent.parent
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return {"commit": None, "dirty": None, "changed": []}
    # What ran is the package: its modified and untracked files make the commit an incomplete record.
    status = _run(["git", "status", "--porcelain", "--", "convnext_fast"], cwd=root) or ""
    changed = [line.split(maxsplit=1)[1] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}


def _gpu(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    driver = _run(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=driver_version",
                   "--format=csv,noheader"])
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def collect_environment(device: torch.device) -> dict:
    """Machine, versions, git commit and the command line as typed, recorded with every result."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    from convnext_fast import __version__

    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": shlex.join(sys.argv),
        "device": str(device),
        "gpu": _gpu(device),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "cores_usable": affinity,
                "torch_threads": torch.get_num_threads(), "memory_gib": _memory_gib(),
                "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        # Thread settings change CPU figures a lot on a shared machine (OpenMP spin-waiting), so keep them.
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "convnext_fast": __version__,
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "timm": _version("timm"),
            "nvidia_dali": _dali_version(),
            "numpy": _version("numpy"),
            "pillow": _version("pillow", "Pillow"),
        },
        "git": _git(),
    }
