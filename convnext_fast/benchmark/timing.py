"""The timing harness of `convnext-fast benchmark`: honest, repeated, synchronized, interleaved measurements.

Every measurement has one shape (airbench's and timm's habits):
  * warm-up first; its wall time is kept (with `torch.compile` the extra time over steady-state steps is the
    compile cost, reported on its own, never folded into a throughput);
  * then `repeats` timed windows of `steps` iterations each, the device synchronized before and after a window
    (CUDA kernels are asynchronous; on the CPU the sync is a no-op);
  * the median over windows is the figure; min and max show the spread.
Measurements that are compared (baseline vs fast) run their windows interleaved, A B B A A B ..., so that a
shared, noisy machine slows both alike instead of whichever happened to run during a burst (`interleave`).

`Meter.loop_of` also splits each window into data-wait (in `next(loader)` until the batch is ready on the
device) and the rest.
`main_thread_cost` measures what a loader costs the thread that consumes it (the training thread, which also
launches the GPU step): its own CPU time inside `next(loader)` while it spends a fixed time per batch elsewhere.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Meter", "PeakMemory", "Timing", "endless", "interleave", "main_thread_cost", "peak_gpu_memory",
           "sync"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where every op has finished when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Memory use in MiB: `current()` and `peak()` since the last `reset()`.

    CUDA: torch's allocator (`memory_allocated` / `max_memory_allocated`: tensors, not the cache; memory that a
    library allocates itself, like DALI's, is not seen). CPU: the process's resident set (`VmRSS`) and its peak
    (`VmHWM`), reset through `/proc/self/clear_refs` (Linux >= 4.0); where that reset is refused, the peak is
    the peak since the process started and `kind` says so. Loader worker processes are not included.
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

    def current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return (_read_status_kib("VmRSS:") or 0) / 1024

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _read_status_kib("VmHWM:") if self.kind == "process_peak_rss" else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return hwm / 1024


def peak_gpu_memory(device: torch.device, size: int) -> dict:
    """torch's peak allocated / reserved MiB since the size's start (the caching allocator: DALI's own pool is not
    in it), and the device's used MiB now (cudaMemGetInfo: every allocator, DALI's pool included). None on CPU."""
    out = {"img_size": size, "max_memory_allocated_mib": None, "max_memory_reserved_mib": None,
           "device_used_mib_at_end": None}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update(max_memory_allocated_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                   max_memory_reserved_mib=round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
                   device_used_mib_at_end=round((total - free) / 2**20, 1))
    return out


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (hiwater) to the current RSS
        return _read_status_kib("VmHWM:") is not None
    except OSError:
        return False


def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
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


class Meter:
    """Times one measurement window by window, so that several can be interleaved (see `interleave`).

    `one()` runs one iteration and returns the seconds of it spent waiting for data (0 when not a loop).
    Memory: with `state_bytes` (called after the warm-up: what the measured thing keeps between windows, e.g. an
    engine's weights, optimizer state and EMA), the peak is that + the window's peak above its start, i.e. this
    step's footprint as if it ran alone, whatever else is alive; without it, the absolute peak in the windows.
    On the CPU the part above the start is a lower bound: the allocator reuses memory it already holds.
    """

    def __init__(self, one: Callable[[], float], *, batch_size: int, device: torch.device, steps: int,
                 warmup: int, state_bytes: Callable[[], int] | None = None, track_memory: bool = True,
                 loop: bool = False):
        assert warmup >= 1 and steps >= 1
        self.one, self.batch_size, self.device, self.steps, self.warmup = one, batch_size, device, steps, warmup
        self.state_bytes, self.loop = state_bytes, loop
        self.mem = PeakMemory(device) if track_memory else None
        self.windows: list[float] = []
        self.waits: list[float] = []
        self.peak: float | None = None
        self.first_s = self.warmup_s = 0.0

    @classmethod
    def step(cls, step: Callable[[], object], **kw) -> "Meter":
        """A step on fixed, device-resident inputs."""
        def one() -> float:
            step()
            return 0.0
        return cls(one, **kw)

    @classmethod
    def loader(cls, batches: Iterator, **kw) -> "Meter":
        """Pull batches as fast as the loader yields them (device work synced at the window's end)."""
        def one() -> float:
            next(batches)
            return 0.0
        return cls(one, **kw)

    @classmethod
    def loop_of(cls, batches: Iterator, step: Callable[[torch.Tensor, torch.Tensor], object], **kw) -> "Meter":
        """End-to-end: `next(batches)` then `step(images, labels)`; data-wait = from asking for a batch until the
        batch is ready on the device.

        The data-wait clock starts before `next()` and stops once the consumer's stream has finished the batch's own
        GPU work (a synchronize after `next()`: a DALI batch's copy out and erasing, which that stream waits for; a
        torchvision batch's host-to-device copy), so a loop bound by the loader's GPU work shows it as data-wait.
        The stream is synchronized after the step too: the step's kernels are never charged to the next batch's
        wait. Only the current stream: the loader's work for later batches (its own stream, DALI's) keeps running
        beside the step, so loading still overlaps the step; the syncs give up the host's launch-ahead only
        (microseconds a step). Compile and warm-up stay out of the windows (`warm`).
        """
        device = kw["device"]

        def sync_stream() -> None:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()

        def one() -> float:
            t0 = time.perf_counter()
            images, labels = next(batches)
            sync_stream()
            wait = time.perf_counter() - t0
            step(images, labels)
            sync_stream()
            return wait
        return cls(one, loop=True, **kw)

    def warm(self) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.one()
        sync(self.device)
        self.first_s = time.perf_counter() - t0
        for _ in range(self.warmup - 1):
            self.one()
        sync(self.device)
        self.warmup_s = time.perf_counter() - t0

    def window(self) -> None:
        if self.mem is not None:
            sync(self.device)
            self.mem.reset()
            start = self.mem.current()
        sync(self.device)
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(self.steps):
            wait += self.one()
        sync(self.device)
        self.windows.append(time.perf_counter() - t0)
        if self.loop:
            self.waits.append(wait)
        if self.mem is not None:
            peak = self.mem.peak()
            if self.state_bytes is not None:
                peak = self.state_bytes() / 2**20 + max(0.0, peak - start)
            self.peak = peak if self.peak is None else max(self.peak, peak)

    def timing(self) -> Timing:
        return Timing(self.batch_size, self.steps, self.warmup, list(self.windows), self.warmup_s, self.first_s,
                      self.peak, list(self.waits))


def interleave(meters: Sequence[Meter], repeats: int) -> list[Timing]:
    """Warm each meter, then run `repeats` rounds of one window each, reversing the order every other round.

    The reversal (A B, B A, A B, ...) also evens out what one measurement leaves behind for the next (a loader's
    background prefetch refilling, caches).
    """
    for m in meters:
        m.warm()
    for r in range(repeats):
        for m in (meters if r % 2 == 0 else list(reversed(meters))):
            m.window()
    return [m.timing() for m in meters]


def main_thread_cost(batches: Iterator, n: int, busy_s: float, *, skip_first: bool = False) -> dict:
    """What `n` calls of `next(batches)` cost the calling thread, while it spends `busy_s` per batch elsewhere.

    The consumer sleeps `busy_s` after each batch, as a training thread does while the GPU runs its step (it
    waits on the device with the GIL released), so a loader that works ahead has the time to. Reported per
    batch (median over the calls; `skip_first`: the first call, pipeline build and start-up, is reported apart):
    `main_thread_ms_per_batch` = the calling thread's CPU time inside next() (`time.thread_time`: other
    threads' and processes' work is not counted, however busy the machine), `main_thread_wall_ms_per_batch` =
    its wall time there (waiting for a batch not ready yet, or for the GIL, included).
    """
    cpu, wall = [], []
    for _ in range(n):
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
        del batch  # the consumer is done with it during its step (a host batch's free is not next()'s cost)
        time.sleep(busy_s)
    out = {"consumer_busy_ms": round(busy_s * 1000, 3)}
    if skip_first and cpu:
        out["main_thread_first_batch_ms"] = round(cpu[0] * 1000, 3)
        cpu, wall = cpu[1:], wall[1:]
    if not cpu:
        return {**out, "main_thread_ms_per_batch": None, "main_thread_wall_ms_per_batch": None,
                "main_thread_batches": 0}
    return {**out, "main_thread_ms_per_batch": round(statistics.median(cpu) * 1000, 3),
            "main_thread_wall_ms_per_batch": round(statistics.median(wall) * 1000, 3),
            "main_thread_ms_max": round(max(cpu) * 1000, 3), "main_thread_batches": len(cpu)}
