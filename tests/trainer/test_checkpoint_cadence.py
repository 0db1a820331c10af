"""The checkpoint callback saves by time: spec.checkpoint.everyMinutes, counted on rank 0's clock."""

from __future__ import annotations

from pathlib import Path

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.checkpointing import CheckpointCallback, LossWatch, Preemption
from finetune_trainer.distributed import World
from transformers import TrainerControl, TrainerState, TrainingArguments


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_minutes_saves_when_that_much_time_has_passed_since_the_last_save(tmp_path: Path) -> None:
    """With everyMinutes 2 (and no step cadence), a step saves once 120 s have passed since training
    began or since the last save; without everyMinutes, only the last step saves."""

    def callback(every_minutes: float | None, clock: Clock) -> CheckpointCallback:
        spec = FineTuneJobSpec.model_validate(
            {
                "model": {"uri": "org/model"},
                "data": {"train": {"uri": "train.jsonl"}},
                "training": {"maxSteps": 100},
                "checkpoint": {"uri": str(tmp_path / "store"), "everyMinutes": every_minutes, "everySteps": 1000},
            }
        )
        return CheckpointCallback(
            spec,
            world=World(rank=0, local_rank=0, world_size=1, local_world_size=1),
            store=CheckpointStore(str(tmp_path / "store"), config_hash="0" * 64),
            uploader=None,
            preemption=Preemption(save=True),
            best=None,
            keep_best_model=False,
            resumed=None,
            best_so_far=None,
            loss_watch=LossWatch(),
            clock=clock,
        )

    args = TrainingArguments(output_dir=str(tmp_path / "staging"), use_cpu=True, report_to="none")

    def saves(cb: CheckpointCallback, clock: Clock, seconds: list[float]) -> list[int]:
        """The steps that save when step N ends ``seconds[N-1]`` after training began."""
        state, control = TrainerState(max_steps=100), TrainerControl()
        start = clock.now
        cb.on_train_begin(args, state, control)
        saved = []
        for step, at in enumerate(seconds, start=1):
            clock.now = start + at
            state.global_step = step
            cb.on_step_end(args, state, control)
            if control.should_save:
                saved.append(step)
                cb.on_save(args, state, control)
                control.should_save = False
        return saved

    timeline = [30.0, 119.0, 121.0, 200.0, 240.0, 300.0, 400.0]
    clock = Clock()
    # 121 s after the start, then 179 s after step 3's save (step 4, 200 s after the start, is too early).
    assert saves(callback(2, clock), clock, timeline) == [3, 6]
    clock = Clock()
    assert saves(callback(None, clock), clock, timeline) == []
