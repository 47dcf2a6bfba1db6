"""The loop meter's accounting when the loader's work is on the GPU, checked on the CPU with a fake device: a
queue of "kernel" seconds that a stream synchronize sleeps through. A loader whose batches need 50 ms of device
work must show up as data-wait, not as step time (the device idles for data either way)."""

from __future__ import annotations

import time

import pytest
import torch

from convnext_fast.benchmark.timing import Meter, endless, interleave
from convnext_fast.data import Batch

CUDA = torch.device("cuda", 0)


class _FakeDevice:
    """One stream: work is queued as seconds; synchronize() waits for all of it (a sleep)."""

    def __init__(self):
        self.queued = 0.0

    def enqueue(self, seconds: float) -> None:
        self.queued += seconds

    def synchronize(self, *_args) -> None:
        time.sleep(self.queued)
        self.queued = 0.0


@pytest.fixture
def fake_gpu(monkeypatch):
    dev = _FakeDevice()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: dev)
    monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
    return dev


class _GpuLoader:
    """Host returns at once; each batch queues `gpu_s` of device work (its copy and erasing)."""

    def __init__(self, dev: _FakeDevice, gpu_s: float, n: int = 4):
        self.dev, self.gpu_s, self.n, self.num_samples = dev, gpu_s, n, 4 * n

    def set_epoch(self, e: int) -> None:
        pass

    def __iter__(self):
        for _ in range(self.n):
            self.dev.enqueue(self.gpu_s)
            yield Batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))


def _data_wait(dev: _FakeDevice, loader_s: float, step_s: float) -> float:
    steps = []

    def step(images, labels):
        dev.enqueue(step_s)
        steps.append(1)

    meter = Meter.loop_of(endless(_GpuLoader(dev, loader_s)), step, batch_size=4, device=CUDA, steps=4, warmup=1,
                          track_memory=False)
    (t,) = interleave([meter], repeats=2)
    assert len(steps) == 1 + 2 * 4 and len(t.wait_s) == 2
    return t.data_wait_pct


def test_loaders_gpu_work_counts_as_data_wait(fake_gpu):
    # 50 ms of loader device work per batch, a step of 0 ms: the device idles for data nearly all the time.
    # (Synchronizing before next() and starting the clock after it, as before, reported ~0% here.)
    assert _data_wait(fake_gpu, loader_s=0.05, step_s=0.0) > 60


def test_steps_gpu_work_is_not_charged_to_the_next_batch(fake_gpu):
    # The converse: a 50 ms step and a loader with no device work: the step's kernels are not data-wait.
    assert _data_wait(fake_gpu, loader_s=0.0, step_s=0.05) < 40
