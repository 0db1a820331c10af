"""The sweep's study logic (finetune_operator.sweep) on simulated trials: the budget, parallelism,
determinism (the same seed and trials give the same next parameters, rebuilt from scratch each time),
idempotent decisions, TPE against random, pruning and the grid."""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any, get_args

import pytest
from finetune_operator.api.sweep import METRIC_KEYS, PRUNED_ANNOTATION, FineTuneSweep, FineTuneSweepSpec
from finetune_operator.api.tasks import EvalMetric
from finetune_operator.api.v1alpha1 import FineTuneJob, Progress
from finetune_operator.api.validation import validate_object
from finetune_operator.sweep import (
    Observation,
    decide,
    observe,
    should_prune,
    status,
    status_value,
    study,
    trial_job,
)
from finetune_trainer.status import progress_body

TEMPLATE: dict[str, Any] = {
    "model": {"uri": "org/model"},
    "data": {"train": {"uri": "train.jsonl"}, "evalSplit": 0.1},
    "training": {"maxSteps": 100, "evaluation": {"everySteps": 25}},
}


def sweep(**overrides: Any) -> FineTuneSweepSpec:
    spec: dict[str, Any] = {
        "template": TEMPLATE,
        "searchSpace": [
            {"path": "training.learningRate", "type": "float", "low": 1e-6, "high": 1e-1, "log": True},
            {"path": "method.lora.r", "type": "categorical", "choices": [4, 8, 16]},
        ],
        "objective": {"metric": "loss", "direction": "minimize"},
        "maxTrials": 12,
        "parallelism": 3,
        "sampler": {"type": "tpe", "seed": 3, "startupTrials": 4},
    }
    spec.update(overrides)
    return FineTuneSweepSpec.parse_manifest(spec)


def loss(params: dict[str, Any]) -> float:
    """A made-up eval loss, best at learning rate 1e-3 and rank 16."""
    return (math.log10(params["training.learningRate"]) + 3) ** 2 + {4: 0.3, 8: 0.1, 16: 0.0}[params["method.lora.r"]]


def simulate(spec: FineTuneSweepSpec) -> tuple[list[Observation], int]:
    """Run the sweep to the end, the oldest running trial finishing after each decision; the trials and
    the most that ever ran at once."""
    trials: dict[int, Observation] = {}
    most = 0
    for _ in range(100):
        decision = decide("s", spec, list(trials.values()))
        for new in decision.create:
            assert new.name == f"s-{new.number}" and new.number not in trials
            assert new.spec.training.learning_rate == new.params["training.learningRate"]
            trials[new.number] = Observation(new.number, new.params, "Running")
        running = [t for t in trials.values() if t.state == "Running"]
        most = max(most, len(running))
        if not running:
            assert decision.status.phase == "Succeeded"
            break
        oldest = min(running, key=lambda t: t.number)
        trials[oldest.number] = Observation(oldest.number, oldest.params, "Complete", loss(oldest.params))
    return sorted(trials.values(), key=lambda t: t.number), most


def test_exactly_max_trials_within_parallelism_and_the_best_in_status() -> None:
    spec = sweep()
    trials, most = simulate(spec)
    assert [t.number for t in trials] == list(range(12))
    assert most == 3
    final = decide("s", spec, trials)
    assert final.create == [] and final.status.trials_done == 12 and final.status.trials_running == 0
    best = min(trials, key=lambda t: t.value or math.inf)
    assert (final.status.best_trial, final.status.best_value) == (f"s-{best.number}", best.value)
    assert final.status.best_params == best.params


def test_the_same_seed_gives_the_same_trials_and_another_seed_others() -> None:
    first, _ = simulate(sweep())
    again, _ = simulate(sweep())
    assert [t.params for t in first] == [t.params for t in again]
    other, _ = simulate(sweep(sampler={"type": "tpe", "seed": 4, "startupTrials": 4}))
    assert [t.params for t in other] != [t.params for t in first]


