"""FineTuneSweep, API version ``finetune.io/v1alpha1``: a hyperparameter search over FineTuneJobs.

A sweep holds a FineTuneJob spec (``spec.template``), the parameters to search (``spec.searchSpace``:
spec paths such as ``training.learningRate``, with their ranges or choices), the metric to optimize
(``spec.objective``, one the template's task reports), and the budget (``maxTrials``, ``parallelism``).
Each trial is a FineTuneJob: the template with one set of parameter values substituted.

Cross-field rules are :class:`~.base.Rule` objects (CEL for the API server, Python for ``finetune
validate``), as in :mod:`.v1alpha1`. What CEL cannot check — that a search path exists in the
FineTuneJob spec, and that the template stays valid with each range end and each choice substituted —
is :meth:`FineTuneSweepSpec.problems`: ``finetune validate`` reports it by field like any other error,
and the operator sets the sweep's ``Invalid`` condition naming the field.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from .base import Rule, SpecModel, unwrap_annotation
from .tasks import GENERATION_METRICS, HIGHER_IS_BETTER, TASKS, EvalMetric, TaskRow, early_stopping_name
from .v1alpha1 import MAX_NAME_LENGTH, Condition, FineTuneJobSpec, ObjectMeta

KIND = "FineTuneSweep"
PLURAL = "finetunesweeps"
SINGULAR = "finetunesweep"
SHORT_NAMES = ["fts"]
CATEGORIES = ["finetune"]
#: The most trials a sweep may run; trial numbers are 0 .. MAX_TRIALS - 1.
MAX_TRIALS = 1000
#: A trial is the FineTuneJob ``<sweep>-<number>``: the sweep's name leaves room for ``-999``.
MAX_SWEEP_NAME_LENGTH = MAX_NAME_LENGTH - len(f"-{MAX_TRIALS - 1}")

#: Labels and annotations of a trial FineTuneJob.
SWEEP_LABEL = "finetune.io/sweep"
TRIAL_LABEL = "finetune.io/sweep-trial"
PARAMS_ANNOTATION = "finetune.io/sweep-params"
PRUNED_ANNOTATION = "finetune.io/sweep-pruned"

CONDITION_INVALID = "Invalid"
REASON_INVALID_SPEC = "InvalidSpec"

#: A categorical choice or a parameter value: a string, number or boolean (the structural schema has
#: no union type; the API server keeps any value, and the model checks it).
Scalar = Annotated[
    str | bool | int | float,
    WithJsonSchema(
        {"x-kubernetes-preserve-unknown-fields": True, "description": "A string, number or boolean."},
        mode="validation",
    ),
]

#: The JSON key of each objective metric in the trainer's metrics.jsonl and summary.json records.
METRIC_KEYS: dict[EvalMetric, str] = {
    "loss": "eval_loss",
    "perplexity": "eval_perplexity",
    "accuracy": "eval_accuracy",
    "f1": "eval_f1",
    "exactMatch": "eval_exact_match",
    "agreement": "eval_agreement",
    "bleu": "eval_bleu",
    "rouge": "eval_rougeL",
}


def _cel_list(values: typing.Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class SearchParam(SpecModel):
    """One parameter of the search: a field of the FineTuneJob spec and the values it may take."""

    path: str = Field(
        min_length=1,
        max_length=253,
        description=(
            "The FineTuneJob spec field the parameter sets, relative to spec.template: camelCase names joined "
            "by '.', e.g. training.learningRate or method.lora.r."
        ),
    )
    type: Literal["float", "int", "categorical"] = Field(
        description="float: a number in [low, high]; int: an integer in [low, high]; categorical: one of choices."
    )
    low: float | None = Field(default=None, description="Lowest value (float and int).")
    high: float | None = Field(default=None, description="Highest value (float and int), at least low.")
    log: bool = Field(default=False, description="Sample on a log scale (float and int; low must be above 0).")
    step: float | None = Field(
        default=None, gt=0, description="Spacing of the values from low (float and int; int default 1). Not with log."
    )
    choices: list[Scalar] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="The values to choose from (categorical): strings, numbers or booleans.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.type == 'categorical' || (has(self.low) && has(self.high) && self.low <= self.high)",
            message="spec.searchSpace low and high are required for type float and int, with low <= high",
            check=lambda p: p.type == "categorical" or (p.low is not None and p.high is not None and p.low <= p.high),
            field=".high",
        ),
        # `choices` holds values of any type, which the API server's CEL cannot see into (nor test with
        # has()): whether it is given, and only for categorical, is checked by FineTuneSweepSpec.problems.
        Rule(
            cel="self.type != 'categorical' || (!has(self.low) && !has(self.high) && !has(self.step) && !self.log)",
            message="spec.searchSpace type categorical takes choices only (not low, high, step or log)",
            check=lambda p: (
                p.type != "categorical" or (p.low is None and p.high is None and p.step is None and not p.log)
            ),
            field=".choices",
        ),
        Rule(
            cel="!self.log || (!has(self.step) && has(self.low) && self.low > 0.0)",
            message="spec.searchSpace log needs low above 0 and no step",
            check=lambda p: not p.log or (p.step is None and p.low is not None and p.low > 0),
            field=".log",
        ),
        Rule(
            cel="self.type != 'int' || ((!has(self.low) || self.low == double(int(self.low))) "
            "&& (!has(self.high) || self.high == double(int(self.high))) "
            "&& (!has(self.step) || self.step == double(int(self.step))))",
            message="spec.searchSpace type int needs whole numbers for low, high and step",
            check=lambda p: p.type != "int" or all(v is None or float(v).is_integer() for v in (p.low, p.high, p.step)),
            field=".low",
        ),
    )

    def extremes(self) -> list[Any]:
        """The values that bound what a trial may get: low and high, or every choice."""
        if self.type == "categorical":
            return list(self.choices or ())
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        """Every value of the parameter for the grid sampler; None when it has no finite grid."""
        if self.type == "categorical":
            return list(self.choices or ())
        assert self.low is not None and self.high is not None
        step = self.step if self.step is not None else (1.0 if self.type == "int" else None)
        if step is None:
            return None
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else values


class ObjectiveSpec(SpecModel):
    """The metric each trial is scored by: the template's final evaluation of it."""

    metric: EvalMetric = Field(
        description=(
            "An evaluation metric the template's task reports (TaskRow.metrics): loss, perplexity, accuracy, f1, "
            "exactMatch, agreement, bleu or rouge (rougeL). Pruning watches it at every evaluation."
        )
    )
    direction: Literal["minimize", "maximize"] = Field(description="Whether lower or higher values are better.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="(self.direction == 'maximize') == (self.metric in [" + _cel_list(sorted(HIGHER_IS_BETTER)) + "])",
            message=(
                "spec.objective.direction must be maximize for accuracy, agreement, bleu, exactMatch, f1 and "
                "rouge, and minimize for loss and perplexity"
            ),
            check=lambda o: (o.direction == "maximize") == (early_stopping_name(o.metric) in HIGHER_IS_BETTER),
            field=".direction",
        ),
    )


