"""The verification record: which files a full decode (`--verify-images`) already passed, so it costs once.

One small JSON file per data root, keyed by each file's (relative path, size, mtime_ns): a later run decodes only
the files that are new or changed. It lives outside the dataset (which may be read-only), under
`$CONVNEXT_FAST_VERIFY_DIR`, else `<cache dir>/verified` (the cache dir is `$CONVNEXT_FAST_CACHE` or
`~/.cache/convnext_fast`, as for the demo dataset). A record that cannot be read is ignored, one that cannot be
written is skipped with a warning: it only saves time, it never decides that a file is good on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

VERSION = 1


def record_dir() -> Path:
    """Where verification records live (see the module docstring)."""
    env = os.environ.get("CONVNEXT_FAST_VERIFY_DIR")
    if env:
        return Path(env).expanduser()
    from convnext_fast.data.demo import default_cache_dir

    return default_cache_dir() / "verified"


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class VerificationRecord:
    """The files under `root` that decoded, with the (size, mtime_ns) they had when they did."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        # The index's paths are abspath(root)/...: slicing that prefix off is what os.path.relpath does, cheaply.
        self._prefix = os.path.join(os.path.abspath(root), "")
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        self.path = record_dir() / f"{digest}.json"
        self._files: dict[str, list[int]] = {}
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("version") == VERSION and saved.get("root") == str(self.root):
                self._files = dict(saved["files"])
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: decode everything
            pass

    def _rel(self, path: str) -> str:
        return path[len(self._prefix):] if path.startswith(self._prefix) else os.path.relpath(path, self.root)

    def unchanged(self, paths: list[str]) -> tuple[list[str], dict[str, tuple[int, int] | None]]:
        """(paths to decode: new or changed since their last good decode, the current stat key of every path)."""
        keys = {p: _stat_key(p) for p in paths}
        todo = [p for p in paths if keys[p] is None or self._files.get(self._rel(p)) != list(keys[p])]
        return todo, keys

    def update(self, good: list[str], keys: dict[str, tuple[int, int] | None]) -> None:
        """Remember `good` (decoded just now, or unchanged) with their stat keys, and write the record."""
        files = {self._rel(p): list(keys[p]) for p in good if keys.get(p) is not None}
        if files == self._files:
            return
        self._files = files
        body = json.dumps({"version": VERSION, "root": str(self.root), "files": files}, separators=(",", ":"))
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body)
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"convnext-fast: warning: cannot write the verification record {self.path} ({e.strerror or e}); "
                  f"the next --verify-images run decodes every file again (set CONVNEXT_FAST_VERIFY_DIR)",
                  file=sys.stderr, flush=True)
