"""The timing harness of `convnext-fast benchmark`: honest, repeated, synchronized measurements.

Three measurements share one shape (airbench's and timm's habits):
  * warm-up first (its wall time is kept: with `torch.compile` the extra time over steady-state steps is the
    compile cost, reported on its own, never folded into a throughput);
  * then `repeats` timed windows of `steps` iterations each, the device synchronized before and after a window
    (CUDA kernels are asynchronous; on the CPU the sync is a no-op);
  * the median over windows is the figure, min and max show the spread (the machines are shared and noisy).

`time_loop` also splits each window into time blocked in `next(loader)` (data-wait) and the rest.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["PeakMemory", "Timing", "endless", "sync", "time_loader", "time_loop", "time_step"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where every op has finished when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one measurement, in MiB.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, not the allocator's cache), reset per measurement.
    CPU: the process's peak resident set (`VmHWM`), reset per measurement through `/proc/self/clear_refs`
    (Linux >= 4.0). Where that reset is refused, the figure is the peak since the process started
    (`getrusage`), and `kind` says so. Loader worker processes are not included.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif _reset_rss_peak():
            self.kind = "process_peak_rss"
        else:
            self.kind = "process_peak_rss_since_start"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_peak_rss":
            _reset_rss_peak()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _read_vm_hwm_kib() if self.kind == "process_peak_rss" else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return hwm / 1024


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (hiwater) to the current RSS
        return _read_vm_hwm_kib() is not None
    except OSError:
        return False


def _read_vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class Timing:
    """One measurement: per-window throughput and step time, warm-up cost, peak memory, data-wait."""

    batch_size: int
    steps: int
    warmup: int
    window_s: list[float]  # wall time of each timed window of `steps` iterations
    warmup_s: float  # wall time of the whole warm-up (first iteration included)
    first_s: float  # wall time of the first iteration alone (compile, worker start-up, pipeline build)
    peak_mem_mib: float | None
    wait_s: list[float] = field(default_factory=list)  # per window: time blocked in next(loader)
    samples_per_sec_windows: list[float] = field(init=False)

    def __post_init__(self) -> None:
        assert self.window_s and all(t > 0 for t in self.window_s), self.window_s
        self.samples_per_sec_windows = [self.steps * self.batch_size / t for t in self.window_s]

    @property
    def samples_per_sec(self) -> float:
        return statistics.median(self.samples_per_sec_windows)

    @property
    def step_time_ms(self) -> float:
        return statistics.median(t / self.steps for t in self.window_s) * 1000

    @property
    def warmup_overhead_s(self) -> float:
        """Warm-up time beyond `warmup` steady-state iterations: compile + autotune + start-up, >= 0."""
        return max(0.0, self.warmup_s - self.warmup * self.step_time_ms / 1000)

    @property
    def data_wait_pct(self) -> float | None:
        if not self.wait_s:
            return None
        return statistics.median(100 * w / t for w, t in zip(self.wait_s, self.window_s))

    def to_dict(self) -> dict:
        """timm-style keys (`samples_per_sec`, `step_time_ms`, `batch_size`) plus the spread and costs."""
        per_step_ms = [t / self.steps * 1000 for t in self.window_s]
        out = {
            "samples_per_sec": round(self.samples_per_sec, 3),
            "samples_per_sec_min": round(min(self.samples_per_sec_windows), 3),
            "samples_per_sec_max": round(max(self.samples_per_sec_windows), 3),
            "samples_per_sec_windows": [round(x, 3) for x in self.samples_per_sec_windows],
            "step_time_ms": round(self.step_time_ms, 3),
            "step_time_ms_min": round(min(per_step_ms), 3),
            "step_time_ms_max": round(max(per_step_ms), 3),
            "batch_size": self.batch_size,
            "steps": self.steps,
            "warmup": self.warmup,
            "repeats": len(self.window_s),
            "first_step_s": round(self.first_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            "warmup_overhead_s": round(self.warmup_overhead_s, 3),
            "peak_mem_mib": None if self.peak_mem_mib is None else round(self.peak_mem_mib, 1),
        }
        if self.wait_s:
            out["data_wait_pct"] = round(self.data_wait_pct, 2)
            out["data_wait_pct_windows"] = [round(100 * w / t, 2) for w, t in zip(self.wait_s, self.window_s)]
        return out


def endless(loader) -> Iterator:
    """The loader's batches epoch after epoch (set_epoch(0), (1), ...): a real run's stream, epoch ends included."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"the loader yields no batch per epoch ({loader.num_samples} samples); "
                             "use more images or a smaller --batch-size")
        epoch += 1


def _warm(fn: Callable[[], object], device: torch.device, warmup: int) -> tuple[float, float]:
    """Run `fn` `warmup` (>= 1) times; return (first call's time, total time), both synchronized."""
    assert warmup >= 1
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync(device)
    return first, time.perf_counter() - t0


def time_step(step: Callable[[], torch.Tensor], *, batch_size: int, device: torch.device, steps: int,
              warmup: int, repeats: int) -> tuple[Timing, torch.Tensor]:
    """Time a training step on device-resident inputs. Returns the timing and the last loss (not synced)."""
    first, warm = _warm(step, device, warmup)
    mem = PeakMemory(device)
    mem.reset()
    windows = []
    loss = None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        windows.append(time.perf_counter() - t0)
    return Timing(batch_size, steps, warmup, windows, warm, first, mem.peak_mib()), loss


def time_loader(batches: Iterator, *, batch_size: int, device: torch.device, steps: int, warmup: int,
                repeats: int) -> Timing:
    """Loader-only throughput: pull batches as fast as the loader yields them (device work synced per window)."""
    first, warm = _warm(lambda: next(batches), device, warmup)
    mem = PeakMemory(device)
    mem.reset()
    windows = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(batches)
            assert batch.images.shape[0] == batch_size, "train loaders yield full batches"
        sync(device)
        windows.append(time.perf_counter() - t0)
    return Timing(batch_size, steps, warmup, windows, warm, first, mem.peak_mib())


def time_loop(batches: Iterator, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, batch_size: int,
              device: torch.device, steps: int, warmup: int, repeats: int) -> tuple[Timing, torch.Tensor]:
    """End-to-end: loader + step, with the time blocked in `next(batches)` counted as data-wait.

    The device is synchronized before each `next()`: the time spent there is then time the device sat idle for
    want of a batch, not the host waiting behind queued kernels (which a later sync would otherwise charge to
    the loader). The loaders prefetch in their own threads/processes, so this sync does not stop loading from
    overlapping the step; it only gives up the host's launch-ahead of the next step (microseconds per step).
    """
    def one() -> torch.Tensor:
        images, labels = next(batches)
        return step(images, labels)

    first, warm = _warm(one, device, warmup)
    mem = PeakMemory(device)
    mem.reset()
    windows, waits = [], []
    loss = None
    for _ in range(repeats):
        wait = 0.0
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            sync(device)
            t_wait = time.perf_counter()
            images, labels = next(batches)
            wait += time.perf_counter() - t_wait
            loss = step(images, labels)
        sync(device)
        windows.append(time.perf_counter() - t0)
        waits.append(wait)
    return Timing(batch_size, steps, warmup, windows, warm, first, mem.peak_mib(), waits), loss

