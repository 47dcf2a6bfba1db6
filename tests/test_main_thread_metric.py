"""benchmark.timing.main_thread_cost: the consuming thread's own CPU time inside next(), not other threads' work,
not the consumer's time elsewhere."""

from __future__ import annotations

import queue
import threading
import time

from convnext_fast.benchmark.timing import main_thread_cost

WORK_S = 0.02


def _burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _inline():
    while True:
        _burn(WORK_S)  # on the consumer's thread
        yield 1


def _threaded(stop: threading.Event):
    """The same work done on a producer thread that keeps a queue full: the consumer only takes items."""
    q: queue.Queue = queue.Queue(maxsize=2)

    def produce():
        while not stop.is_set():
            _burn(WORK_S)
            while not stop.is_set():
                try:
                    q.put(1, timeout=0.05)
                    break
                except queue.Full:
                    pass
    threading.Thread(target=produce, daemon=True).start()
    while True:
        yield q.get()


def test_counts_work_on_the_consumer_thread_only():
    inline = main_thread_cost(_inline(), 5, busy_s=0.05)
    assert inline["main_thread_batches"] == 5 and inline["consumer_busy_ms"] == 50
    # The consumer's 50 ms of sleep per batch is not counted; its 20 ms of work inside next() is.
    assert 0.9 * WORK_S * 1000 <= inline["main_thread_ms_per_batch"] <= 3 * WORK_S * 1000
    assert inline["main_thread_wall_ms_per_batch"] >= inline["main_thread_ms_per_batch"] * 0.9

    stop = threading.Event()
    try:
        threaded = main_thread_cost(_threaded(stop), 5, busy_s=0.1, skip_first=True)
    finally:
        stop.set()
    assert threaded["main_thread_batches"] == 4 and "main_thread_first_batch_ms" in threaded
    assert threaded["main_thread_ms_per_batch"] < 0.25 * WORK_S * 1000  # the producer's 20 ms is not the consumer's


def test_a_short_stream_is_reported_not_padded():
    out = main_thread_cost(iter([1, 2]), 10, busy_s=0.0, skip_first=True)
    assert out["main_thread_batches"] == 1
    assert main_thread_cost(iter([]), 3, busy_s=0.0)["main_thread_ms_per_batch"] is None