def test_a_decision_is_the_same_when_made_again() -> None:
    """A driver stopped after deciding and before creating decides the same trials (same names, same
    parameters) from the same trials: the study is rebuilt from them, nothing else."""
    spec = sweep()
    trials, _ = simulate(sweep(maxTrials=6))
    done = [t for t in trials if t.state == "Complete"][:5]
    a, b = decide("s", spec, done), decide("s", spec, done)
    assert [(n.name, n.params) for n in a.create] == [(n.name, n.params) for n in b.create]
    assert [n.number for n in a.create] == [5, 6, 7]


def test_tpe_finds_better_trials_than_random() -> None:
    tpe = [t.value or 0 for t in simulate(sweep(maxTrials=24, parallelism=1))[0]]
    rnd = [t.value or 0 for t in simulate(sweep(maxTrials=24, parallelism=1, sampler={"type": "random", "seed": 3}))[0]]
    # After the startup trials the model guides: its later trials are better than random's.
    assert statistics.median(tpe[8:]) < statistics.median(rnd[8:]), (tpe, rnd)
    assert min(tpe) < statistics.median(tpe)


def test_the_median_pruner_stops_a_trial_worse_than_the_median_at_its_step() -> None:
    spec = sweep(pruning={"type": "median", "startupTrials": 2})
    good = {"training.learningRate": 1e-3, "method.lora.r": 8}
    done = [Observation(i, good, "Complete", 1.0 + i / 10, {25: 3.0 + i / 10, 50: 2.0 + i / 10}) for i in range(3)]
    bad = Observation(3, good, "Running", None, {25: 5.0})
    fine = Observation(4, good, "Running", None, {25: 2.5})
    trials = [*done, bad, fine]
    assert should_prune(spec, trials, 3) and not should_prune(spec, trials, 4)
    decision = decide("s", spec, trials)
    assert decision.prune == [3]
    assert [t.state for t in decision.status.trials][3] == "Pruned"
    # The pruned trial's slot is free: parallelism 3, one trial left running, two started.
    assert [n.number for n in decision.create] == [5, 6]
    # Too few finished trials: nothing is pruned yet.
    assert not should_prune(spec, [done[0], bad], 1)


def test_the_grid_visits_every_point_once() -> None:
    grid = [
        {"path": "training.learningRate", "type": "float", "low": 0.001, "high": 0.003, "step": 0.001},
        {"path": "method.lora.r", "type": "categorical", "choices": [4, 8]},
    ]
    trials, _ = simulate(sweep(searchSpace=grid, sampler={"type": "grid", "seed": 1}, maxTrials=6, parallelism=2))
    points = {(round(t.params["training.learningRate"], 6), t.params["method.lora.r"]) for t in trials}
    assert len(points) == 6


def test_a_missing_trial_keeps_the_numbers() -> None:
    """A deleted trial's number is not reused: the study counts it failed."""
    spec = sweep()
    p = {"training.learningRate": 1e-3, "method.lora.r": 8}
    trials = [Observation(0, p, "Complete", 1.0), Observation(2, p, "Complete", 2.0)]
    s = study(spec, trials)
    assert [t.state.name for t in s.get_trials()] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [n.number for n in decide("s", spec, trials).create] == [3, 4, 5]


def test_trial_jobs_round_trip_through_observe() -> None:
    """A trial's FineTuneJob (as the operator would create it) is a valid job, owned by the sweep, and
    its status reads back as the trial: Running with the evaluations seen, then Complete with its value,
    or Pruned once marked so."""
    sweep_obj = FineTuneSweep.parse_manifest(
        {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": "s", "namespace": "ml", "uid": "u-1"},
            "spec": sweep().to_manifest(),
        }
    )
    (new, *_) = decide("s", sweep_obj.spec, []).create
    manifest = trial_job(sweep_obj, new)
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    job = validate_object(copy.deepcopy(manifest))
    assert job.metadata.name == "s-0" and job.spec.training.learning_rate == new.params["training.learningRate"]

    def at(phase: str, step: int, eval_loss: float) -> FineTuneJob:
        status = {"phase": phase, "progress": {"step": step, "evalLoss": eval_loss}}
        return FineTuneJob.parse_manifest({**manifest, "status": status})

    first = observe(at("Running", 26, 3.0), "loss")
    assert first is not None and (first.state, first.intermediate) == ("Running", {26: 3.0})
    row = status("s", sweep_obj.spec, [first]).trials[0]
    second = observe(at("Running", 51, 2.0), "loss", row)
    assert second is not None and second.intermediate == {26: 3.0, 51: 2.0}
    done = observe(at("Succeeded", 100, 1.5), "perplexity")
    assert done is not None and done.state == "Complete" and done.value == math.exp(1.5)
    marked = copy.deepcopy(manifest)
    marked["metadata"]["annotations"][PRUNED_ANNOTATION] = "true"
    pruned = observe(FineTuneJob.parse_manifest({**marked, "status": {"phase": "Running"}}), "loss")
    assert pruned is not None and pruned.state == "Pruned"
    assert observe(FineTuneJob.parse_manifest({**manifest, "metadata": {"name": "other"}}), "loss") is None


