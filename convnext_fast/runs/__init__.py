"""Runs as data: read run directories into records, compare them, show them (terminal tables, one HTML page).

    scan_runs(paths) -> list[RunRecord]      every run directory at or under paths (runs/, a tune study, a run)
    read_run(path) -> RunRecord              one run directory
    compare_runs(records) -> Comparison      config keys that differ, best/final metrics, per-class recall
    write_compare_page(cmp, path)            the self-contained HTML page (curves as inline SVG)

Everything is read from the files a run saves (config.json, metrics.jsonl, summary.json, status.json,
per_class.json); nothing here loads a model (DESIGN §6). Submodules are imported on first use so that the
training loop's import of `runs.per_class`/`runs.status` stays light.
"""
from __future__ import annotations

_EXPORTS = {"scan_runs": "scan", "read_run": "scan", "find_run_dirs": "scan", "RunRecord": "scan",
            "compare_runs": "compare", "Comparison": "compare", "write_compare_page": "page",
            "render_compare": "page"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"convnext_fast.runs.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'convnext_fast.runs' has no attribute {name!r}")