class SamplerSpec(SpecModel):
    """How the next trial's parameters are chosen (Optuna's samplers)."""

    type: Literal["tpe", "random", "grid"] = Field(
        default="tpe",
        description=(
            "tpe: Tree-structured Parzen Estimator (random for the first startupTrials, then guided by the finished "
            "trials); random: independent uniform draws; grid: every combination of the values (categorical "
            "choices; low to high by step), in a seeded random order."
        ),
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=4294967295,
        description="Seed: the same seed and the same finished trials give the same next parameters.",
    )
    startup_trials: int | None = Field(
        default=None, ge=1, le=MAX_TRIALS, description="tpe only: random trials before the model guides (default 10)."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.type == 'tpe' || !has(self.startupTrials)",
            message="spec.sampler.startupTrials is for spec.sampler.type tpe",
            check=lambda s: s.type == "tpe" or s.startup_trials is None,
            field=".startupTrials",
        ),
    )


class PruningSpec(SpecModel):
    """Stop unpromising trials early, at their intermediate evaluations (of the objective metric)."""

    type: Literal["median", "successiveHalving"] = Field(
        description=(
            "median: stop a trial whose value at an evaluation step is worse than the median of the other trials' "
            "at that step; successiveHalving: asynchronous successive halving (keep the best 1/reductionFactor "
            "at each rung)."
        )
    )
    startup_trials: int = Field(
        default=5, ge=0, le=MAX_TRIALS, description="median only: trials that finish before any is pruned."
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="median only: optimizer steps of a trial before it may be pruned."
    )
    min_resource: int | None = Field(
        default=None, ge=1, description="successiveHalving only: the first rung's step (default: estimated by Optuna)."
    )
    reduction_factor: int = Field(
        default=4, ge=2, le=100, description="successiveHalving only: 1/reductionFactor of the trials go on at a rung."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.type == 'successiveHalving' || !has(self.minResource)",
            message="spec.pruning.minResource is for spec.pruning.type successiveHalving",
            check=lambda p: p.type == "successiveHalving" or p.min_resource is None,
            field=".minResource",
        ),
    )


