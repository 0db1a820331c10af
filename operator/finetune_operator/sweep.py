"""The study logic of a FineTuneSweep: pure and level-triggered.

Given the sweep's spec and what its trials are now (:class:`Observation`: parameters, state, final
value, intermediate values), :func:`decide` rebuilds an Optuna in-memory study from scratch
(``optuna.create_study`` and ``study.add_trial`` of ``optuna.trial.create_trial``), and says what to do
(:class:`Decision`): the trials to start next, the running trials to prune, and the sweep's status.
Nothing is remembered between calls; the trials are the state. ``finetune sweep`` (on this machine)
and the operator (FineTuneJobs on a cluster) both drive it.

Determinism: trial N's parameters are asked of a sampler seeded with ``spec.sampler.seed + N`` (the grid
sampler: with the seed, whose shuffle of the grid is then fixed, trial N taking grid point N), given the
same trials. So the same seed and the same finished trials give the same next parameters, and a trial's
name is derived from the sweep's and its number (:func:`trial_name`): a driver stopped between deciding
and creating decides the same trial again, and creating it by name is idempotent.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from .api.sweep import (
    PARAMS_ANNOTATION,
    PRUNED_ANNOTATION,
    SWEEP_LABEL,
    TRIAL_LABEL,
    FineTuneSweep,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    IntermediateValue,
    SweepPhase,
    TrialState,
    TrialStatus,
    trial_spec,
)
from .api.tasks import EvalMetric
from .api.v1alpha1 import FineTuneJob, FineTuneJobSpec, Progress

optuna.logging.set_verbosity(logging.WARNING)

_TO_OPTUNA: dict[TrialState, OptunaState] = {
    "Running": OptunaState.RUNNING,
    "Complete": OptunaState.COMPLETE,
    "Pruned": OptunaState.PRUNED,
    "Failed": OptunaState.FAIL,
}


def trial_name(sweep: str, number: int) -> str:
    """The FineTuneJob of trial ``number`` of sweep ``sweep``."""
    return f"{sweep}-{number}"


@dataclass(frozen=True)
class Observation:
    """What one trial is now: its number, parameters (by spec path), state, objective."""

    number: int
    params: dict[str, Any]
    state: TrialState
    #: The objective's final value (Complete trials).
    value: float | None = None
    #: The objective at each evaluation so far, by optimizer step.
    intermediate: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NewTrial:
    """A trial to start: its number and name, parameters, and FineTuneJob spec."""

    number: int
    name: str
    params: dict[str, Any]
    spec: FineTuneJobSpec


@dataclass(frozen=True)
class Decision:
    """What to do now: trials to create, trials (by number) to stop as pruned, the sweep's status."""

    create: list[NewTrial]
    prune: list[int]
    status: FineTuneSweepStatus


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    """Optuna's distribution of each parameter of the search space, by spec path."""
    out: dict[str, BaseDistribution] = {}
    for p in spec.search_space:
        if p.type == "categorical":
            out[p.path] = CategoricalDistribution(list(p.choices or ()))
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            out[p.path] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            assert p.low is not None and p.high is not None
            out[p.path] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def sampler(spec: FineTuneSweepSpec, number: int) -> optuna.samplers.BaseSampler:
    """The sampler that chooses trial ``number``'s parameters."""
    s = spec.sampler
    if s.type == "grid":
        grid = {p.path: p.grid() or [] for p in spec.search_space}
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed + number)
    startup = s.startup_trials if s.startup_trials is not None else 10
    return optuna.samplers.TPESampler(seed=s.seed + number, n_startup_trials=startup)


def pruner(spec: FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    p = spec.pruning
    if p is None:
        return optuna.pruners.NopPruner()
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p.min_resource if p.min_resource is not None else "auto", reduction_factor=p.reduction_factor
    )


def _frozen(spec: FineTuneSweepSpec, dists: dict[str, BaseDistribution], obs: Observation) -> FrozenTrial:
    params = {k: v for k, v in obs.params.items() if k in dists}
    value = obs.value if obs.state == "Complete" else None
    return optuna.trial.create_trial(
        state=_TO_OPTUNA[obs.state],
        value=value,
        params=params,
        distributions={k: dists[k] for k in params},
        intermediate_values=dict(obs.intermediate),
    )


