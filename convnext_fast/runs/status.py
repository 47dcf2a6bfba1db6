"""RUN_DIR/status.json: how a run's last session ended, the one fact its other files cannot tell.

A finished run has summary.json; an interrupted one (Ctrl-C, SIGTERM, a sink's stop) and a failed one (a
non-finite loss, a full disk, a crash in the loop) both leave checkpoints/last.pt and no summary, and a killed
process (``kill -9``, out of memory) leaves the same. :class:`StatusSink` is a sink of the epoch-row seam
(`convnext_fast.sinks`) that writes ``status.json`` at start (``running``) and at end (the state the loop hands
to ``end()``), so `convnext_fast.runs.scan` can tell them apart: ``running`` with nobody holding the run's lock is
a process that died without a word.

    {"state": "interrupted", "detail": "interrupted (SIGTERM) at ...", "started": "2026-...Z",
     "ended": "2026-...Z", "sessions": 2, "pid": 1234}
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped_early", "stopped", "interrupted", "failed")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_status(run_dir: Path) -> dict:
    """status.json of ``run_dir`` ({} when absent or unreadable: a run from before this file existed)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("state") in STATES else {}


class StatusSink:
    """Writes RUN_DIR/status.json at the start and the end of each session of a run (rank 0; see module doc)."""

    name = "status.json"

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.status: dict = {}

    def _write(self) -> None:
        from convnext_fast.run_files import atomic_write_text

        atomic_write_text(self.run_dir / STATUS_FILE, json.dumps(self.status, indent=2) + "\n")

    def start(self, run_dir: Path, config: dict, resumed: bool) -> None:
        self.run_dir = Path(run_dir)
        before = read_status(self.run_dir) if resumed else {}
        self.status = {"state": "running", "detail": "", "started": before.get("started") or _now(), "ended": None,
                       "sessions": int(before.get("sessions") or 0) + 1, "pid": os.getpid()}
        self._write()

    def end(self, state: str, summary: dict | None) -> None:
        if self.run_dir is None:
            return
        detail = ""
        if state in ("interrupted", "failed"):
            # The loop calls end() inside its `except` block: the exception in flight is why the run ended.
            exc = sys.exc_info()[1]
            if isinstance(exc, KeyboardInterrupt):
                detail = "aborted by a second Ctrl-C (checkpoints/last.pt is the last complete checkpoint)"
            elif exc is not None:
                text = str(exc).splitlines()[0] if str(exc) else ""
                detail = text if state == "interrupted" else f"{type(exc).__name__}: {text}"
        if state == "stopped" and summary:  # a sink or callback (tune's pruner, a time limit) asked it to stop
            detail = f"{summary.get('stopped_by') or 'stopped by an epoch callback'}; resumable"
        self.status.update(state=state, detail=detail, ended=_now())
        self._write()
