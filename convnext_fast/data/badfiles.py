"""Files that turn out bad while a run reads them (a dataset re-synced under a running job, a bit flip), for both
image-folder loaders.

Without skipping, the error names the file and the flag that skips it. With skipping (`--skip-bad-files`), the
file is appended to a log (the trainer's ``RUN_DIR/bad_files.txt``: one ``path<TAB>reason`` line each) and from
then on its position is filled by a deterministic replacement: the next position in the index (cyclically) that is
not bad. Positions, epoch permutations and the number of steps never change, so a resumed run that reads the log
makes the same choice as the run that found the file.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

from convnext_fast.data.index import DatasetError

SKIP_HINT = "pass --skip-bad-files to leave it out (it is then listed in RUN_DIR/bad_files.txt)"


def read_log(path: str | os.PathLike | None) -> dict[str, str]:
    """{path: reason} from a bad-files log; an absent log is empty."""
    if path is None or not os.path.exists(path):
        return {}
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                name, _, why = line.rstrip("\n").partition("\t")
                out.setdefault(name, why)
    return out


class BadFiles:
    """The bad positions of one loader's index, and what fills each of them."""

    def __init__(self, paths: list[str], *, skip: bool, log: str | os.PathLike | None):
        self.skip = skip
        self.log = None if log is None else str(log)
        self._paths = paths
        self._where = {p: i for i, p in enumerate(paths)}
        self._bad = {self._where[p] for p in read_log(self.log) if p in self._where} if skip else set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn/forkserver get a copy
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def positions(self) -> set[int]:
        return set(self._bad)

    def position(self, path: str) -> int:
        return self._where[path]

    def error(self, path: str | None, why: str, verb: str = "read") -> DatasetError:
        """The error a bad file raises: it names the file and the flag that skips it; `.path` and `.why` tell a
        skipping loader what to record."""
        err = DatasetError(f"cannot {verb} image {path}: {why}; {SKIP_HINT}" if path else why)
        err.path, err.why = path, why
        return err

    def add(self, pos: int, why: str) -> None:
        """Record position `pos` as bad: in memory and (once) in the log, with a one-line warning."""
        with self._lock:
            if pos in self._bad:
                return
            self._bad.add(pos)
            path = self._paths[pos]
            if self.log is not None and path not in read_log(self.log):
                # O_APPEND: each rank or worker process appends whole lines; a duplicate line is harmless.
                with open(self.log, "a", encoding="utf-8") as f:
                    f.write(f"{path}\t{' '.join(why.split())}\n")
            where = f"; listed in {self.log}" if self.log else ""
            print(f"convnext-fast: warning: left out bad image {path} ({why}){where}", file=sys.stderr, flush=True)
            if len(self._bad) >= len(self._paths):
                raise DatasetError(f"every image of this loader is bad (the last one: {path}: {why})")

    def replacement(self, pos: int) -> int:
        """`pos` if it is good, else the next good position after it (cyclically)."""
        n = len(self._paths)
        for k in range(n):
            cand = (pos + k) % n
            if cand not in self._bad:
                return cand
        raise DatasetError("every image of this loader is bad")

    def substitute(self, positions: np.ndarray) -> np.ndarray:
        """`positions` with every known-bad one replaced (a copy only when something changes)."""
        if not self._bad or not np.isin(positions, list(self._bad)).any():
            return positions
        return np.asarray([self.replacement(int(p)) for p in positions], dtype=positions.dtype)
