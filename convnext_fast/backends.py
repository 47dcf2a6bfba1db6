"""The process-wide CUDA backend policy, set in one place for every command that runs the model.

`train`, `eval`/`predict`/`export` (through `convnext_fast.inference.load_model`) and `benchmark` call
`set_backends` before building their model, so the benchmark measures the configuration training runs (both its fast and baseline arms: a baseline left at fp32 GEMMs would inflate the
ratio) and `eval` reproduces training's numerics. `backend_settings` is what the benchmark JSON records.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT32_MATMUL_PRECISION", "backend_settings", "set_backends"]

# TF32 for any fp32 matmul left on Ampere+ (the bf16 step has few; the fp32 baseline has all of them). No effect on
# the CPU.
FLOAT32_MATMUL_PRECISION = "high"


def set_backends(*, deterministic: bool = False) -> dict:
    """Set cuDNN autotuning (the shapes are static: convs are tuned once; off when `deterministic`, which also
    turns on torch's deterministic algorithms, warn-only) and the fp32 matmul precision. Returns
    `backend_settings()`."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.set_float32_matmul_precision(FLOAT32_MATMUL_PRECISION)
    return backend_settings()


def backend_settings() -> dict:
    """The backend flags in force now (JSON-ready)."""
    out = {
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    for key, read in (("cuda_matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                      ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32)):
        try:  # torch >= 2.9 may refuse a legacy read once the newer fp32_precision API was used by someone
            out[key] = bool(read())
        except RuntimeError:
            out[key] = None
    return out
