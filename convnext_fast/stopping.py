"""How a signal stops the training loop: at a point where a checkpoint can be saved, not wherever it lands.

The loop polls ``StopRequest.signum`` at its sync points (every ``log_every`` steps and once per epoch) and then
saves ``last.pt`` and raises `convnext_fast.errors.Interrupted`; a second Ctrl-C raises KeyboardInterrupt at once.
"""
from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop polls; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a notebook worker): no graceful stop
            self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C raises KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
