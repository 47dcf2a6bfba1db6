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
loop. Timing rules are in .timing, provenance and FLOPs in .env, tables and files in .tables, paired ratios in .summary.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from convnext_fast.backends import set_backends
from convnext_fast.benchmark.env import FLOPS_CONVENTION, collect_environment, forward_flops, mfu, peak_tflops
from convnext_fast.benchmark.summary import CACHED_LOADER, LOOP_ENGINE, LOOPS, summarize
from convnext_fast.benchmark.timing import (Meter, PeakMemory, endless, interleave, main_thread_cost,
                                            peak_gpu_memory)
from convnext_fast.config import RecipeConfig
from convnext_fast.data import BackendUnavailable, ImageIndex, build_loader, scan_folder
from convnext_fast.data.jpeg_backend import jpeg_backend_info
from convnext_fast.engine import BASELINE_SPEED, FAST_SPEED, SpeedConfig, build_engine
from convnext_fast.schedule import ResolutionSchedule

__all__ = ["BenchConfig", "RECIPE", "SPEED_FEATURES", "ablation_speeds", "resolve_data", "run_benchmark", "summarize"]

SCHEMA = "convnext_fast.benchmark/1"
SPEED_FEATURES = ("compile", "amp", "channels_last", "fused_adamw", "device_mixup", "ema")
# The recipe both steps train (ConvNeXt paper's Mixup/CutMix/smoothing/EMA): the speed features change how, not what.
RECIPE = RecipeConfig(mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=True)
# The seed recipe's random erasing (config preset "seed-recipe"), on in the end-to-end loops' loaders.
LOOP_REPROB = 0.25
# main_thread_ms_per_batch: the consumer sleeps this multiple of the loader's own ms/batch after each batch, as a
# GPU step would take that long: a loader that keeps up with its consumer is measured on its hand-over alone.
CONSUMER_BUSY_FACTOR = 1.5


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
    schedule: ResolutionSchedule | None = None  # a progressive run to project from the measured step throughput
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