def study(
    spec: FineTuneSweepSpec,
    trials: Sequence[Observation],
    *,
    for_number: int | None = None,
    storage: Any = None,
    study_name: str | None = None,
) -> optuna.Study:
    """An Optuna study of ``trials`` (in number order; a missing number, e.g. a deleted trial, is a failed
    trial without parameters, so that study numbers stay trial numbers), its sampler the one of trial
    ``for_number`` (default: the next)."""
    by_number = {t.number: t for t in trials}
    count = max(by_number, default=-1) + 1
    result = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler(spec, count if for_number is None else for_number),
        pruner=pruner(spec),
        direction=spec.objective.direction,
    )
    dists = distributions(spec)
    for number in range(count):
        obs = by_number.get(number, Observation(number=number, params={}, state="Failed"))
        result.add_trial(_frozen(spec, dists, obs))
    return result


def ask(spec: FineTuneSweepSpec, trials: Sequence[Observation]) -> tuple[int, dict[str, Any]]:
    """The next trial's number and parameters, given the trials so far (running ones included)."""
    s = study(spec, trials)
    trial = s.ask(fixed_distributions=distributions(spec))
    return trial.number, dict(trial.params)


def should_prune(spec: FineTuneSweepSpec, trials: Sequence[Observation], number: int) -> bool:
    """Whether the pruner stops running trial ``number`` at its latest intermediate value."""
    if spec.pruning is None:
        return False
    s = study(spec, trials)
    frozen = s.get_trials(deepcopy=False)[number]
    if frozen.state != OptunaState.RUNNING or not frozen.intermediate_values:
        return False
    return bool(s.pruner.prune(s, frozen))


def _better(spec: FineTuneSweepSpec, a: float, b: float) -> bool:
    return a < b if spec.objective.direction == "minimize" else a > b


def status(name: str, spec: FineTuneSweepSpec, trials: Sequence[Observation]) -> FineTuneSweepStatus:
    """The sweep's status: the trials table, the best complete trial, the counts and the phase."""
    table = [
        TrialStatus(
            number=t.number,
            name=trial_name(name, t.number),
            state=t.state,
            params=dict(t.params),
            value=t.value if t.state == "Complete" else None,
            intermediate=[IntermediateValue(step=k, value=v) for k, v in sorted(t.intermediate.items())],
        )
        for t in sorted(trials, key=lambda t: t.number)
    ]
    best: TrialStatus | None = None
    for row in table:
        finite = row.state == "Complete" and row.value is not None and math.isfinite(row.value)
        if finite and (best is None or best.value is None or _better(spec, row.value or 0.0, best.value)):
            best = row
    done = sum(1 for t in table if t.state != "Running")
    running = len(table) - done
    phase: SweepPhase = "Running"
    if done >= spec.max_trials and running == 0:
        phase = "Succeeded" if best is not None else "Failed"
    return FineTuneSweepStatus(
        phase=phase,
        trials=table,
        trials_done=done,
        trials_running=running,
        best_trial=best.name if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
    )


def decide(name: str, spec: FineTuneSweepSpec, trials: Sequence[Observation]) -> Decision:
    """What to do now, from the spec and the trials as they are: prune the running trials the pruner
    stops, then start trials up to ``parallelism`` running and ``maxTrials`` in all, each asked with the
    ones before it counted as running."""
    current = sorted(trials, key=lambda t: t.number)
    prune = [t.number for t in current if t.state == "Running" and should_prune(spec, current, t.number)]
    current = [
        Observation(t.number, t.params, "Pruned", None, t.intermediate) if t.number in prune else t for t in current
    ]
    running = sum(1 for t in current if t.state == "Running")
    started = max((t.number for t in current), default=-1) + 1
    create: list[NewTrial] = []
    for _ in range(max(0, min(spec.parallelism - running, spec.max_trials - started))):
        number, params = ask(spec, current)
        create.append(NewTrial(number, trial_name(name, number), params, trial_spec(spec.template, params)))
        current.append(Observation(number, params, "Running"))
    return Decision(create=create, prune=prune, status=status(name, spec, current))


