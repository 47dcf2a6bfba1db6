"""Which JPEG decoder a machine gives the DALI loader: the GPU's hardware JPEG engine, nvJPEG on the CUDA cores,
or the CPU (libjpeg-turbo) as a fallback. A first run on a new GPU records it (benchmark JSON, the smoke test).

DALI does not report which backend decoded a sample. Its `decoders.image` runs on nvImageCodec, which can be asked
directly: `jpeg_backend_info` decodes one small baseline JPEG with an nvImageCodec decoder restricted to one
backend at a time, and says which succeeded ("probe"). With the loader's setting (`device="mixed"`,
`hw_decoder_load`), DALI sends that share of each batch's JPEGs to the hardware engine when the probe finds one,
the rest to the CUDA decoder; without one, all to CUDA; without CUDA decoding, to the CPU.
"""

from __future__ import annotations

import io
from importlib import metadata

import torch

__all__ = ["jpeg_backend_info"]

# probe name -> nvImageCodec BackendKind attribute
_BACKENDS = (("hardware", "HW_GPU_ONLY"), ("cuda", "GPU_ONLY"), ("hybrid_cpu_gpu", "HYBRID_CPU_GPU"),
             ("cpu", "CPU_ONLY"))


def _version(*names: str) -> str | None:
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if any(name.startswith(n) for n in names):
            return f"{dist.version} ({name})"
    return None


def _sample_jpeg() -> bytes:
    """A 64x48 baseline 4:2:0 JPEG: the kind every backend handles (the hardware engine only takes baseline)."""
    import numpy as np
    from PIL import Image

    px = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=90, subsampling=2, progressive=False)
    return buf.getvalue()


def _probe(nvimgcodec, kind: str, device_index: int, data: bytes) -> bool | str:
    try:
        backend = nvimgcodec.Backend(getattr(nvimgcodec, kind))
        decoder = nvimgcodec.Decoder(device_id=device_index, backends=[backend])
        return decoder.decode(data) is not None
    except Exception as e:  # a backend that cannot even start here (no library, no device)
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def jpeg_backend_info(device: str | torch.device | None = None) -> dict:
    """What decodes the DALI loader's JPEGs on `device` (default: CUDA when available). JSON-ready:
    `configured` (the loader's decoder setting), `probe` ({hardware, cuda, hybrid_cpu_gpu, cpu}: True when an
    nvImageCodec decoder limited to that backend decoded a baseline JPEG, False when it declined, a string when
    it failed, None when not tried), `expected` (one line: what the loader's decoder will use), `how`."""
    from convnext_fast.data.dali import HW_DECODER_LOAD

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda" and torch.cuda.is_available()
    info = {
        "device": str(dev),
        "dali": _version("nvidia-dali"),
        "nvimgcodec": _version("nvidia-nvimgcodec"),
        "configured": {"decoder": "mixed", "hw_decoder_load": HW_DECODER_LOAD} if gpu else {"decoder": "cpu"},
        "probe": {name: None for name, _ in _BACKENDS},
        "how": "probed: nvImageCodec (what DALI's decoders.image runs on) limited to one backend at a time, on one "
               "baseline JPEG; DALI itself does not report which backend decoded a sample",
    }
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        info["dali"], info["expected"] = None, f"nothing: DALI is not installed ({type(e).__name__}: {e})"
        return info
    try:
        import nvidia.nvimgcodec as nvimgcodec
    except ImportError as e:
        info["expected"] = f"unknown: nvImageCodec cannot be imported ({type(e).__name__}: {e})"
        return info
    data = _sample_jpeg()
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if gpu else None
    for name, kind in _BACKENDS:
        if gpu or name == "cpu":
            where = index if index is not None and name != "cpu" else nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
            info["probe"][name] = _probe(nvimgcodec, kind, where, data)
    info["expected"] = _expected(info["probe"], gpu)
    return info


def _expected(probe: dict, gpu: bool) -> str:
    if not gpu:
        return "CPU (the loader's cpu decoder: libjpeg-turbo)" + ("" if probe["cpu"] is True else
                                                                  f"; the CPU probe failed: {probe['cpu']}")
    from convnext_fast.data.dali import HW_DECODER_LOAD

    if probe["hardware"] is True:
        return (f"hardware JPEG decoder for ~{HW_DECODER_LOAD:.0%} of each batch's baseline JPEGs, nvJPEG on the "
                "CUDA cores for the rest")
    if probe["cuda"] is True or probe["hybrid_cpu_gpu"] is True:
        return "CUDA (nvJPEG on the GPU's cores; no hardware JPEG decoder found)"
    return "CPU fallback (no GPU JPEG backend decoded the probe)"