def _load_avg() -> float | None:
    """The 1-minute load average when a measurement ends: how shared the machine was (None if unknown)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def state_bytes(engine) -> int:
    """Bytes an engine keeps between steps: weights, buffers, optimizer state, EMA copy (gradients are freed)."""
    tensors = [*engine.model.parameters(), *engine.model.buffers()]
    for state in engine.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    if engine.ema is not None:
        tensors += [*engine.ema.module.parameters(), *engine.ema.module.buffers()]
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class _Run:
    """One benchmark run's shared state: the config, the scanned index (scanned once), the device's peak."""

    def __init__(self, cfg: BenchConfig, index: ImageIndex, peak: float | None, log: Callable[[str], None]):
        self.cfg, self.index, self.peak, self.log = cfg, index, peak, log
        self.num_classes = len(index.classes)

    def data_loader(self, backend: str, size: int, reprob: float = 0.0):
        cfg = self.cfg
        kwargs = {"num_classes": self.num_classes} if backend == "synthetic" else {}
        if backend == CACHED_LOADER:  # decode once, then augment from the cache (its decode pass is warm-up)
            backend, kwargs = "dali", {"cache": "auto"}
        return build_loader(self.index, train=True, img_size=size, batch_size=cfg.batch_size, backend=backend,
                            device=cfg.device, seed=cfg.seed, num_workers=cfg.workers, reprob=reprob, **kwargs)

    def meter_kwargs(self, steps: int | None = None) -> dict:
        cfg = self.cfg
        return {"batch_size": cfg.batch_size, "device": cfg.device, "steps": steps or cfg.steps,
                "warmup": cfg.warmup}

    def engine_record(self, kind: str, name: str, size: int, engine, flops: dict, timing, loss) -> dict:
        params = sum(p.numel() for p in engine.model.parameters())
        rec = {"kind": kind, "name": name, "img_size": size, "param_count": round(params / 1e6, 3),
               "param_count_exact": params, "speed": dataclasses.asdict(engine.speed), **timing.to_dict()}
        # Warm-up time beyond steady-state steps is the compile cost of a compiled step-only run (reported on
        # its own); a loop reuses the compiled engine, so its extra warm-up time is loader start-up.
        rec["compile_s"] = rec["warmup_overhead_s"] if engine.speed.compile and kind == "step" else None
        rec["mfu_pct"] = mfu(rec["samples_per_sec"], flops["train_flops_per_img"], self.peak)
        rec["loss_finite"] = bool(torch.isfinite(loss[0]).item())  # one sync, after the timing
        rec["load_avg_1m"] = _load_avg()
        return rec

    def loader_record(self, backend: str, size: int) -> dict:
        """Loader-only throughput of one backend, alone (train augmentation, `workers` CPU threads/processes)."""
        base = {"kind": "loader", "name": backend, "loader": backend, "img_size": size}
        try:
            loader = self.data_loader(backend, size)
        except BackendUnavailable as e:  # DALI not installed: say so, measure the rest
            return {**base, "error": e.status, "unavailable": True}
        try:
            # On CUDA, torch's allocator does not see DALI's memory: no figure rather than a wrong one.
            stream = endless(loader)
            meter = Meter.loader(stream, track_memory=self.cfg.device.type == "cpu",
                                 **self.meter_kwargs(self.cfg.loader_steps))
            (timing,) = interleave([meter], self.cfg.repeats)
            busy_s = CONSUMER_BUSY_FACTOR * timing.step_time_ms / 1000
            main = main_thread_cost(stream, self.cfg.loader_steps, busy_s)
        finally:
            loader.close()
        if getattr(loader, "cache_info", None):
            base["cache_info"] = loader.cache_info  # where the cache lives, its size, the decode pass's seconds
        return {**base, "batch_size": self.cfg.batch_size, "workers": self.cfg.workers, "reprob": 0.0,
                "batches_per_epoch": len(loader), **timing.to_dict(), **main, "load_avg_1m": _load_avg()}

    def step_meters(self, engines: dict, size: int) -> dict:
        """Each engine's train_step alone on a device-resident synthetic batch: its ceiling."""
        images, labels = next(iter(self.data_loader("synthetic", size)))
        meters = {}
        for name, engine in engines.items():
            # The layout the step wants, made once outside the timing (as a loader yielding it would); a copy
            # per engine, as Mixup mixes in place.
            x = images.contiguous(memory_format=torch.channels_last if engine.speed.channels_last
                                  else torch.contiguous_format).clone()
            loss = [torch.zeros(())]

            def step(engine=engine, x=x, loss=loss):
                loss[0] = engine.train_step(x, labels)
            meter = Meter.step(step, state_bytes=lambda e=engine: state_bytes(e), **self.meter_kwargs())
            meters[("step", name)] = (meter, engine, loss)
        return meters

    def loop_meters(self, engines: dict, size: int, loaders: dict, errors: list) -> dict:
        """The baseline and fast loops: their loader feeding their engine, data-wait measured."""
        meters = {}
        for name in (n for n in LOOPS if LOOPS[n] in self.cfg.loaders):
            try:
                loaders[name] = self.data_loader(LOOPS[name], size, reprob=LOOP_REPROB)
            except BackendUnavailable as e:
                errors.append({"kind": "loop", "name": name, "loader": LOOPS[name], "img_size": size,
                               "error": e.status, "unavailable": True})
                continue
            loss = [torch.zeros(())]

            engine = engines[LOOP_ENGINE[name]]

            def step(images, labels, engine=engine, loss=loss):
                loss[0] = engine.train_step(images, labels)
            meter = Meter.loop_of(endless(loaders[name]), step, **self.meter_kwargs(),
                                  state_bytes=lambda e=engine: state_bytes(e))
            meters[("loop", name)] = (meter, engine, loss)
        return meters

    def model_records(self, engines: dict, size: int, flops: dict) -> list[dict]:
        """Step-only and end-to-end measurements of one size, all interleaved in one group, so that the loops
        and the step ceilings they are compared with see the same machine."""
        loaders, errors = {}, []
        try:
            meters = self.step_meters(engines, size) | self.loop_meters(engines, size, loaders, errors)
            timings = interleave([m for m, _, _ in meters.values()], self.cfg.repeats)
        finally:
            for loader in loaders.values():
                loader.close()
        out = []
        for ((kind, name), (_, engine, loss)), timing in zip(meters.items(), timings):
            rec = self.engine_record(kind, name, size, engine, flops, timing, loss)
            if kind == "loop":
                rec.update(loader=LOOPS[name], workers=self.cfg.workers, reprob=LOOP_REPROB)
            out.append(rec)
        return out + errors

    def measure_size(self, size: int) -> tuple[dict, list[dict], dict]:
        """(FLOPs, records, peak GPU memory) of one size."""
        cfg = self.cfg
        if cfg.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(cfg.device)
        fwd = forward_flops(cfg.model, self.num_classes, size)
        flops = {"img_size": size, "fwd_flops_per_img": fwd, "train_flops_per_img": 3 * fwd}
        records = []
        for backend in cfg.loaders:
            records.append(self.loader_record(backend, size))
            self.log(_one_line(records[-1]))
        plan = {"baseline": BASELINE_SPEED, "fast": cfg.fast}
        if size in cfg.ablation_sizes:
            variants = ablation_speeds(cfg.fast, with_compile=not cfg.quick)
            plan.update({f"fast-{k}": s for k, s in variants.items()})
        # A fresh dynamo cache per size, and room for every engine's graph: past dynamo's recompile limit a
        # compiled step would silently run eagerly.
        torch._dynamo.reset()
        with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            engines = {name: build_engine(cfg.model, self.num_classes, device=cfg.device, speed=speed,
                                          recipe=RECIPE, seed=cfg.seed) for name, speed in plan.items()}
            for rec in self.model_records(engines, size, flops):
                records.append(rec)
                self.log(_one_line(rec))
        del engines
        gc.collect()
        memory = peak_gpu_memory(cfg.device, size)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        return flops, records, memory


