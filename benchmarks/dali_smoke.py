#!/usr/bin/env python3
"""DALI smoke test, right after installing it on a new machine: one batch of the mixed (GPU) JPEG decoder.

Prints one line per fact and, last, one JSON line (`--json FILE` also writes it): DALI, nvimgcodec and torch
versions, the GPU, which JPEG backend decoded (hardware decoder, CUDA nvJPEG, or CPU fallback), whether DALI's
memory pool worked (if the first try fails, it retries once with DALI_USE_VMM=0 and says so), the device memory
the pipeline took. The decode runs in a child process, so that DALI_USE_VMM is read fresh on the retry.
`--device cpu` runs the same graph on the CPU (device_id=None): the rehearsal on a machine with no GPU.
Exit 0 when a batch decoded, 1 when not.

Which backend decoded is inferred, as DALI does not report it per sample: the same JPEGs are decoded by
nvImageCodec (the library under DALI's decoder) restricted to one backend at a time (hardware decoder, CUDA
nvJPEG, hybrid, CPU); DALI's mixed decoder sends hw_decoder_load of a batch (our loader: HW_DECODER_LOAD) to the
hardware decoder where that backend works, the rest to CUDA nvJPEG, and falls back to the CPU where neither works.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

HW_DECODER_LOAD = 0.65  # convnext_fast.data.dali.HW_DECODER_LOAD (read from there when the checkout imports)
BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY")


def backend_probe(files: list) -> dict:
    """{nvimgcodec backend kind: 'ok' | 'cannot decode' | error text}: which backends decode these JPEGs here."""
    from nvidia import nvimgcodec

    out = {}
    for kind in BACKENDS:
        try:
            dec = nvimgcodec.Decoder(device_id=0, backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))])
            out[kind] = "ok" if all(dec.decode(f.tobytes()) is not None for f in files) else "cannot decode"
        except Exception as e:  # noqa: BLE001 - a backend that fails to load is the finding, not an error
            out[kind] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def _jpegs(n: int, size: int = 256) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        # A smooth gradient plus noise: a photo-like baseline JPEG (4:2:0), the kind the hardware decoder takes.
        y, x = np.mgrid[0:size, 0:size]
        img = np.stack([(x + 40 * i) % 256, (y * 2) % 256, (x + y) % 256], -1) + rng.integers(0, 30, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    return out


def child(device: str, batch: int) -> dict:
    """One batch through fn.decoders.image (mixed on cuda) + resize, in this process; the facts as a dict."""
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import numpy as np

    res = {"dali": dali.__version__, "device": device, "DALI_USE_VMM": os.environ.get("DALI_USE_VMM")}
    try:  # torch is not needed by DALI: a fresh venv with DALI alone (the CPU rehearsal) runs without it
        import torch
        res.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    except ImportError:
        res.update(torch="not installed", torch_cuda=None)
    try:
        import nvidia.nvimgcodec as nvimgcodec
        res["nvimgcodec"] = getattr(nvimgcodec, "__version__", "?")
    except ImportError as e:
        res["nvimgcodec"] = f"not importable ({e})"
    cuda = device == "cuda"
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, if any
    try:
        from convnext_fast.data.dali import HW_DECODER_LOAD as hw_load
    except Exception:  # noqa: BLE001 - the smoke test stands alone: any checkout trouble means the default
        hw_load = HW_DECODER_LOAD
    res["hw_decoder_load"] = hw_load
    if cuda:
        res["gpu"] = torch.cuda.get_device_name()
        free0 = torch.cuda.mem_get_info()[0]
    files = _jpegs(batch)

    @dali.pipeline_def(batch_size=batch, num_threads=2, device_id=0 if cuda else None, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(source=lambda: files, batch=True, dtype=dali.types.UINT8)
        decoder = {"device": "mixed", "hw_decoder_load": hw_load} if cuda else {"device": "cpu"}
        img = fn.decoders.image(enc, output_type=dali.types.RGB, **decoder)
        return fn.resize(img, resize_x=224, resize_y=224)

    t0 = time.perf_counter()
    p = pipe()
    p.build()
    (out,) = p.run()
    if cuda:
        out = out.as_cpu()
    arr = np.stack([np.asarray(out[i]) for i in range(batch)])
    res["first_batch_s"] = round(time.perf_counter() - t0, 3)
    res["batch_shape"] = list(arr.shape)
    res["pixels_ok"] = bool(arr.std() > 1)
    if cuda:
        torch.cuda.synchronize()
        res["device_memory_taken_mib"] = round((free0 - torch.cuda.mem_get_info()[0]) / 2**20)
        res["nvimgcodec_backends"] = backend_probe(files)
        try:  # the project's own probe (the benchmark JSON records it too), when the checkout has it
            from convnext_fast.data.jpeg_backend import jpeg_backend_info
            res["jpeg_backend_info"] = jpeg_backend_info(device)
        except ImportError:
            pass
    del p
    return res


def decoded_by(res: dict) -> str:
    if res.get("device") != "cuda":
        return "CPU (libjpeg-turbo; --device cpu)"
    works = [k for k, v in res.get("nvimgcodec_backends", {}).items() if v == "ok"]
    if "HW_GPU_ONLY" in works:
        return (f"hardware JPEG decoder for {res['hw_decoder_load']:.0%} of a batch, CUDA nvJPEG for the rest"
                if "GPU_ONLY" in works else "hardware JPEG decoder (CUDA nvJPEG does not work here)")
    if "GPU_ONLY" in works or "HYBRID_CPU_GPU" in works:
        return "CUDA nvJPEG (no working hardware decoder)"
    return "CPU fallback (no GPU backend of nvImageCodec works here: see nvimgcodec_backends)"


def run_child(device: str, batch: int, env: dict) -> tuple[int, dict | None, str]:
    try:
        proc = subprocess.run([sys.executable, "-u", __file__, "--child", "--device", device, "--batch", str(batch)],
                              capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired as e:
        return 124, None, f"the decode did not finish in {e.timeout} s: {e.stderr or ''}"
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    try:
        return proc.returncode, json.loads(last[0]), proc.stderr
    except json.JSONDecodeError:
        return proc.returncode or 1, None, proc.stderr + proc.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda when available")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        try:
            import torch
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    if args.child:
        print(json.dumps(child(args.device, args.batch)), flush=True)
        return 0
    env = dict(os.environ)
    rc, res, err = run_child(args.device, args.batch, env)
    tries = [{"DALI_USE_VMM": env.get("DALI_USE_VMM"), "rc": rc, "error": None if rc == 0 else err[-1500:]}]
    if rc and args.device == "cuda" and env.get("DALI_USE_VMM") != "0":
        print(f"dali_smoke: the first try failed (exit {rc}); retrying with DALI_USE_VMM=0:\n{err[-1500:]}",
              flush=True)
        env["DALI_USE_VMM"] = "0"
        rc, res, err = run_child(args.device, args.batch, env)
        tries.append({"DALI_USE_VMM": "0", "rc": rc, "error": None if rc == 0 else err[-1500:]})
    result = dict(res or {}, ok=rc == 0, tries=tries)
    if res:
        result["decoded_by"] = decoded_by(res)
        result["memory_pool"] = ("n/a (CPU pipeline)" if args.device == "cpu" else
                                 "default (VMM) pool works" if len(tries) == 1 else
                                 "works only with DALI_USE_VMM=0" if rc == 0 else "failed both ways")
        for k in ("dali", "nvimgcodec", "torch", "torch_cuda", "gpu", "batch_shape", "first_batch_s",
                  "decoded_by", "nvimgcodec_backends", "memory_pool", "device_memory_taken_mib"):
            if k in result:
                print(f"{k}: {result[k]}", flush=True)
    else:
        print(f"dali_smoke: FAILED (exit {rc}):\n{err[-3000:]}", flush=True)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0 if result["ok"] and result.get("pixels_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
