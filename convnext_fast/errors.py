"""Errors a run raises to its caller, below every module that raises them (train, run_guard, tune).

User errors stay ``ValueError`` (a message naming the file, flag or value); these two say what became of a run.
"""
from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved; ``exit_code`` is 128 + signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
