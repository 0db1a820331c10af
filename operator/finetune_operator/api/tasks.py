"""The task table: what each ``spec.task.type`` reads, trains, measures, and whether it runs today.

One row per task. The API's task rules are generated from it (in :mod:`.v1alpha1`: data format,
methods, packing, evaluation and early-stopping metrics, and the refusal of a task whose recipe does
not exist yet), both as CEL for the API server and in Python for ``finetune validate``; the trainer
dispatches on :attr:`TaskRow.recipe`.

Use :func:`task_row` for one task and :data:`IMPLEMENTED_TASKS` for the tasks this release trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

TaskType = Literal["sft", "pretrain", "classification", "qa", "reward", "dpo", "rl", "distill"]
DataFormat = Literal["promptCompletion", "chat", "text", "classification", "qa", "preference"]
MethodType = Literal["full", "lora", "qlora", "prefix", "prompt", "ia3", "adalora"]
#: Metrics an evaluation can report (``spec.training.evaluation.metrics``).
EvalMetric = Literal["loss", "perplexity", "accuracy", "f1", "exactMatch", "agreement", "bleu", "rouge"]
#: Metrics early stopping can watch (``spec.training.earlyStopping.metric``): the evaluation metrics,
#: with ``loss`` spelt ``evalLoss``.
EarlyStoppingMetric = Literal["evalLoss", "perplexity", "accuracy", "f1", "exactMatch", "agreement", "bleu", "rouge"]
#: The metrics where higher is better (the others are losses: lower is better).
HIGHER_IS_BETTER: frozenset[EarlyStoppingMetric] = frozenset(
    {"accuracy", "f1", "exactMatch", "agreement", "bleu", "rouge"}
)
#: Metrics of generated text (the model completes each eval prompt; the completions are scored against
#: the records' own): reported only when spec.training.evaluation.metrics names them (generating is
#: costly), for the formats with a prompt (:data:`PROMPT_FORMATS`).
GENERATION_METRICS: tuple[EvalMetric, ...] = ("bleu", "rouge")
#: The formats whose records have a prompt to generate after and a reference to compare with.
PROMPT_FORMATS: tuple[DataFormat, ...] = ("promptCompletion", "chat")
#: The model head a task trains: ``causal-lm`` (next-token prediction), ``sequence-classification``
#: (``task.classification.numLabels`` outputs), ``question-answering`` (answer-span start and end
#: logits), ``reward`` (a sequence-classification head with one output, the scalar reward).
Head = Literal["causal-lm", "sequence-classification", "question-answering", "reward"]

ALL_METHODS: tuple[MethodType, ...] = get_args(MethodType)
#: Methods that train prompt-side parameters only; they need a causal-LM task.
PROMPT_METHODS: tuple[MethodType, ...] = ("prefix", "prompt")
_NO_PROMPT_METHODS: tuple[MethodType, ...] = tuple(m for m in ALL_METHODS if m not in PROMPT_METHODS)


@dataclass(frozen=True)
class TaskRow:
    """What one task type is."""

    type: TaskType
    #: ``spec.data.format`` values the task reads.
    formats: tuple[DataFormat, ...]
    head: Head
    #: ``spec.method.type`` values the task can train with.
    methods: tuple[MethodType, ...]
    #: Whether ``spec.data.packing`` applies.
    packing: bool
    #: What its evaluation reports (``spec.training.evaluation.metrics`` may name only these; unset,
    #: the evaluation reports all of them but the :data:`GENERATION_METRICS`, :attr:`default_metrics`).
    metrics: tuple[EvalMetric, ...]
    #: The trainer's recipe (a module of ``finetune_trainer.recipes``); None: not written yet, and
    #: the task is refused at admission.
    recipe: str | None = None

    @property
    def implemented(self) -> bool:
        return self.recipe is not None

    @property
    def default_metrics(self) -> tuple[EvalMetric, ...]:
        """What an evaluation reports when ``spec.training.evaluation.metrics`` is unset: :attr:`metrics`
        but the generation metrics (asked for by name only)."""
        return tuple(m for m in self.metrics if m not in GENERATION_METRICS)

    @property
    def early_stopping_metrics(self) -> tuple[EarlyStoppingMetric, ...]:
        """The metrics early stopping can watch: :attr:`metrics`, ``loss`` spelt ``evalLoss``."""
        return tuple(early_stopping_name(m) for m in self.metrics)


TASKS: tuple[TaskRow, ...] = (
    TaskRow(
        "sft",
        formats=("promptCompletion", "chat", "text"),
        head="causal-lm",
        methods=ALL_METHODS,
        packing=True,
        metrics=("loss", "perplexity", "bleu", "rouge"),
        recipe="causal_lm",
    ),
    TaskRow(
        "pretrain",
        formats=("text",),
        head="causal-lm",
        methods=ALL_METHODS,
        packing=True,
        metrics=("loss", "perplexity"),
        recipe="causal_lm",
    ),
    TaskRow(
        "classification",
        formats=("classification",),
        head="sequence-classification",
        methods=_NO_PROMPT_METHODS,
        packing=False,
        metrics=("loss", "accuracy", "f1"),
        recipe="classification",
    ),
    TaskRow(
        "qa",
        formats=("qa",),
        head="question-answering",
        methods=_NO_PROMPT_METHODS,
        packing=False,
        metrics=("loss", "exactMatch", "f1"),
        recipe="qa",
    ),
    TaskRow(
        "reward",
        formats=("preference",),
        head="reward",
        methods=_NO_PROMPT_METHODS,
        packing=False,
        metrics=("loss", "accuracy"),
        recipe="reward",
    ),
    TaskRow(
        "dpo",
        formats=("preference",),
        head="causal-lm",
        methods=_NO_PROMPT_METHODS,
        packing=False,
        metrics=("loss", "accuracy"),
        recipe="dpo",
    ),
    TaskRow(
        "rl",
        formats=("promptCompletion", "chat"),
        head="causal-lm",
        methods=_NO_PROMPT_METHODS,
        packing=False,
        metrics=("loss",),
        recipe="rl",
    ),
    TaskRow(
        "distill",
        formats=("promptCompletion", "chat", "text"),
        head="causal-lm",
        methods=_NO_PROMPT_METHODS,
        packing=True,
        # agreement: the fraction of trained positions where the student's top token is the teacher's.
        metrics=("loss", "perplexity", "agreement"),
        recipe="distill",
    ),
)

_BY_TYPE: dict[str, TaskRow] = {row.type: row for row in TASKS}

#: The task types this release trains (those with a recipe), in table order.
IMPLEMENTED_TASKS: tuple[TaskType, ...] = tuple(row.type for row in TASKS if row.implemented)


def task_row(task_type: str) -> TaskRow:
    """The row of ``task_type`` (a ``spec.task.type`` value); KeyError for an unknown type."""
    return _BY_TYPE[task_type]


def early_stopping_name(metric: EvalMetric) -> EarlyStoppingMetric:
    """The ``earlyStopping.metric`` name of an evaluation metric (``loss`` is ``evalLoss``)."""
    return "evalLoss" if metric == "loss" else metric


def eval_metric_name(metric: EarlyStoppingMetric) -> EvalMetric:
    """The evaluation metric an ``earlyStopping.metric`` watches (``evalLoss`` is ``loss``)."""
    return "loss" if metric == "evalLoss" else metric
