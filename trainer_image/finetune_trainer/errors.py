"""Errors that end a run with a specific exit code (see ``finetune_trainer.__main__``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """The job's spec cannot be carried out with this model or data (message names the field)."""


class Preempted(Exception):
    """SIGTERM was handled: the state at ``step`` is committed (or nothing needed saving). Exit 85."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Diverged(RuntimeError):
    """The training loss diverged (spec.training.divergence). ``rollback``: the checkpoints written
    since it began are removed and the next attempt resumes before it (exit 86, retriable); else the
    job fails (exit 6)."""

    def __init__(self, message: str, step: int, *, rollback: bool):
        super().__init__(message)
        self.step = step
        self.rollback = rollback


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept. Exit 4."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
