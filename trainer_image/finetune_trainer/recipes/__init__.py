"""One recipe per task: a module whose ``run(config) -> summary`` trains it (see :mod:`..harness`).

Which module trains which ``spec.task.type`` is the API's task table (``TaskRow.recipe`` in
:mod:`finetune_operator.api.tasks`), which also refuses at admission a task without one: every job
that reaches the trainer finds its recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from finetune_operator.api.tasks import task_row
from finetune_operator.api.trainer_config import TrainerConfig


def recipe_for(task_type: str) -> Callable[[TrainerConfig], dict[str, Any]]:
    """The ``run`` function of the task's recipe (imported on demand: recipes import torch)."""
    name = task_row(task_type).recipe
    # Unreachable otherwise: the spec's rules refuse a task without a recipe, also when the trainer
    # config is loaded (exit 2 before this).
    assert name is not None, f"spec.task.type {task_type} has no recipe"
    module = importlib.import_module(f"{__name__}.{name}")
    run: Callable[[TrainerConfig], dict[str, Any]] = module.run
    return run