# --------------------------------------------------------------------------------------------------
# Trials as FineTuneJobs (the operator's side, still pure: data in, data out)
# --------------------------------------------------------------------------------------------------


def status_value(progress: Progress | None, metric: EvalMetric) -> float | None:
    """The objective as a trial's FineTuneJob status reports it (status.progress: the latest evaluation's,
    each metric the field of its trainer key, :data:`~.api.sweep.METRIC_KEYS`), or None when the status
    does not carry that metric (yet). Perplexity is the trainer's (distill's is of the student's
    cross-entropy, not of evalLoss); a status without it (a trainer that did not report it) falls back
    to exp(evalLoss), capped as the trainer caps it."""
    if progress is None:
        return None
    if metric == "perplexity" and progress.eval_perplexity is None:
        return math.exp(min(progress.eval_loss, 50.0)) if progress.eval_loss is not None else None
    values: dict[EvalMetric, float | None] = {
        "loss": progress.eval_loss,
        "perplexity": progress.eval_perplexity,
        "accuracy": progress.eval_accuracy,
        "f1": progress.eval_f1,
        "exactMatch": progress.eval_exact_match,
        "agreement": progress.eval_agreement,
        "bleu": progress.eval_bleu,
        "rouge": progress.eval_rougeL,
    }
    return values.get(metric)


def observe(job: FineTuneJob, metric: EvalMetric, previous: TrialStatus | None = None) -> Observation | None:
    """:func:`observe_trial` of a typed trial FineTuneJob."""
    status = job.status
    return observe_trial(
        job.metadata.labels,
        job.metadata.annotations,
        status.phase if status is not None else None,
        status.progress if status is not None else None,
        metric,
        previous,
    )


def observe_trial(
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    phase: str | None,
    progress: Progress | None,
    metric: EvalMetric,
    previous: TrialStatus | None = None,
) -> Observation | None:
    """A trial FineTuneJob (labelled with its sweep and number, its parameters in an annotation; its
    phase and status.progress) as the study logic takes it: Pruned once the sweep marked it so, Complete
    or Failed by its phase, else Running; its intermediate values those the sweep's status recorded
    (``previous``) and the status's latest evaluation. None for a job that is no trial."""
    number_text = labels.get(TRIAL_LABEL)
    if number_text is None or not number_text.isdigit() or PARAMS_ANNOTATION not in annotations:
        return None
    params = json.loads(annotations[PARAMS_ANNOTATION])
    intermediate = {i.step: i.value for i in previous.intermediate} if previous is not None else {}
    value = status_value(progress, metric)
    last = intermediate[max(intermediate)] if intermediate else None
    if value is not None and progress is not None and progress.step > 0 and value != last:
        # A new evaluation's value, first seen at this step (the status holds the latest one only).
        intermediate.setdefault(progress.step, value)
    number = int(number_text)
    if annotations.get(PRUNED_ANNOTATION) == "true":
        return Observation(number, params, "Pruned", None, intermediate)
    if phase == "Succeeded":
        state: TrialState = "Complete" if value is not None else "Failed"
        return Observation(number, params, state, value, intermediate)
    if phase == "Failed":
        return Observation(number, params, "Failed", None, intermediate)
    return Observation(number, params, "Running", None, intermediate)


def trial_job(sweep: FineTuneSweep, trial: NewTrial) -> dict[str, Any]:
    """The FineTuneJob manifest of a new trial: named SWEEP-N (created by name, so creating it twice
    is refused as AlreadyExists, never a duplicate), labelled, its parameters annotated, owned by the
    sweep (deleting the sweep deletes its trials)."""
    meta = sweep.metadata
    owner = {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "name": meta.name,
        "uid": meta.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    metadata: dict[str, Any] = {
        "name": trial.name,
        "labels": {SWEEP_LABEL: meta.name, TRIAL_LABEL: str(trial.number)},
        "annotations": {PARAMS_ANNOTATION: json.dumps(trial.params, sort_keys=True)},
        "ownerReferences": [owner] if meta.uid else [],
    }
    if meta.namespace:
        metadata["namespace"] = meta.namespace
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": metadata,
        "spec": trial.spec.to_manifest(),
    }
