"""Divergence recovery (spec.training.onDivergence, spec.training.divergence) through `finetune run`.

A loss spike is injected by the trainer's test hook (``FINETUNE_TEST_LOSS_SPIKE=STEP:FACTOR``: every
micro-batch loss from STEP on, and so its gradients, times FACTOR, in the attempt that has rolled back
nothing yet — a transient blow-up). With ``rollback`` the trainer removes the checkpoints written since
the spike began and exits 86; `finetune run`, as the operator does, runs again, and the next attempt
resumes from the newest checkpoint before the spike with the learning rate halved, then trains to the
end. With ``fail`` the job ends (exit 6) keeping its checkpoints. A non-finite loss that comes back
after the last rollback allowed fails the job too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny
from finetune_trainer.checkpointing import DivergenceWatch
from finetune_trainer.faults import LOSS_SPIKE, NONFINITE_LOSS_AT_STEP
from runs import RunResult
from tiny import job_manifest

LR, STEPS, SPIKE = 3e-3, 20, 11


def job(name: str, tiny_model: Path, train_jsonl: Path, store: Path, policy: str, **divergence: Any) -> dict[str, Any]:
    return job_manifest(
        name,
        tiny_model,
        train_jsonl,
        training__maxSteps=STEPS,
        training__learningRate=LR,
        training__onDivergence=policy,
        training__divergence={"lossFactor": 3, "consecutiveLogs": 3, "learningRateScale": 0.5, **divergence},
        checkpoint={"uri": str(store), "everySteps": 4, "keepLast": 10, "everyMinutes": 600},
    )


def committed(store: Path, name: str) -> list[int]:
    root = store / "local" / name
    return sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in root.glob("checkpoint-*/manifest.json"))


def test_a_loss_spike_rolls_back_to_the_checkpoint_before_it_with_half_the_learning_rate(
    tiny_model: Path, train_jsonl: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    store = tmp_path / "ckpt"
    manifest = job("spike", tiny_model, train_jsonl, store, "rollback")
    result = finetune_run(manifest, "--nproc", "2", env={LOSS_SPIKE: f"{SPIKE}:30"})
    assert result.returncode == 0, result.output[-5000:]
    assert "rolling back" in result.output and "rollback 1 of 2: removed checkpoints [12]" in result.output
    summary = json.loads((result.workdir / "summary.json").read_text())
    [rollback] = summary["rollbacks"]
    # Windows 11, 12, 13 above 3x the lowest: detected at 13, begun at 11; checkpoint-12 (written from
    # the spiking weights) removed; the next attempt resumed from checkpoint-8.
    assert (rollback["step"], rollback["detected_step"]) == (SPIKE, SPIKE + 2), rollback
    assert rollback["removed_checkpoints"] == [12] and rollback["resumed_from"] == 8, rollback
    assert rollback["learning_rate_scale"] == 0.5 and rollback["loss"] > 3 * rollback["lowest_loss"]
    assert committed(store, "spike")[-1] == STEPS
    logged = [m for m in tiny.read_metrics(result.workdir) if "learning_rate" in m]
    restart = next(i for i in range(1, len(logged)) if logged[i]["step"] <= logged[i - 1]["step"])
    first, second = logged[:restart], logged[restart:]
    # The first attempt ran steps 1..13 (13 was not logged: it stopped there) at the spec's rate; the
    # second resumed at step 9 at half of it, and trained to the end.
    assert [m["step"] for m in first] == list(range(1, SPIKE + 2)), first
    assert [m["step"] for m in second] == list(range(9, STEPS + 1)), second
    assert all(math.isclose(m["learning_rate"], LR) for m in first), first
    assert all(math.isclose(m["learning_rate"], LR / 2) for m in second), second
    # The spike blew the loss up; the second attempt, from the pre-spike weights, is back near the lowest.
    assert min(m["loss"] for m in first[SPIKE - 1 :]) > 3 * rollback["lowest_loss"], first
    assert max(m["loss"] for m in second) < 3 * rollback["lowest_loss"], second


def test_with_fail_a_spike_ends_the_job_keeping_every_checkpoint(
    tiny_model: Path, train_jsonl: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    store = tmp_path / "ckpt"
    result = finetune_run(job("spike-fails", tiny_model, train_jsonl, store, "fail"), env={LOSS_SPIKE: f"{SPIKE}:30"})
    assert result.returncode == 6, result.output[-5000:]
    assert "training loss diverged: mean loss" in result.output and f"since step {SPIKE}" in result.output
    assert "onDivergence fail" in result.output
    assert committed(store, "spike-fails") == [4, 8, 12]


def test_a_nonfinite_loss_rolls_back_until_the_rollbacks_allowed_are_used(
    tiny_model: Path, train_jsonl: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    # The NaN hook poisons step 10 in every attempt: rolled back once (maxRollbacks 1), then failed.
    store = tmp_path / "ckpt"
    manifest = job("nan", tiny_model, train_jsonl, store, "rollback", maxRollbacks=1)
    result = finetune_run(manifest, env={NONFINITE_LOSS_AT_STEP: "10"})
    assert result.returncode == 6, result.output[-5000:]
    assert "the loss became non-finite at step 10; rollback 1 of 1" in result.output
    assert "diverged again after 1 rollbacks (maxRollbacks)" in result.output
    [record] = json.loads((store / "local" / "nan" / "rollbacks.json").read_text())
    assert (record["step"], record["loss"], record["resumed_from"]) == (10, None, 8), record


@pytest.mark.parametrize(
    ("means", "expected"),
    [
        ([4.0, 3.0, 2.0, 7.0, 7.0, 7.0], (4, 6, 2.0)),  # three windows above 3 x 2.0: begun at the 4th
        ([4.0, 3.0, 2.0, 7.0, 7.0, 1.0, 7.0], None),  # interrupted: the count starts again
        ([4.0, 3.0, 2.0, 5.9, 5.9, 5.9], None),  # below the factor
    ],
)
def test_the_watch_counts_consecutive_windows_above_the_factor(
    means: list[float], expected: tuple[int, int, float] | None
) -> None:
    watch = DivergenceWatch(factor=3.0, consecutive=3, window=2)
    found = None
    for i, mean in enumerate(means):
        for step in (2 * i + 1, 2 * i + 2):
            closes = watch.add(step, mean)
        assert closes
        assert math.isclose(watch.window_mean(), mean)
        found = watch.judge(2 * i + 2, mean) or found
    if expected is None:
        assert found is None
    else:
        window, detected_window, lowest = expected
        assert found is not None and (found.onset, found.detected, found.lowest) == (
            2 * (window - 1) + 1,
            2 * detected_window,
            lowest,
        )
