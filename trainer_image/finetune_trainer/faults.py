"""Test-only fault injection: make the training loss non-finite at a chosen optimizer step, spike it, or
kill the process at a chosen step.

Whether a real model diverges under given hyperparameters depends on the floating-point kernels of
the machine (a learning rate that overflows on one CPU trains smoothly on another), so the tests of
the non-finite-loss path cannot rely on it. They set ``FINETUNE_TEST_NONFINITE_LOSS_AT_STEP=N`` in
the trainer's environment instead: every micro-batch loss of optimizer step ``N`` is multiplied by
NaN, so its backward pass, the running loss and the detection at the end of the step all see what a
real divergence produces. ``FINETUNE_TEST_KILL_AT_STEP=N`` sends SIGKILL to the process itself at the
first micro-batch of step ``N``: a ``kill -9`` that lands at a known step however fast the steps go (a kill
sent from outside, on a tiny model, may land after the run has ended).

No manifest reaches this: the variable is read from the process environment only, and the API
refuses every ``spec.resources.env`` name that starts with ``FINETUNE_TEST_``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from finetune_operator.api.v1alpha1 import TEST_HOOK_ENV_PREFIX

NONFINITE_LOSS_AT_STEP = f"{TEST_HOOK_ENV_PREFIX}NONFINITE_LOSS_AT_STEP"
#: ``STEP:FACTOR``: every micro-batch loss from optimizer step STEP on is multiplied by FACTOR (its
#: gradients too) — a loss spike, in the attempt that has rolled back nothing yet only (a transient
#: blow-up: the spike detection and rollback path, spec.training.divergence).
LOSS_SPIKE = f"{TEST_HOOK_ENV_PREFIX}LOSS_SPIKE"
#: ``STEP``: the process sends itself SIGKILL at the first training micro-batch of optimizer step STEP.
KILL_AT_STEP = f"{TEST_HOOK_ENV_PREFIX}KILL_AT_STEP"


def nonfinite_loss_step(environ: dict[str, str] | None = None) -> int | None:
    """The optimizer step (1-based) whose loss the test hook poisons, or None when the hook is off."""
    value = (os.environ if environ is None else environ).get(NONFINITE_LOSS_AT_STEP)
    return int(value) if value else None


class LossFaults:
    """Applies the configured fault to a training loss; a no-op unless a test switched it on."""

    def __init__(self, environ: dict[str, str] | None = None, *, rolled_back: bool = False):
        env = os.environ if environ is None else environ
        self.nonfinite_at = nonfinite_loss_step(environ)
        spike = env.get(LOSS_SPIKE)
        self.spike: tuple[int, float] | None = None
        if spike and not rolled_back:
            at, factor = spike.split(":")
            self.spike = (int(at), float(factor))
        kill = env.get(KILL_AT_STEP)
        self.kill_at = int(kill) if kill else None

    def apply(self, loss: Any, *, step: int, training: bool) -> Any:
        """``loss`` of a micro-batch of optimizer step ``step`` (1-based); poisoned when due."""
        if training and self.kill_at is not None and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if training and self.nonfinite_at is not None and step == self.nonfinite_at:
            return loss * float("nan")
        if training and self.spike is not None and step >= self.spike[0]:
            return loss * self.spike[1]
        return loss
