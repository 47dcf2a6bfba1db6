"""Run-time bad files in the DALI loader (the policy itself is `convnext_fast.data.badfiles`).

A mixin of `DaliLoader`, kept apart from its iteration machinery: the batch planner calls `_fault_hook` once per
batch, and `__iter__`'s decode-error path calls `_restart_after`. Host-side failures (a file that cannot be read,
a header that does not parse) are caught in `_fault_hook` before anything reaches DALI. A decode failure inside
DALI fails the whole batch and leaves the pipeline unusable ("Current pipeline object is no longer valid"), so the
file is recorded, the pipeline rebuilt, and the epoch re-planned from the failed batch with the file substituted:
the batches are the same as a run that knew the file was bad from the start.
"""

from __future__ import annotations

import numpy as np

from convnext_fast.data.badfiles import BadFiles
from convnext_fast.data.index import DatasetError


class DaliFaults:
    def _init_faults(self) -> None:
        self._bad = BadFiles(self._paths, skip=self.cfg.skip_bad, log=self.cfg.bad_files_log)
        self._staged: dict[int, np.ndarray] = {}  # bytes _fault_hook read while checking, for _read
        self._restart_at: int | None = None  # after a decode failure: the batch the rebuilt pipeline starts at

    def _fault_hook(self, b: int, pos: np.ndarray) -> np.ndarray | None:
        """The positions batch `b` reads, bad ones substituted; None for a batch to pass over (already trained
        before a decode failure restarted the epoch's plans). With skipping on, every file is read and its header
        parsed here, so a file that fails is replaced before anything is fed to DALI."""
        if self._restart_at is not None:
            if b < self._restart_at:
                return None
            self._restart_at = None
        pos = self._bad.substitute(pos)
        if not self._bad.skip or self._cache is not None:
            return pos
        out = pos.copy()
        for k, p in enumerate(pos.tolist()):
            while True:
                try:
                    data = self._read(p)
                    self._size(p, data)
                    self._staged[p] = data
                    break
                except DatasetError as e:
                    self._bad.add(p, getattr(e, "why", str(e)))
                    p = self._bad.replacement(p)
            out[k] = p
        return out

    def _restart_after(self, err: DatasetError):
        """A decode failure with skipping on: record the file, rebuild the pipeline (DALI's is no longer valid after
        an error) and re-plan the epoch from the oldest batch not yet returned, with the file substituted."""
        first = self._pending[0][0] if self._pending else 0
        self._bad.add(self._bad.position(err.path), err.why)
        self._release_pipeline()
        self._staged.clear()
        self._pipe = self._build_pipeline()
        self._restart_at = first
        self._plans = self._batch_plans(self._iter_epoch, self._positions, self.cfg.size_at(self._iter_epoch))
        self._pipe.schedule_run()
        return self._pipe