#: A value of each objective metric as the trainer logs it, none of them derivable from another: distill's
#: perplexity (of the student's cross-entropy) is not exp(eval_loss), and BLEU is on sacreBLEU's 0-100 scale.
TRAINER_VALUES: dict[str, float] = {
    "loss": 0.845,
    "perplexity": 14.0,
    "accuracy": 0.75,
    "f1": 0.625,
    "exactMatch": 0.5,
    "agreement": 0.64,
    "bleu": 37.5,
    "rouge": 0.42,
}


@pytest.mark.parametrize("metric", get_args(EvalMetric))
def test_every_objective_reaches_the_sweep_through_the_trial_status(metric: EvalMetric) -> None:
    """Each objective a sweep admits, logged by the trainer under its key (METRIC_KEYS, as the local sweep
    reads metrics.jsonl), passes the trainer's status sink and reporter into status.progress and is read
    back by the operator's sweep: a Succeeded trial is Complete with that value, not Failed for a
    missing objective (agreement, bleu and rouge once were)."""
    sweep_obj = FineTuneSweep.parse_manifest(
        {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": "s", "namespace": "ml", "uid": "u-1"},
            "spec": sweep().to_manifest(),
        }
    )
    (new, *_) = decide("s", sweep_obj.spec, []).create
    manifest = trial_job(sweep_obj, new)
    value = TRAINER_VALUES[metric]
    # The trainer's progress record of an evaluation (progress.ProgressReporter.on_log): its eval loss
    # beside the metric, a sft/distill-like loss whose exp is not the perplexity.
    record = {"time": 0.0, "step": 40, "epoch": 0.4, "total_steps": 100, "eval_loss": 0.845}
    record[METRIC_KEYS[metric]] = value
    # harness._status_sink: the record's keys that are status.progress fields, by their Python names.
    sunk = {k: v for k, v in record.items() if k in Progress.model_fields}
    assert METRIC_KEYS[metric] in sunk, f"{METRIC_KEYS[metric]} is no status.progress field"
    progress = progress_body(sunk)

    def at(phase: str) -> FineTuneJob:
        return FineTuneJob.parse_manifest({**manifest, "status": {"phase": phase, "progress": progress}})

    running = observe(at("Running"), metric)
    assert running is not None and running.intermediate == {40: value}, (progress, running)
    done = observe(at("Succeeded"), metric)
    assert done is not None and (done.state, done.value) == ("Complete", value), (progress, done)


def test_perplexity_without_the_trainers_falls_back_to_exp_eval_loss_capped() -> None:
    """A status from a trainer that reported no evalPerplexity: exp(evalLoss), capped at exp(50) as the
    trainer caps it (a diverged trial's huge loss must not overflow the operator's reconcile)."""
    assert status_value(Progress(step=10, eval_loss=1.5), "perplexity") == math.exp(1.5)
    assert status_value(Progress(step=10, eval_loss=1e6), "perplexity") == math.exp(50.0)
    assert status_value(Progress(step=10, eval_loss=1.5, eval_perplexity=14.0), "perplexity") == 14.0
    assert status_value(Progress(step=10), "bleu") is None
