"""Where a run's epoch rows go besides metrics.jsonl: trackers, `tune`'s reporter, a user's callback.

The epoch row is the one record (DESIGN.md §7): the loop produces it once; `run_guard.save_epoch` writes it to
metrics.jsonl first, then :class:`Sinks` hands the same dict to every sink. Sinks run on rank 0 only. A sink
that raises is reported in one warning line and switched off for the rest of the run: a tracker whose server is
down never stops training or touches the run's own files.

A sink implements any of these (each optional; missing methods are skipped):

    start(run_dir: Path, config: dict, resumed: bool)   # once, after config.json is written
    epoch(row: dict) -> bool | None                      # after each epoch's row is saved; True asks the run
                                                         # to stop at this epoch boundary (checkpoint saved,
                                                         # as for SIGTERM; the run then ends normally with
                                                         # summary["stopped_by"] and can be resumed)
    end(state: str, summary: dict | None)                # finished | stopped_early | stopped | interrupted
                                                         # | failed

A stopping sink may say why in a ``stop_reason`` attribute (else its ``name``, else its class name is used).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable


class Sinks:
    """Fan-out of the loop's events to its sinks, each isolated from the others and from the run."""

    def __init__(self, sinks: Iterable[Any] = (), *, enabled: bool = True,
                 warn: Callable[[str], None] = print) -> None:
        self._sinks = list(sinks) if enabled else []
        self._warn = warn

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def _call(self, method: str, *args: Any) -> list[tuple[Any, Any]]:
        """(sink, its answer) for each sink that has ``method`` and did not fail."""
        out = []
        for sink in list(self._sinks):
            fn = getattr(sink, method, None)
            if fn is None:
                continue
            try:
                out.append((sink, fn(*args)))
            except Exception as e:  # noqa: BLE001 - a sink must never take the run down
                self._sinks.remove(sink)
                self._warn(f"warning: {_name(sink)} failed in {method}() and is off for the rest of this run: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return out

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        self._call("start", run_dir, config, resumed)

    def epoch(self, row: dict) -> str | None:
        """Hand ``row`` to every sink; when one of them asks the run to stop, why (its stop_reason or name)."""
        for sink, answer in self._call("epoch", row):
            if answer is True:
                return getattr(sink, "stop_reason", "") or _name(sink)
        return None

    def end(self, state: str, summary: dict | None = None) -> None:
        self._call("end", state, summary)


class Callback:
    """A plain function as a sink: ``report(row) -> bool | None`` (True = stop at this epoch boundary)."""

    name = "report callback"

    def __init__(self, fn: Callable[[dict], Any]) -> None:
        self.fn = fn

    def epoch(self, row: dict) -> Any:
        return self.fn(row)


def _name(sink: Any) -> str:
    return getattr(sink, "name", None) or type(sink).__name__
