"""The result of a finished `finetune run` (the `finetune_run` fixture's return) and checks on it.

A plain module, not conftest.py: test modules import it by name, and ``from conftest import ...``
resolves to whichever conftest.py pytest loaded last (tests/e2e has one too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiny


@dataclass
class RunResult:
    returncode: int
    output: str
    workdir: Path

    @property
    def losses(self) -> list[float]:
        return tiny.train_losses(self.workdir)

    def summary(self) -> dict[str, Any]:
        return dict(json.loads((self.workdir / "summary.json").read_text()))


def assert_loss_falls(result: RunResult, steps: int = 20) -> None:
    assert result.returncode == 0, result.output[-6000:]
    losses = result.losses
    assert len(losses) >= steps, f"expected {steps} logged steps, got {len(losses)}"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first * 0.97, f"loss did not fall: first5 {first:.4f} last5 {last:.4f} ({losses})"
