"""Run an iterator ahead of its consumer in a background thread, through a bounded queue.

The DALI loader's consumer is the training thread, which also launches the GPU step: every millisecond of host
work inside `next(loader)` is a millisecond the GPU may idle. `Prefetcher` moves that work to one daemon thread
and hands over what it has prepared, in order:
  - an exception raised by the iterator is re-raised to the consumer in the position it happened (after the items
    produced before it, never earlier), with its original traceback;
  - `close()` (also on `with` exit and when the consumer drops it) stops the thread: a stop event, puts that give
    up after a short timeout so a full queue never blocks it, and a join with a timeout; the thread is a daemon,
    so a thread stuck in a library call cannot hold the interpreter at exit;
  - `depth=0` runs the iterator inline on the consumer's thread (no thread: the reference behaviour).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator

_PUT_POLL_S = 0.05  # how often a put blocked on a full queue looks at the stop event
_GET_POLL_S = 5.0  # a waiting consumer checks the thread is alive (it always says goodbye: a safety net; each
# wake-up costs the consumer CPU, measured ~0.1 ms on a loaded 2-core VM)
_ITEM, _END, _ERROR = 0, 1, 2
_EXIT_TIMEOUT_S = 10.0
_running: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()
_atexit_registered = False


def _close_running() -> None:
    """At interpreter exit, stop the threads still running (a loader left mid-epoch, never closed): a daemon
    thread still inside DALI's C++ code while the interpreter tears down can abort the process ("terminate called
    without an active exception", seen under load). Registered at the first thread's start, i.e. after DALI was
    imported, so it runs before any exit handler DALI registered (atexit runs them last-in first-out)."""
    for p in list(_running):
        p.close(timeout=_EXIT_TIMEOUT_S)


class Prefetcher:
    """`iter(items)` driven by a daemon thread, at most `depth` items ahead of the consumer.

    `setup` runs first on that thread (e.g. selecting the CUDA device, which torch keeps per thread).
    """

    def __init__(self, items: Iterator, depth: int, *, name: str = "prefetch", setup: Callable[[], None] | None = None):
        self._items = items
        self._inline = depth <= 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread: threading.Thread | None = None
        if not self._inline:
            global _atexit_registered
            if not _atexit_registered:
                atexit.register(_close_running)
                _atexit_registered = True
            self._thread = threading.Thread(target=self._run, args=(setup,), name=name, daemon=True)
            _running.add(self)
            self._thread.start()
        elif setup is not None:
            setup()

    # -- the background thread ------------------------------------------------------------------------------
    def _put(self, msg: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(msg, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, setup: Callable[[], None] | None) -> None:
        try:
            if setup is not None:
                setup()
            for item in self._items:
                if not self._put((_ITEM, item)):
                    break
            else:
                self._put((_END, None))
        except BaseException as e:  # forwarded to the consumer, in order
            self._put((_ERROR, e))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:  # a generator's `finally` runs here, on the thread that ran it
                try:
                    close()
                except Exception:
                    pass

    # -- the consumer ---------------------------------------------------------------------------------------
    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._inline:
            try:
                return next(self._items)
            except BaseException:
                self._done = True
                raise
        while True:
            try:
                kind, value = self._queue.get(timeout=_GET_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # died without a word: never hang
                    self._done = True
                    raise RuntimeError(f"the {self._thread.name} thread stopped without a result") from None
        if kind == _ITEM:
            return value
        self._done = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the thread and wait for it (at most `timeout` s). True when no thread is left running."""
        self._done = True
        if self._inline:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
            return True
        self._stop.set()
        while True:  # unblock a put in progress; drop prepared items
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