def _one_line(rec: dict) -> str:
    head = f"  {rec['img_size']:>4}px {rec['kind']:<6} {rec['name']:<20}"
    if "error" in rec:
        return f"{head} not measured: {rec['error']}"
    line = (f"{head} {rec['samples_per_sec']:>9.1f} img/s [{rec['samples_per_sec_min']:.1f}-"
            f"{rec['samples_per_sec_max']:.1f}]  {rec['step_time_ms']:.1f} ms/batch")
    if rec.get("data_wait_pct") is not None:
        line += f"  data-wait {rec['data_wait_pct']:.1f}%"
    if rec.get("main_thread_ms_per_batch") is not None:
        line += f"  main thread {rec['main_thread_ms_per_batch']:.2f} ms/batch"
    if rec.get("compile_s") is not None:
        line += f"  compile {rec['compile_s']:.1f}s"
    return line


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
    """Measure every size; return the result document (.tables writes and renders it).

    `command`: the command line that reproduces this run, recorded with the environment.
    """
    index = scan_folder(cfg.data)  # preflight once: a bad DATA fails before minutes of measuring
    if len(index) < cfg.batch_size:
        raise ValueError(f"DATA {cfg.data}: {len(index)} images, fewer than --batch-size {cfg.batch_size}")
    peak, peak_source = peak_tflops(cfg.device, cfg.peak_tflops)
    # Both arms (baseline and fast) under training's backend policy: the ratio is the one training would see.
    backends = set_backends()
    environment = {**collect_environment(cfg.device), "command": command, "backends": backends}
    log(f"benchmark: {cfg.model} on {cfg.device}, batch {cfg.batch_size}, sizes {list(cfg.sizes)}, "
        f"{cfg.repeats} x {cfg.steps} steps after {cfg.warmup} warm-up; data {cfg.data} ({len(index)} images)")
    if any(b.startswith("dali") for b in cfg.loaders):
        environment["jpeg_backend"] = jpeg_backend_info(cfg.device)  # which JPEG decoder DALI gets here
        log(f"JPEG decoding: {environment['jpeg_backend']['expected']}")
    run = _Run(cfg, index, peak, log)
    flops, records, memory = [], [], []
    for size in cfg.sizes:
        f, r, m = run.measure_size(size)
        flops.append(f)
        records.extend(r)
        memory.append(m)
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
        "peak_gpu_memory": memory,
        "results": records,
        "summary": summary,
        "projection": _projection(cfg, records, run.num_classes),
        "notes": _notes(cfg),
    }


