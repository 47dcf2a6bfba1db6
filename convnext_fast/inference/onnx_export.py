"""ONNX export of trained weights, checked against PyTorch on real images through the same eval loader.

The file is one self-contained ``.onnx`` (no external data), in eval mode, fp32: input ``images`` (N, 3, H, W
float, normalized with the weights' mean/std) and output ``logits``, batch dynamic (and H, W with
``dynamic_size``). ``with_preprocessing``: input ``images`` is uint8 (N, H, W, 3), the resized, center-cropped
RGB pixels, and the graph normalizes. The classes, image size, crop_pct, mean and std go to the file's
``metadata_props`` (JSON values), so a service reads its preprocessing from the model it serves.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convnext_fast.inference.model import LoadedModel

# Default: the TorchScript exporter, not the dynamo one (torch's default since 2.9), by measurement on real
# images (benchmarks/predict_bench.py, results/predict-cpu-2core-2026-12-06*, 2-core CPU, torch 2.14): both agree with
# PyTorch alike (max |diff| 1.4e-5-3.6e-5, top-1 100%, also at a second size) with files of the same size (ConvNeXt-T
# 106.0 vs 106.6 MiB), but TorchScript exports 5-20x faster (ConvNeXt-T 5.4 s vs 27.3 s; atto 0.9 vs 20.5), names its
# dynamic dims (batch/height/width), needs no onnxscript, and its dynamic-size graph carries no stale example shapes
# (dynamo's value_info keeps the example's, which ONNX Runtime warns about at every other size: dropped below). It
# is deprecated in torch, so the dynamo exporter stays one flag away (--exporter dynamo, needs onnxscript).
EXPORTERS = ("torchscript", "dynamo")
OPSET = 18


class WithPreprocessing(nn.Module):
    """uint8 NHWC pixels -> the model's normalized float NCHW input -> logits (normalization inside the graph)."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([255.0 * s for s in std]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) / self.std)


def export_module(lm: LoadedModel, with_preprocessing: bool) -> nn.Module:
    """The module exported: the model in eval mode, fp32, on the CPU (wrapped to normalize when asked)."""
    model = lm.model.to("cpu", torch.float32).eval()
    return (WithPreprocessing(model, lm.mean, lm.std) if with_preprocessing else model).eval()


def example_input(lm: LoadedModel, with_preprocessing: bool, size: int | None = None, batch: int = 2):
    s = size or lm.img_size
    if with_preprocessing:
        return torch.zeros(batch, s, s, 3, dtype=torch.uint8)
    return torch.zeros(batch, 3, s, s)


def _legacy_available() -> bool:
    import inspect

    return "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5, while the legacy one remains


def export_onnx(lm: LoadedModel, out: str | Path, *, dynamic_size: bool = False, with_preprocessing: bool = False,
                exporter: str = "torchscript") -> dict:
    """Write ``out`` (atomically); returns {"seconds", "bytes", "exporter"}."""
    import warnings

    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"--exporter: expected one of {', '.join(EXPORTERS)}, got {exporter!r}")
    dynamo = exporter == "dynamo"

    out = Path(out)
    module = export_module(lm, with_preprocessing)
    x = example_input(lm, with_preprocessing)
    h, w = (1, 2) if with_preprocessing else (2, 3)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.onnx")
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's, chosen knowingly (above)
            if dynamo:
                from torch.export import Dim

                shapes = {0: Dim("batch", min=1, max=4096)}
                if dynamic_size:
                    shapes.update({h: Dim.AUTO, w: Dim.AUTO})
                torch.onnx.export(module, (x,), str(tmp), input_names=["images"], output_names=["logits"],
                                  dynamic_shapes=(shapes,),
                                  dynamo=True, external_data=False, opset_version=OPSET)
            else:
                axes = {0: "batch", **({h: "height", w: "width"} if dynamic_size else {})}
                torch.onnx.export(module, (x,), str(tmp), input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": axes, "logits": {0: "batch"}}, opset_version=OPSET,
                                  do_constant_folding=True, **({"dynamo": False} if _legacy_available() else {}))
        proto = onnx.load(str(tmp))
        if dynamo:
            del proto.graph.value_info[:]  # the example's intermediate shapes (see EXPORTERS); ORT infers its own
        facts = {**lm.preprocessing(), "model_name": lm.meta["model_name"],
                 "input": "uint8 NHWC, resized and center-cropped RGB" if with_preprocessing
                 else "float32 NCHW, normalized with mean/std", "dynamic_size": dynamic_size}
        del proto.metadata_props[:]
        for key, value in facts.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(proto, str(tmp), save_as_external_data=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for extra in out.parent.glob(f".{out.stem}.tmp{os.getpid()}.onnx*"):
            extra.unlink(missing_ok=True)  # an external-data file an exporter may have left beside the temp file
    return {"seconds": time.perf_counter() - t0, "bytes": out.stat().st_size, "exporter": exporter}


def read_metadata(path: str | Path) -> dict:
    """The ``metadata_props`` of an exported file, JSON-decoded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def to_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized NCHW floats from the eval loader -> the uint8 NHWC pixels they were made from."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((images.float().cpu() * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def check_batches(lm, data: str | None, sizes: list[int], n: int, loader: str):
    """(what was checked, [normalized image batch per size]): up to ``n`` images of DATA through the eval loader (the
    one eval and predict use), or random inputs without DATA."""
    from convnext_fast.data.index import ImageIndex
    from convnext_fast.inference.inputs import list_inputs

    if data is None:
        g = torch.Generator().manual_seed(0)
        return "random normal inputs (no DATA or --check-data given: real images check more)", \
            [torch.randn(min(n, 8), 3, s, s, generator=g) for s in sizes]
    inputs = list_inputs(data)
    good = [p for p in inputs.paths if p not in inputs.bad][:n]
    if not good:
        raise ValueError(f"--check-data {data}: no readable image")
    index = ImageIndex(inputs.root, lm.classes, {c: i for i, c in enumerate(lm.classes)}, [(p, 0) for p in good])
    batches = []
    for s in sizes:
        val = lm.loader(index, s, backend=loader, batch_size=len(good), workers=1)
        try:
            batches.append(next(iter(val)).images.float().cpu())
        finally:
            val.close()
    return f"{len(good)} images of {data}", batches


def parity(path: str | Path, lm: LoadedModel, images: torch.Tensor, with_preprocessing: bool) -> dict:
    """ONNX Runtime (CPU) against PyTorch (the exported module, fp32) on ``images`` (normalized NCHW floats):
    {"images", "size", "max_abs_diff", "top1_agree"}."""
    import onnxruntime as ort

    module = export_module(lm, with_preprocessing)
    x = to_pixels(images, lm.mean, lm.std) if with_preprocessing else images.float().cpu().contiguous()
    with torch.no_grad():
        ref = module(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy()})[0]
    return {"images": int(x.shape[0]), "size": int(images.shape[-1]),
            "max_abs_diff": float(np.abs(got - ref).max()) if len(ref) else 0.0,
            "top1_agree": float((got.argmax(1) == ref.argmax(1)).mean()) if len(ref) else 1.0}