def _task_objective_rule(row: TaskRow) -> Rule:
    return Rule(
        cel=f"self.template.task.type != '{row.type}' || self.objective.metric in [{_cel_list(row.metrics)}]",
        message=(
            f"spec.objective.metric must be a metric spec.template.task.type {row.type} reports: "
            + ", ".join(row.metrics)
        ),
        check=lambda s: s.template.task.type != row.type or s.objective.metric in row.metrics,
        field=".objective.metric",
    )


def _objective_rules() -> tuple[Rule, ...]:
    rules = [_task_objective_rule(row) for row in TASKS]
    generation = _cel_list(GENERATION_METRICS)
    rules.append(
        Rule(
            cel="!has(self.template.training.evaluation.metrics) ? !(self.objective.metric in ["
            f"{generation}]) : self.objective.metric in self.template.training.evaluation.metrics",
            message=(
                "spec.objective.metric must be one the template's evaluations report: listed in "
                "spec.template.training.evaluation.metrics when that is set (bleu and rouge only then)"
            ),
            check=lambda s: s.objective.metric in s.template.eval_metrics(),
            field=".objective.metric",
        )
    )
    return tuple(rules)


class FineTuneSweepSpec(SpecModel):
    """Desired state of a FineTuneSweep: the trial template, what to search, what to optimize, the budget."""

    template: FineTuneJobSpec = Field(
        description="The spec of every trial FineTuneJob, before the trial's parameters are substituted.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "spec.template cannot change after the sweep is created"}
            ]
        },
    )
    search_space: list[SearchParam] = Field(
        min_length=1,
        max_length=32,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["path"],
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "spec.searchSpace cannot change after the sweep is created"}
            ],
        },
        description="The parameters to search, one per spec path.",
    )
    objective: ObjectiveSpec = Field(
        description="The metric to optimize.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "spec.objective cannot change after the sweep is created"}
            ]
        },
    )
    max_trials: int = Field(ge=1, le=MAX_TRIALS, description="Trials to run in all (pruned and failed ones count).")
    parallelism: int = Field(default=1, ge=1, le=100, description="Most trials running at once.")
    sampler: SamplerSpec = Field(
        default_factory=SamplerSpec,
        description="How parameters are chosen.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "spec.sampler cannot change after the sweep is created"}
            ]
        },
    )
    pruning: PruningSpec | None = Field(default=None, description="Stop unpromising trials early (default: never).")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.template.data.eval) || self.template.data.evalSplit > 0.0",
            message="spec.objective is measured on eval data: spec.template.data needs eval or evalSplit",
            check=lambda s: s.template.data.eval is not None or s.template.data.eval_split > 0,
            field=".template.data.eval",
        ),
        Rule(
            cel="!has(self.pruning) || has(self.template.training.evaluation.everySteps)",
            message="spec.pruning needs intermediate evaluations: spec.template.training.evaluation.everySteps",
            check=lambda s: s.pruning is None or s.template.training.evaluation.every_steps is not None,
            field=".pruning",
        ),
        Rule(
            cel="self.sampler.type != 'grid' || self.searchSpace.all(p, p.type != 'float' || has(p.step))",
            message="spec.sampler.type grid needs a step for every float parameter of spec.searchSpace",
            check=lambda s: (
                s.sampler.type != "grid" or all(p.type != "float" or p.step is not None for p in s.search_space)
            ),
            field=".sampler.type",
        ),
        *_objective_rules(),
    )

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What CEL cannot check, each as (location under spec, message): every search path names a
        scalar field of the FineTuneJob spec of the parameter's type, no path twice, the template valid
        with each range end and each choice substituted, a grid no smaller than maxTrials."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        seen: set[str] = set()
        for i, param in enumerate(self.search_space):
            where: tuple[str | int, ...] = ("searchSpace", i)
            if param.path in seen:
                found.append(((*where, "path"), f"{param.path} is searched twice"))
                continue
            seen.add(param.path)
            if (param.type == "categorical") != (param.choices is not None):
                message = (
                    "spec.searchSpace type categorical needs choices"
                    if param.choices is None
                    else "spec.searchSpace choices are for type categorical (float and int take low and high)"
                )
                found.append(((*where, "choices"), message))
                continue
            problem = _path_problem(param)
            if problem:
                found.append(((*where, "path"), problem))
                continue
            for value in param.extremes():
                error = template_error(self.template, {param.path: value})
                if error:
                    key = (
                        "choices"
                        if param.type == "categorical"
                        else ("low" if value == param.extremes()[0] else "high")
                    )
                    found.append(((*where, key), f"{param.path} {value!r} makes the template invalid: {error}"))
                    break
        if self.sampler.type == "grid" and not found:
            size = math.prod(len(p.grid() or ()) for p in self.search_space)
            if size < self.max_trials:
                found.append((("maxTrials",), f"the grid has {size} combinations: spec.maxTrials must not exceed it"))
        return found