def _projection(cfg: BenchConfig, records: list[dict], num_classes: int) -> dict | None:
    from convnext_fast.benchmark.projection import project_schedule

    if cfg.schedule is None or not any(r["kind"] == "step" and "error" not in r for r in records):
        return None
    return project_schedule(records, cfg.schedule, cfg.dataset_size, cfg.model, num_classes)


def _config_dict(cfg: BenchConfig, num_images: int, num_classes: int) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d.update(schedule=cfg.schedule.to_dict() if cfg.schedule else None)
    d.update(data=str(cfg.data), device=str(cfg.device), sizes=list(cfg.sizes), loaders=list(cfg.loaders),
             ablation_sizes=list(cfg.ablation_sizes), fast=dataclasses.asdict(cfg.fast),
             baseline=dataclasses.asdict(BASELINE_SPEED), recipe=dataclasses.asdict(RECIPE),
             num_images=num_images, num_classes=num_classes)
    return d


def _notes(cfg: BenchConfig) -> list[str]:
    notes = [
        "Throughput: median over repeats of timed windows (device synchronized at both ends); [min-max] spread. "
        "Warm-up excluded; compile_s = warm-up time beyond steady-state steps (compile + autotune); inductor's "
        "on-disk cache from an earlier run on the machine shortens it (TORCHINDUCTOR_FX_GRAPH_CACHE=0: cold).",
        "Step-only: Engine.train_step on one device-resident synthetic batch. Loop: the loader feeding the same "
        "step; data-wait runs from asking next(loader) until the batch's own GPU work (copy, erasing) is done on the "
        "step's stream, which is synchronized after each step: the time the device idled for data. "
        "At each size the step-only and loop measurements run interleaved (A B ... B A) in one group, so a noisy "
        "machine slows them alike; each record keeps the load average at its end.",
        "Both steps train the same recipe (Mixup 0.8, CutMix 1.0, label smoothing 0.1, EMA); baseline = eager, "
        "fp32, NCHW, foreach AdamW, timm Mixup (host-drawn), per-tensor EMA. Both run under training's CUDA backend "
        "policy (cuDNN autotuning, fp32 matmul precision 'high' = TF32): environment.backends.",
        "Loaders run train augmentation (random-resized-crop, flip, RandAugment 2/9) with the same CPU budget "
        f"({cfg.workers} DALI threads / DataLoader workers); epoch ends are part of the stream. The synthetic "
        "loader replays device-resident batches: its figure is the harness's overhead, not a loader's speed. "
        f"The end-to-end loops' loaders add the seed recipe's random erasing (p={LOOP_REPROB}); with the steps' "
        "Mixup/CutMix that is the seed recipe's whole augmentation.",
        "main_thread_ms_per_batch (loader records): the consuming thread's own CPU time inside next(loader) "
        "(time.thread_time), median over loader_steps batches, while it sleeps "
        f"{CONSUMER_BUSY_FACTOR}x the loader's ms/batch after each batch as if a GPU step ran: the host work a "
        "loader leaves on the training thread. main_thread_wall_ms_per_batch: its wall time there.",
        f"Projected epoch time = {cfg.dataset_size} images / end-to-end img/s.",
        "Speed-ups are ratios of medians; 'rounds a-b, ahead k/n' gives the range of the round-by-round ratios of "
        "the interleaved windows and in how many rounds the fast side was faster: a range across 1.0 means the "
        "difference is within the machine's noise.",
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
