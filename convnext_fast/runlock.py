"""One run per run directory: an exclusive `flock` on ``RUN_DIR/.lock``, held for the whole run.

Two runs started into the same ``--out`` at once would interleave their checkpoints and metrics; the second one
to ask for the lock refuses instead. The kernel drops the lock when its process exits, however it exits
(``kill -9`` included), so a stale ``.lock`` file never blocks a later ``--resume``: the file is only where the
lock lives (and who held it last, for the message), not the lock itself. Under DDP rank 0 alone takes it (the
ranks of one job share the directory) and every rank learns the outcome.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunDirBusy(ValueError):
    """Another process holds the run directory's lock."""


class RunLock:
    """``with RunLock(run_dir):`` or ``acquire()``/``release()``; ``acquire`` raises RunDirBusy when held."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"--out {self.run_dir} is in use by another run (pid {holder}, lock {self.path}); "
                             f"wait for it to finish, stop it, or choose another --out") from None
        except OSError as e:  # a filesystem without flock (some network mounts): say so rather than guess
            os.close(fd)
            raise RunDirBusy(f"--out {self.run_dir}: cannot lock {self.path} ({e.strerror or e}); this filesystem "
                             f"does not support file locks; choose a local --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