def _leaf_types(tp: Any) -> set[Any]:
    """The scalar types a field annotation accepts (Literal values count by their type)."""
    tp = unwrap_annotation(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {type(v) for v in typing.get_args(tp)}
    if origin in (typing.Union, types.UnionType):
        out: set[Any] = set()
        for arg in typing.get_args(tp):
            if arg is not type(None):
                out |= _leaf_types(arg)
        return out
    return {tp}


def field_at(path: str) -> tuple[Any, str | None]:
    """The annotation of the FineTuneJobSpec field at a dotted camelCase ``path``, or (None, why not)."""
    model: type[BaseModel] = FineTuneJobSpec
    annotation: Any = None
    walked: list[str] = []
    for part in path.split("."):
        by_alias = {(f.alias or n): f for n, f in model.model_fields.items()}
        if part not in by_alias:
            where = "spec" + "".join(f".{w}" for w in walked)
            close = difflib.get_close_matches(part, list(by_alias), n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}?" if close else "FineTuneJob spec fields are camelCase"
            return None, f"{path}: {where} has no field {part!r} ({hint})"
        annotation = by_alias[part].annotation
        walked.append(part)
        inner = unwrap_annotation(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
            annotation = inner
        elif part != path.split(".")[-1]:
            return None, f"{path}: spec.{'.'.join(walked)} is not an object with fields"
    return annotation, None


def _path_problem(param: SearchParam) -> str | None:
    annotation, why = field_at(param.path)
    if why:
        return why
    inner = unwrap_annotation(annotation)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return f"{param.path} is an object: search one of its fields"
    kinds = _leaf_types(annotation)
    if not kinds <= {str, int, float, bool}:
        return f"{param.path} is not a number, string or boolean field"
    if param.type == "float" and float not in kinds:
        return f"{param.path} takes {_kinds(kinds)}, not a float parameter"
    if param.type == "int" and not kinds & {int, float}:
        return f"{param.path} takes {_kinds(kinds)}, not an int parameter"
    return None


def _kinds(kinds: set[Any]) -> str:
    names = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
    return " or ".join(sorted(names.get(k, str(k)) for k in kinds))


def substitute(template: FineTuneJobSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The template's manifest form with each parameter set at its path (objects created on the way)."""
    spec = template.to_manifest()
    for path, value in params.items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return spec


def trial_spec(template: FineTuneJobSpec, params: dict[str, Any]) -> FineTuneJobSpec:
    """A trial's FineTuneJob spec: the template with ``params`` substituted (ValidationError if invalid)."""
    return FineTuneJobSpec.parse_manifest(substitute(template, params))


def template_error(template: FineTuneJobSpec, params: dict[str, Any]) -> str | None:
    """Why the template is invalid with ``params`` substituted (the first problem), or None."""
    try:
        trial_spec(template, params)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = (err.get("ctx") or {}).get("field") or ""
        loc = "spec." + ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "int", "str")))
        where = (loc + str(field)) if field else loc
        return f"{where.rstrip('.')}: {err['msg']}"
    return None


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------

