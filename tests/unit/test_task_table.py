"""The task table (api/tasks.py) is complete and consistent, and the rules generated from it say what
it says: a manifest is refused, naming the field, exactly where the table does not allow it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import pytest
from finetune_operator.api import tasks, v1alpha1
from finetune_operator.api.tasks import IMPLEMENTED_TASKS, TASKS, task_row
from finetune_operator.api.validation import InvalidSpec, validate_object
from test_api_validation import mutate

REPO = Path(__file__).resolve().parents[2]

#: What each task needs besides its format, so that only the rule under test can refuse it.
TASK_PARAMS: dict[str, dict[str, Any]] = {
    "classification": {"classification": {"numLabels": 3}},
    "rl": {"rl": {"rewardModel": "org/reward-model"}},
    "distill": {"distill": {"teacher": "org/teacher"}},
}


def _manifest(task: str, **changes: Any) -> dict[str, Any]:
    row = task_row(task)
    base: dict[str, Any] = {
        "spec.task": {"type": task, **TASK_PARAMS.get(task, {})},
        "spec.data.format": row.formats[0],
    }
    return mutate({**base, **changes})


def _error_paths(manifest: dict[str, Any]) -> dict[str, str]:
    try:
        validate_object(manifest)
    except InvalidSpec as error:
        return {e.path: e.message for e in error.errors}
    return {}


def _field_type(model: type[Any], name: str) -> Any:
    return model.model_fields[name].annotation


def test_every_task_type_has_one_row_in_enum_order() -> None:
    assert tuple(row.type for row in TASKS) == get_args(tasks.TaskType)
    assert _field_type(v1alpha1.TaskSpec, "type") == tasks.TaskType


def test_the_api_enums_are_the_tables() -> None:
    assert _field_type(v1alpha1.DataSpec, "format") == tasks.DataFormat
    assert _field_type(v1alpha1.MethodSpec, "type") == tasks.MethodType
    assert _field_type(v1alpha1.EarlyStoppingSpec, "metric") == tasks.EarlyStoppingMetric
    assert _field_type(v1alpha1.EvaluationSpec, "metrics") == list[tasks.EvalMetric] | None
    assert [tasks.early_stopping_name(m) for m in get_args(tasks.EvalMetric)] == list(
        get_args(tasks.EarlyStoppingMetric)
    )
    for metric in get_args(tasks.EarlyStoppingMetric):
        assert tasks.early_stopping_name(tasks.eval_metric_name(metric)) == metric


def test_every_format_method_and_metric_is_used_by_some_task() -> None:
    assert {f for row in TASKS for f in row.formats} == set(get_args(tasks.DataFormat))
    assert {m for row in TASKS for m in row.methods} == set(get_args(tasks.MethodType))
    assert {m for row in TASKS for m in row.metrics} == set(get_args(tasks.EvalMetric))


def test_rows_are_consistent() -> None:
    for row in TASKS:
        assert row.formats and row.methods and row.metrics, row
        assert len(set(row.formats)) == len(row.formats) and len(set(row.metrics)) == len(row.metrics), row
        # The default early-stopping metric (evalLoss) is valid for every task.
        assert "loss" in row.metrics, row
        # Prompt-side methods and packing need a causal-LM head; perplexity is a causal-LM metric.
        if row.head != "causal-lm":
            assert not set(tasks.PROMPT_METHODS) & set(row.methods), row
            assert not row.packing and "perplexity" not in row.metrics, row
        assert row.head in get_args(tasks.Head), row


def test_implemented_tasks_are_those_with_a_recipe_in_the_trainer() -> None:
    assert IMPLEMENTED_TASKS == ("sft", "pretrain", "classification", "qa", "reward", "dpo", "rl", "distill")
    for row in TASKS:
        assert row.implemented is (row.recipe is not None)
        if row.recipe is not None:
            assert re.fullmatch(r"[a-z_]+", row.recipe), row
            assert (REPO / "trainer_image" / "finetune_trainer" / "recipes" / f"{row.recipe}.py").is_file(), row
    with pytest.raises(KeyError):
        task_row("summarize")


def test_generated_rule_messages_name_their_field() -> None:
    rules = v1alpha1.TASK_TABLE_RULES + v1alpha1.TASK_SUPPORT_RULES
    assert len(rules) >= 10
    for rule in rules:
        assert rule.field, rule
        assert rule.message.startswith("spec." + rule.field.lstrip(".")) or f"spec{rule.field}" in rule.message, rule
        assert set(rule.to_crd()) == {"rule", "message", "fieldPath"}
        assert rule in v1alpha1.FineTuneJobSpec.rules


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_a_task_is_accepted_if_and_only_if_it_has_a_recipe(task: str) -> None:
    errors = _error_paths(_manifest(task))
    if task_row(task).implemented:
        assert not errors, errors
    else:
        assert set(errors) == {"spec.task.type"}, errors
        trained = ", ".join(IMPLEMENTED_TASKS[:-1]) + " and " + IMPLEMENTED_TASKS[-1]
        assert f"spec.task.type {task} is not supported yet: this release trains {trained}" in errors["spec.task.type"]


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_formats_follow_the_table(task: str) -> None:
    row = task_row(task)
    for fmt in get_args(tasks.DataFormat):
        errors = _error_paths(_manifest(task, **{"spec.data.format": fmt}))
        assert ("spec.data.format" in errors) is (fmt not in row.formats), (task, fmt, errors)


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_methods_follow_the_table(task: str) -> None:
    row = task_row(task)
    for method in get_args(tasks.MethodType):
        errors = _error_paths(_manifest(task, **{"spec.method.type": method}))
        assert ("spec.method.type" in errors) is (method not in row.methods), (task, method, errors)


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_packing_follows_the_table(task: str) -> None:
    errors = _error_paths(_manifest(task, **{"spec.data.packing": True}))
    assert ("spec.data.packing" in errors) is (not task_row(task).packing), errors


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_general_eval_needs_a_causal_lm_head(task: str) -> None:
    """Perplexity on general text goes through the LM head: a task with another head refuses it."""
    errors = _error_paths(_manifest(task, **{"spec.training.forgetting": {"generalEval": {"uri": "general.jsonl"}}}))
    assert ("spec.training.forgetting.generalEval" in errors) is (task_row(task).head != "causal-lm"), errors


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_forgetting_controls_need_the_causal_lm_recipe(task: str) -> None:
    """EWC and replay train in the causal-LM recipe (sft, pretrain): any other task refuses them."""
    supported = task_row(task).recipe == "causal_lm"
    for control, value in (("ewc", {"strength": 10}), ("replay", {"source": {"uri": "general.jsonl"}})):
        errors = _error_paths(_manifest(task, **{"spec.training.forgetting": {control: value}}))
        assert (f"spec.training.forgetting.{control}" in errors) is not supported, (task, control, errors)


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_evaluation_metrics_follow_the_table(task: str) -> None:
    row = task_row(task)
    for metric in get_args(tasks.EvalMetric):
        evaluation = {"everySteps": 10, "metrics": [metric]}
        errors = _error_paths(_manifest(task, **{"spec.training.evaluation": evaluation, "spec.data.evalSplit": 0.1}))
        assert ("spec.training.evaluation.metrics" in errors) is (metric not in row.metrics), (task, metric, errors)


@pytest.mark.parametrize("task", [row.type for row in TASKS])
def test_early_stopping_metrics_follow_the_table(task: str) -> None:
    row = task_row(task)
    for metric in get_args(tasks.EarlyStoppingMetric):
        # A generation metric is computed only when listed (the evaluation.metrics rules are tested above).
        listed = {"metrics": [metric]} if metric in tasks.GENERATION_METRICS and metric in row.metrics else {}
        changes = {
            "spec.training.evaluation": {"everySteps": 10, **listed},
            "spec.training.earlyStopping": {"metric": metric},
            "spec.data.evalSplit": 0.1,
        }
        errors = _error_paths(_manifest(task, **changes))
        refused = "spec.training.earlyStopping.metric" in errors
        assert refused is (metric not in row.early_stopping_metrics), (task, metric, errors)


def test_eval_metrics_default_to_the_tasks() -> None:
    job = validate_object(mutate({}))
    assert job.spec.training.evaluation.metrics is None
    assert job.spec.eval_metrics() == ("loss", "perplexity")
    job = validate_object(mutate({"spec.training.evaluation": {"metrics": ["loss"]}}))
    assert job.spec.eval_metrics() == ("loss",)


def test_generated_cel_quotes_table_values_and_its_message_names_them() -> None:
    """What a generated CEL rule compares with are values of the API's enums, each named in its message
    (the Python side of the same rules is exercised by the tests above; the API server's, by the e2e
    parity test, which replays test_api_validation's rows)."""
    words = set(get_args(tasks.TaskType) + get_args(tasks.DataFormat) + get_args(tasks.MethodType))
    words |= set(get_args(tasks.EvalMetric) + get_args(tasks.EarlyStoppingMetric))
    for rule in v1alpha1.TASK_TABLE_RULES + v1alpha1.TASK_SUPPORT_RULES:
        quoted = set(re.findall(r"'([^']*)'", rule.cel))
        assert quoted <= words, (rule.cel, quoted - words)
        for value in quoted:
            assert value in rule.message, (value, rule.message)


@pytest.mark.parametrize(
    ("metric", "mode", "greater"),
    [
        ("evalLoss", None, False),
        ("perplexity", None, False),
        ("accuracy", None, True),
        ("f1", None, True),
        ("exactMatch", None, True),
        ("bleu", None, True),
        ("rouge", None, True),
        ("evalLoss", "max", True),
        ("f1", "min", False),
    ],
)
def test_early_stopping_mode_defaults_to_the_metrics_sense(metric: str, mode: str | None, greater: bool) -> None:
    """Unset, `mode` follows the metric (a loss is minimized, a score maximized), so that the best
    checkpoint kept and loaded at the end is the best one; set, it decides."""
    spec = v1alpha1.EarlyStoppingSpec.model_validate({"metric": metric, "mode": mode})
    assert spec.greater_is_better is greater
    assert (metric in tasks.HIGHER_IS_BETTER) is (metric in ("accuracy", "f1", "exactMatch", "bleu", "rouge"))
