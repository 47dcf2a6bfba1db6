"""`convnext-fast benchmark`: how much faster than the torchvision loop, at which size, and what limits it.

At each image size, measured side by side in one process (the machines are shared and noisy, so ratios taken
minutes apart mean little):
  * loader-only img/s of each backend (same CPU cores: DALI threads = DataLoader workers = `workers`);
  * step-only img/s of the real `Engine.train_step` on device-resident synthetic batches, for the baseline step
    (engine.BASELINE_SPEED: eager, fp32, NCHW, foreach AdamW, timm Mixup, per-tensor EMA), the fast step
    (every speed feature on) and one ablation per feature that the fast step has on;
  * end-to-end img/s of the baseline loop (torchvision loader + baseline step) and of the fast loop (dali
    loader + fast step), with data-wait %.
Both steps train the same recipe (Mixup 0.8 / CutMix 1.0, label smoothing 0.1, EMA): only the speed features
differ. Then: projected epoch time for `dataset_size` images, speed-ups, and a verdict on what limits the fast
loop. Timing rules are in benchmark_timing, provenance and FLOPs in benchmark_env, outputs in benchmark_report.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from convnext_fast.benchmark_env import FLOPS_CONVENTION, collect_environment, forward_flops, mfu, peak_tflops
from convnext_fast.benchmark_timing import PeakMemory, endless, time_loader, time_loop, time_step
from convnext_fast.config import RecipeConfig
from convnext_fast.data import ImageIndex, build_loader, scan_folder
from convnext_fast.engine import BASELINE_SPEED, FAST_SPEED, SpeedConfig, build_engine

__all__ = ["BenchConfig", "RECIPE", "SPEED_FEATURES", "ablation_speeds", "resolve_data", "run_benchmark", "summarize"]

SCHEMA = "convnext_fast.benchmark/1"
SPEED_FEATURES = ("compile", "amp", "channels_last", "fused_adamw", "device_mixup", "ema")
# The recipe both steps train (ConvNeXt paper's Mixup/CutMix/smoothing/EMA): the speed features change how, not what.
RECIPE = RecipeConfig(mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=True)
DATA_WAIT_LIMIT_PCT = 10.0  # above this share of the loop blocked in next(loader), the loader is the limit
LOOPS = {"baseline": "torchvision", "fast": "dali"}  # end-to-end loop -> the loader it runs on


@dataclass(frozen=True)
class BenchConfig:
    """A fully resolved benchmark run (the command module fills the defaults)."""

    data: Path  # class folders the loaders read (DATA/train when DATA has one)
    sizes: tuple[int, ...]
    loaders: tuple[str, ...]
    model: str
    batch_size: int
    device: torch.device
    steps: int
    loader_steps: int  # batches per timed window in loader-only measurements (cheaper than steps)
    warmup: int
    repeats: int
    dataset_size: int
    workers: int
    fast: SpeedConfig  # the fast step's speed features (FAST_SPEED with --amp / --no-compile applied)
    ablation_sizes: tuple[int, ...]
    peak_tflops: float | None = None
    quick: bool = False
    seed: int = 0
    data_note: str = ""  # where `data` came from (e.g. "demo dataset")


def ablation_speeds(fast: SpeedConfig, *, with_compile: bool = True) -> dict[str, SpeedConfig]:
    """`fast` with each speed feature flipped in turn.

    A feature the fast step has on is turned off ('no_<feature>': what it buys); one it has off on this device
    (compile or bf16 on a CPU) is turned on ('with_<feature>': why it is off). `with_compile=False` skips
    'with_compile' (inductor's CPU build takes minutes).
    """
    out = {}
    for f in SPEED_FEATURES:
        value = getattr(fast, f)
        if value and value != "off":
            out[f"no_{f}"] = dataclasses.replace(fast, **{f: "off" if f == "amp" else False})
        elif f != "compile" or with_compile:
            out[f"with_{f}"] = dataclasses.replace(fast, **{f: "bf16" if f == "amp" else True})
    return out


def _log_default(msg: str) -> None:
    print(msg, flush=True)


class _Run:
    """One benchmark run's shared state: the config, the scanned index (scanned once), the device's peak."""

    def __init__(self, cfg: BenchConfig, index: ImageIndex, peak: float | None, log: Callable[[str], None]):
        self.cfg, self.index, self.peak, self.log = cfg, index, peak, log
        self.num_classes = len(index.classes)

    def engine(self, speed: SpeedConfig):
        # A fresh dynamo cache per engine: every engine recompiles anyway (new module), and stale entries would
        # count towards dynamo's recompile limit, after which it silently runs the step eagerly.
        torch._dynamo.reset()
        return build_engine(self.cfg.model, self.num_classes, device=self.cfg.device, speed=speed, recipe=RECIPE,
                            seed=self.cfg.seed)

    def data_loader(self, backend: str, size: int):
        cfg = self.cfg
        kwargs = {"num_classes": self.num_classes} if backend == "synthetic" else {}
        return build_loader(self.index, train=True, img_size=size, batch_size=cfg.batch_size, backend=backend,
                            device=cfg.device, seed=cfg.seed, num_workers=cfg.workers, **kwargs)

    def timing_kwargs(self, steps: int | None = None) -> dict:
        cfg = self.cfg
        return {"batch_size": cfg.batch_size, "device": cfg.device, "steps": steps or cfg.steps,
                "warmup": cfg.warmup, "repeats": cfg.repeats}

    def engine_fields(self, name: str, size: int, engine, flops: dict, timing) -> dict:
        params = sum(p.numel() for p in engine.model.parameters())
        rec = {"name": name, "img_size": size, "param_count": round(params / 1e6, 3), "param_count_exact": params,
               "speed": dataclasses.asdict(engine.speed), **timing.to_dict()}
        # Warm-up time beyond steady-state steps: the compile cost when compiling (reported on its own).
        rec["compile_s"] = rec["warmup_overhead_s"] if engine.speed.compile else None
        rec["mfu_pct"] = mfu(rec["samples_per_sec"], flops["train_flops_per_img"], self.peak)
        return rec

    def step_record(self, name: str, size: int, engine, flops: dict) -> dict:
        """Time `engine.train_step` alone on one device-resident synthetic batch (the step's ceiling)."""
        loader = self.data_loader("synthetic", size)
        images, labels = next(iter(loader))
        # The layout the step wants, made once outside the timing (as a loader yielding it would).
        images = images.contiguous(memory_format=torch.channels_last if engine.speed.channels_last
                                   else torch.contiguous_format)
        timing, loss = time_step(lambda: engine.train_step(images, labels), **self.timing_kwargs())
        return {**self.engine_fields(name, size, engine, flops, timing), "kind": "step", "loader": "synthetic",
                "loss_finite": bool(torch.isfinite(loss).item())}  # one sync, after the timing

    def loader_record(self, backend: str, size: int) -> dict:
        """Loader-only throughput of one backend (train augmentation, `workers` CPU threads/processes)."""
        base = {"kind": "loader", "name": backend, "loader": backend, "img_size": size}
        try:
            loader = self.data_loader(backend, size)
        except ImportError as e:  # e.g. DALI not installed: report it, measure the rest
            return {**base, "error": f"{type(e).__name__}: {e}"}
        try:
            timing = time_loader(endless(loader), **self.timing_kwargs(self.cfg.loader_steps))
        finally:
            loader.close()
        return {**base, "batch_size": self.cfg.batch_size, "workers": self.cfg.workers,
                "batches_per_epoch": len(loader), **timing.to_dict()}

    def loop_record(self, name: str, size: int, engine, flops: dict) -> dict:
        """End-to-end: the `LOOPS[name]` loader feeding `engine.train_step`, data-wait measured."""
        backend = LOOPS[name]
        base = {"kind": "loop", "name": name, "loader": backend, "img_size": size}
        try:
            loader = self.data_loader(backend, size)
        except ImportError as e:
            return {**base, "error": f"{type(e).__name__}: {e}"}
        try:
            timing, loss = time_loop(endless(loader), engine.train_step, **self.timing_kwargs())
        finally:
            loader.close()
        return {**self.engine_fields(name, size, engine, flops, timing), **base, "workers": self.cfg.workers,
                "loss_finite": bool(torch.isfinite(loss).item())}

    def measure_size(self, size: int) -> tuple[dict, list[dict]]:
        cfg = self.cfg
        fwd = forward_flops(cfg.model, self.num_classes, size)
        flops = {"img_size": size, "fwd_flops_per_img": fwd, "train_flops_per_img": 3 * fwd}
        records = []

        def add(rec: dict) -> None:
            records.append(rec)
            self.log(_one_line(rec))

        for backend in cfg.loaders:
            add(self.loader_record(backend, size))
        plan = [("baseline", BASELINE_SPEED), ("fast", cfg.fast)]
        if size in cfg.ablation_sizes:
            variants = ablation_speeds(cfg.fast, with_compile=not cfg.quick)
            plan += [(f"fast-{k}", s) for k, s in variants.items()]
        for name, speed in plan:
            engine = self.engine(speed)
            add(self.step_record(name, size, engine, flops))
            if name in LOOPS and LOOPS[name] in cfg.loaders:
                add(self.loop_record(name, size, engine, flops))
            del engine
            gc.collect()
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
        return flops, records


def _one_line(rec: dict) -> str:
    head = f"  {rec['img_size']:>4}px {rec['kind']:<6} {rec['name']:<20}"
    if "error" in rec:
        return f"{head} not measured: {rec['error']}"
    line = (f"{head} {rec['samples_per_sec']:>9.1f} img/s [{rec['samples_per_sec_min']:.1f}-"
            f"{rec['samples_per_sec_max']:.1f}]  {rec['step_time_ms']:.1f} ms/batch")
    if rec.get("data_wait_pct") is not None:
        line += f"  data-wait {rec['data_wait_pct']:.1f}%"
    if rec.get("compile_s") is not None:
        line += f"  compile {rec['compile_s']:.1f}s"
    return line


def _find(records: list[dict], kind: str, name: str, size: int) -> dict | None:
    for r in records:
        if r["kind"] == kind and r["name"] == name and r["img_size"] == size and "error" not in r:
            return r
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None:
        return None
    return a["samples_per_sec"] / b["samples_per_sec"]


def summarize(records: list[dict], size: int, dataset_size: int, device_type: str) -> dict:
    """Speed-ups, projected epoch times and the verdict at one size, computed from the measured records."""
    loader = {b: _find(records, "loader", b, size) for b in ("torchvision", "dali")}
    step = {n: _find(records, "step", n, size) for n in LOOPS}
    loop = {n: _find(records, "loop", n, size) for n in LOOPS}
    out = {
        "img_size": size,
        "loader_speedup_dali_vs_torchvision": _ratio(loader["dali"], loader["torchvision"]),
        "step_speedup": _ratio(step["fast"], step["baseline"]),
        "e2e_speedup": _ratio(loop["fast"], loop["baseline"]),
        "epoch_time_s": {n: (dataset_size / loop[n]["samples_per_sec"] if loop[n] else None) for n in LOOPS},
        "epoch_time_s_range": {n: ([dataset_size / loop[n]["samples_per_sec_max"],
                                    dataset_size / loop[n]["samples_per_sec_min"]] if loop[n] else None)
                               for n in LOOPS},
        "pct_of_step_ceiling": {n: (100 * _ratio(loop[n], step[n]) if loop[n] and step[n] else None)
                                for n in LOOPS},
    }
    out["limited_by"], out["verdict"] = _verdict(loader["dali"], step["fast"], loop["fast"], device_type)
    return out


def _verdict(loader: dict | None, step: dict | None, loop: dict | None, device_type: str) -> tuple[str | None, str]:
    if loop is None or step is None:
        return None, "no verdict: the fast loop was not measured (needs the dali loader)"
    pct = 100 * loop["samples_per_sec"] / step["samples_per_sec"]
    wait, step_ips = loop["data_wait_pct"], step["samples_per_sec"]
    reasons = []
    if loader is not None and loader["samples_per_sec"] < step_ips:
        reasons.append(f"loader-only {loader['samples_per_sec']:.0f} img/s < step-only {step_ips:.0f} img/s")
    if wait > DATA_WAIT_LIMIT_PCT:
        reasons.append(f"data-wait {wait:.0f}% > {DATA_WAIT_LIMIT_PCT:.0f}%")
    side = "loader" if reasons else "model"
    if side == "model":
        faster = f"loader-only {loader['samples_per_sec']:.0f} img/s >= step-only {step_ips:.0f} img/s, " \
            if loader is not None else ""
        reasons.append(f"{faster}data-wait {wait:.0f}%")
    text = (f"fast loop at {pct:.0f}% of its step-only ceiling ({loop['samples_per_sec']:.1f} of "
            f"{step_ips:.1f} img/s); limited by the {side}: {'; '.join(reasons)}")
    if device_type == "cpu":
        text += " (CPU: the loader and the step share the same cores, so end-to-end is below both alone)"
    return side, text


def resolve_data(data: str | None) -> tuple[Path, str]:
    """The class folders to read: DATA/train when DATA has one (as training reads it), else DATA; no DATA: the
    demo dataset (built on first use). Returns (folder, a note saying where it came from)."""
    if data is None:
        from convnext_fast.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset()
        note = f"DATA: the built-in demo dataset ({root})"
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise ValueError(f"DATA {data}: not a directory")
        note = ""
    return (root / "train" if (root / "train").is_dir() else root), note


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = _log_default, command: str | None = None) -> dict:
    """Measure every size; return the result document (benchmark_report writes and renders it).

    `command`: the command line that reproduces this run, recorded with the environment.
    """
    index = scan_folder(cfg.data)  # preflight once: a bad DATA fails before minutes of measuring
    if len(index) < cfg.batch_size:
        raise ValueError(f"DATA {cfg.data}: {len(index)} images, fewer than --batch-size {cfg.batch_size}")
    peak, peak_source = peak_tflops(cfg.device, cfg.peak_tflops)
    environment = {**collect_environment(cfg.device), "command": command}
    log(f"benchmark: {cfg.model} on {cfg.device}, batch {cfg.batch_size}, sizes {list(cfg.sizes)}, "
        f"{cfg.repeats} x {cfg.steps} steps after {cfg.warmup} warm-up; data {cfg.data} ({len(index)} images)")
    run = _Run(cfg, index, peak, log)
    flops, records = [], []
    for size in cfg.sizes:
        f, r = run.measure_size(size)
        flops.append(f)
        records.extend(r)
    summary = [summarize(records, s, cfg.dataset_size, cfg.device.type) for s in cfg.sizes]
    return {
        "schema": SCHEMA,
        "environment": environment,
        "config": _config_dict(cfg, len(index), run.num_classes),
        "model": cfg.model,
        "param_count": next((r["param_count"] for r in records if "param_count" in r), None),
        "flops": {"convention": FLOPS_CONVENTION, "per_size": flops},
        "peak_tflops": peak, "peak_tflops_source": peak_source,
        "memory_kind": PeakMemory(cfg.device).kind,
        "results": records,
        "summary": summary,
        "notes": _notes(cfg),
    }


def _config_dict(cfg: BenchConfig, num_images: int, num_classes: int) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d.update(data=str(cfg.data), device=str(cfg.device), sizes=list(cfg.sizes), loaders=list(cfg.loaders),
             ablation_sizes=list(cfg.ablation_sizes), fast=dataclasses.asdict(cfg.fast),
             baseline=dataclasses.asdict(BASELINE_SPEED), recipe=dataclasses.asdict(RECIPE),
             num_images=num_images, num_classes=num_classes)
    return d


def _notes(cfg: BenchConfig) -> list[str]:
    notes = [
        "Throughput: median over repeats of timed windows (device synchronized at both ends); [min-max] spread. "
        "Warm-up excluded; compile_s = warm-up time beyond steady-state steps (compile + autotune).",
        "Step-only: Engine.train_step on one device-resident synthetic batch. Loop: the loader feeding the same "
        "step; the device is synchronized before each next(loader), so data-wait is time the device idled for data.",
        "Both steps train the same recipe (Mixup 0.8, CutMix 1.0, label smoothing 0.1, EMA); baseline = eager, "
        "fp32, NCHW, foreach AdamW, timm Mixup (host-drawn), per-tensor EMA.",
        "Loaders run train augmentation (random-resized-crop, flip, RandAugment 2/9) with the same CPU budget "
        f"({cfg.workers} DALI threads / DataLoader workers); epoch ends are part of the stream.",
        f"Projected epoch time = {cfg.dataset_size} images / end-to-end img/s.",
        FLOPS_CONVENTION,
    ]
    if cfg.fast != FAST_SPEED:
        diff = {k: v for k, v in dataclasses.asdict(cfg.fast).items() if getattr(FAST_SPEED, k) != v}
        notes.append(f"The fast step here differs from the full fast configuration in {diff}; the fast-with_* "
                     "ablations measure those features switched on.")
    if cfg.device.type == "cpu":
        notes.append("CPU run: no GPU figures here. In the loops the loader and the step share the same cores. "
                     "On a shared CPU, OpenMP spin-waiting can slow multi-threaded steps many-fold; "
                     "OMP_WAIT_POLICY=PASSIVE avoids it (the environment records the setting).")
    if cfg.data_note:
        notes.append(cfg.data_note)
    if cfg.quick:
        notes.append("--quick: a smoke run of every code path; its numbers are not a benchmark.")
    return notes
