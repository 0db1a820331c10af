"""One recipe per task: a module whose ``run(config) -> summary`` trains it (see :mod:`..harness`)
and whose ``predict`` runs what it trained (:mod:`..predict`).

Which module trains which ``spec.task.type`` is the API's task table (``TaskRow.recipe`` in
:mod:`finetune_operator.api.tasks`), which also refuses at admission a task without one: every job
that reaches the trainer finds its recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from finetune_operator.api.tasks import task_row
from finetune_operator.api.trainer_config import TrainerConfig

if TYPE_CHECKING:
    from ..data.records import Record
    from ..predict import Predictions, SavedOutput


class Predictor(Protocol):
    """A recipe's ``predict``: run the saved model on checked records, write one JSON line per record
    to ``out``, return the task's scores over them (empty when the task has none to compute)."""

    def __call__(
        self,
        saved: SavedOutput,
        records: list[Record],
        out: Predictions,
        *,
        cache_dir: Path,
        max_new_tokens: int,
    ) -> dict[str, float]: ...


def _recipe_module(task_type: str) -> Any:
    name = task_row(task_type).recipe
    # Unreachable otherwise: the spec's rules refuse a task without a recipe, also when the trainer
    # config is loaded (exit 2 before this).
    assert name is not None, f"spec.task.type {task_type} has no recipe"
    return importlib.import_module(f"{__name__}.{name}")


def predictor_for(task_type: str) -> Predictor:
    """The ``predict`` function of the task's recipe (``finetune predict``)."""
    predict: Predictor = _recipe_module(task_type).predict
    return predict


def recipe_for(task_type: str) -> Callable[[TrainerConfig], dict[str, Any]]:
    """The ``run`` function of the task's recipe (imported on demand: recipes import torch)."""
    run: Callable[[TrainerConfig], dict[str, Any]] = _recipe_module(task_type).run
    return run
