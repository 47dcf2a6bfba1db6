"""The one CUDA backend policy (train, eval and benchmark set it through `set_backends`), and what a first run on a
new machine records: which JPEG decoder DALI gets there."""

from __future__ import annotations

import pytest
import torch

from convnext_fast.backends import backend_settings, set_backends


@pytest.fixture
def restore_backends():
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
              torch.are_deterministic_algorithms_enabled())
    yield
    torch.backends.cudnn.benchmark = before[0]
    torch.set_float32_matmul_precision(before[1])
    torch.use_deterministic_algorithms(before[2])


def test_set_backends_sets_and_reports_the_policy(restore_backends):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    got = set_backends()
    assert got == backend_settings()
    assert got["cudnn_benchmark"] is True and got["float32_matmul_precision"] == "high"
    assert got["deterministic_algorithms"] is False
    strict = set_backends(deterministic=True)  # train --deterministic: no autotuning, deterministic algorithms
    assert strict["cudnn_benchmark"] is False and strict["deterministic_algorithms"] is True
    assert strict["float32_matmul_precision"] == "high"


def test_jpeg_backend_info_on_the_cpu():
    pytest.importorskip("nvidia.dali")
    from convnext_fast.data.jpeg_backend import jpeg_backend_info

    info = jpeg_backend_info("cpu")
    assert info["configured"] == {"decoder": "cpu"} and info["dali"].startswith("2.")
    # No GPU backend is tried without a GPU; the CPU decoder really decoded the probe (or nvImageCodec is absent).
    assert {k: v for k, v in info["probe"].items() if k != "cpu"} == {"hardware": None, "cuda": None,
                                                                      "hybrid_cpu_gpu": None}
    if info["nvimgcodec"]:
        assert info["probe"]["cpu"] is True and info["expected"].startswith("CPU")
    assert "DALI itself does not report" in info["how"]


@pytest.mark.gpu
def test_jpeg_backend_info_on_the_gpu():
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI, which is not installed here")
    from convnext_fast.data.jpeg_backend import jpeg_backend_info

    info = jpeg_backend_info("cuda")
    assert info["configured"]["decoder"] == "mixed" and info["probe"]["cpu"] is True
    assert info["probe"]["cuda"] is True  # nvJPEG on the CUDA cores works on every supported GPU
    assert info["expected"].startswith("hardware" if info["probe"]["hardware"] is True else "CUDA")