TrialState = Literal["Running", "Complete", "Pruned", "Failed"]
SweepPhase = Literal["Running", "Succeeded", "Failed"]


class IntermediateValue(SpecModel):
    """The objective at one evaluation of a running trial."""

    step: int = Field(ge=0, description="Optimizer step of the evaluation.")
    value: float = Field(description="The objective metric's value.")


class TrialStatus(SpecModel):
    """One trial of the sweep."""

    number: int = Field(ge=0, lt=MAX_TRIALS, description="Trial number, from 0.")
    name: str = Field(max_length=MAX_NAME_LENGTH, description="The trial's FineTuneJob.")
    state: TrialState = Field(description="Running, Complete, Pruned (stopped early) or Failed.")
    params: dict[str, Scalar] = Field(default_factory=dict, description="The parameter values, by spec path.")
    value: float | None = Field(default=None, description="The objective's final value (Complete trials).")
    intermediate: list[IntermediateValue] = Field(
        default_factory=list, max_length=1000, description="The objective at each evaluation seen."
    )


class FineTuneSweepStatus(SpecModel):
    """Observed state of a FineTuneSweep, derived by the operator from its trial FineTuneJobs."""

    phase: SweepPhase | None = Field(default=None, description="Running, Succeeded (maxTrials done) or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Conditions: Invalid (a problem with the spec, naming the field).",
    )
    trials: list[TrialStatus] = Field(default_factory=list, max_length=MAX_TRIALS, description="Every trial so far.")
    trials_done: int = Field(default=0, ge=0, description="Trials finished (complete, pruned or failed).")
    trials_running: int = Field(default=0, ge=0, description="Trials running now.")
    best_trial: str | None = Field(default=None, max_length=MAX_NAME_LENGTH, description="The best complete trial.")
    best_value: float | None = Field(default=None, description="Its objective value.")
    best_params: dict[str, Scalar] = Field(default_factory=dict, description="Its parameter values.")
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation this reflects.")


class FineTuneSweep(SpecModel):
    """A hyperparameter search: trial FineTuneJobs of one template, their parameters chosen by Optuna."""

    api_version: Literal["finetune.io/v1alpha1"] = Field(alias="apiVersion", description="API version.")
    kind: Literal["FineTuneSweep"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneSweepSpec = Field(description="Desired state.")
    status: FineTuneSweepStatus | None = Field(default=None, description="Observed state.")


#: CEL rules on metadata.name: trial names add ``-<number>``.
NAME_VALIDATIONS: list[dict[str, str]] = [
    {
        "rule": f"size(self) <= {MAX_SWEEP_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_SWEEP_NAME_LENGTH} characters (trial names add -NUMBER)",
    },
    {
        "rule": r"self.matches(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be a DNS label starting with a letter (it names FineTuneJobs)",
    },
]


def name_problem(name: str) -> str | None:
    """The Python form of :data:`NAME_VALIDATIONS` beyond ObjectMeta's own (the length)."""
    if len(name) > MAX_SWEEP_NAME_LENGTH:
        return NAME_VALIDATIONS[0]["message"]
    return None


def grid_values(spec: FineTuneSweepSpec) -> dict[str, list[Any]]:
    """The grid sampler's search space: every value of each parameter."""
    return {p.path: p.grid() or [] for p in spec.search_space}
