"""Run-time bad files in the DALI loader (the policy itself is `convnext_fast.data.badfiles`).

A mixin of `DaliLoader`, kept apart from its iteration machinery: the batch planner calls `_fault_hook` once per
batch, and `__iter__`'s decode-error path calls `_restart_after`. Host-side failures (a file that cannot be read,
a header that does not parse) are caught in `_fault_hook` before anything reaches DALI. A decode failure inside
DALI fails the whole batch and leaves the pipeline unusable ("Current pipeline object is no longer valid"), so the
file is recorded, the pipeline rebuilt, and the epoch re-planned from the failed batch with the file substituted:
the batches are the same as a run that knew the file was bad from the start.

Which DALI errors are a file's fault: DALI's operators also name samples in messages that have nothing to do with a
file ("out of bounds for sample #3"), and blaming those would drop good files one after another under
--skip-bad-files. So a file is blamed only when it fails to decode on its own (PIL), or when the operator that
raised is DALI's decoder and it named the sample; any other error is raised as `DaliOperatorError`, with DALI's
message and the operator it came from. Rebuilds per epoch are bounded (`MAX_RESTARTS_PER_EPOCH`).
"""

from __future__ import annotations

import re

import numpy as np

from convnext_fast.data.badfiles import BadFiles
from convnext_fast.data.index import DatasetError

# Pipeline rebuilds after a bad file in one epoch: each costs a pipeline build and the batches in flight; past this,
# something other than a few bad files is wrong and the epoch stops with an error.
MAX_RESTARTS_PER_EPOCH = 16
# DALI >= 1.2x: "Error in MIXED operator `nvidia.dali.fn.decoders.image`,"; older: "Error when executing Mixed
# operator ImageDecoder, instance name: ...".
_ORIGIN = re.compile(r"Error (?:in|when executing) (\w+) operator `?([\w.]+)`?")


class DaliOperatorError(RuntimeError):
    """A DALI operator failed on a batch whose files all decode on their own: not a bad file (a DALI or graph
    problem). The message names the operator and carries DALI's reason; the original error is the cause."""


def error_origin(message: str) -> str | None:
    """The operator a DALI error message says it came from ("MIXED operator nvidia.dali.fn.decoders.image"), or
    None when the message does not say."""
    m = _ORIGIN.search(message)
    return f"{m[1]} operator {m[2]}" if m else None


def _from_decoder(origin: str | None) -> bool:
    return origin is not None and "decoder" in origin.lower()  # fn.decoders.*, legacy ImageDecoder*


def _reason(message: str, err: Exception) -> str:
    reason = message.split("encountered:")[-1].split("Current pipeline object")[0].strip() or type(err).__name__
    return " ".join(reason.split())


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

    def _decode_error(self, err: Exception) -> Exception:
        """What a DALI failure of a batch in flight means. A DatasetError naming the bad file (`.path`): a file that
        fails to decode on its own (PIL; "sample #i" of the failed batch is checked first), or the one DALI's decoder
        itself named. A DatasetError with `.path` None: the decoder failed and no file could be told. Otherwise a
        DaliOperatorError: no file is to blame."""
        from convnext_fast.data.index import decode_check

        msg = str(err)
        reason, origin = _reason(msg, err), error_origin(msg)
        m = re.search(r"sample #(\d+)", msg)
        batches = [paths for _, paths, _ in self._pending]
        named = [paths[int(m[1])] for paths in batches if m and int(m[1]) < len(paths)]
        for path in dict.fromkeys(named + [p for paths in batches for p in paths]):
            why = decode_check(path)
            if why is not None:
                return self._bad.error(path, f"{why} (DALI: {reason})", verb="decode")
        if _from_decoder(origin):
            if named:
                return self._bad.error(named[0], f"DALI: {reason}", verb="decode")
            listed = "\n".join(f"  {p}" for p in (batches[0] if batches else ["(unknown)"]))
            return self._bad.error(None, f"DALI failed on a batch of these images ({reason}):\n{listed}")
        return DaliOperatorError(f"DALI {origin or 'pipeline'} failed, on a batch whose images all decode on their "
                                 f"own (not a bad file): {reason}")

    def _after_failure(self, err: Exception, restarts: int):
        """A DALI error while iterating: raise it as what it is (`_decode_error`), or, with skipping on and a file to
        blame, record the file and return the rebuilt pipeline. `restarts`: this epoch's rebuilds, this one
        included; past MAX_RESTARTS_PER_EPOCH the epoch stops."""
        found = self._decode_error(err)
        if not isinstance(found, DatasetError):
            raise found from err
        if not self._bad.skip or found.path is None:
            raise found from None
        if restarts > MAX_RESTARTS_PER_EPOCH:
            raise DatasetError(f"DALI failed on {restarts} batches in one epoch, each time on a file that does not "
                               f"decode (the last: {found.path}: {found.why}); stopping after "
                               f"{MAX_RESTARTS_PER_EPOCH} rebuilds: check the data with --verify-images") from None
        return self._restart_after(found)

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

