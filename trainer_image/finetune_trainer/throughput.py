"""Tokens/s and samples/s: the one definition every report uses.

Throughput is the real (non-padding) tokens and the rows the data collator handed to training, over
the time spent training: the time and tokens of evaluations and checkpoint saves are left out (the
mark is reset after each). :class:`Throughput` measures this rank's; the progress line, the run's
``metrics.jsonl`` and the FineTuneJob's status show the job-wide mean since the run (re)started
(this rank's times the world size: every rank trains the same number of rows a step), Prometheus
the per-rank rate of the last :data:`WINDOW` steps (dashboards sum the ranks).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol

from transformers import TrainerCallback

#: Optimizer steps of the recent rate.
WINDOW = 20


class Counts(Protocol):
    """Running counts of what the collator handed out (the data collator)."""

    tokens: int
    samples: int


class Throughput(TrainerCallback):
    """This rank's training throughput, from the collator's counts at the Trainer's events.

    Registered before the callbacks that read it, so that at every step end it is current.
    """

    def __init__(self, counts: Counts, window: int = WINDOW):
        self.counts = counts
        self.recent: deque[tuple[float, int, int]] = deque(maxlen=window)
        self.seconds = 0.0
        self.tokens = 0
        self.samples = 0
        self._mark()

    def _mark(self) -> None:
        self._mark_time = time.monotonic()
        self._mark_tokens = self.counts.tokens
        self._mark_samples = self.counts.samples

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        step = (now - self._mark_time, self.counts.tokens - self._mark_tokens, self.counts.samples - self._mark_samples)
        if step[0] > 0:
            self.recent.append(step)
            self.seconds += step[0]
            self.tokens += step[1]
            self.samples += step[2]
        self._mark()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark()

    def mean(self) -> tuple[float, float] | None:
        """(tokens/s, samples/s) of this rank since training (re)started; None before a step."""
        if self.seconds <= 0:
            return None
        return self.tokens / self.seconds, self.samples / self.seconds

    def current(self) -> tuple[float, float] | None:
        """(tokens/s, samples/s) of this rank over the last ``window`` steps; None before a step."""
        seconds = sum(s for s, _, _ in self.recent)
        if seconds <= 0:
            return None
        return sum(t for _, t, _ in self.recent) / seconds, sum(n for _, _, n in self.recent) / seconds
