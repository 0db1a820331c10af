"""kopf wiring of FineTuneSweeps: every trigger runs the same level-triggered :func:`reconcile_sweep`.

A sweep's state is its trial FineTuneJobs (``SWEEP-N``, labelled with the sweep and N, their parameters
in an annotation): a kopf index holds them, cut to what the study reads, so a reconcile costs no reads.
It rebuilds the Optuna study from them (:func:`finetune_operator.sweep.decide`: no database, nothing
kept between reconciles), marks and suspends the running trials the pruner stops, creates the next
trials by name, and writes the sweep's status. The one thing a trial's status cannot give back — the
objective at each earlier evaluation (a trial's status holds its latest) — is kept in the sweep's own
status and carried from one reconcile to the next.

No duplicate trial, however the operator stops: trial N's name and parameters follow from the sweep's
seed and the trials before it, creating it again is answered "already exists", and trials are
created before the status that counts them is written. An operator stopped between deciding and
creating decides the same trial again when it comes back.

Triggers: every watch event of a FineTuneSweep (reconciled at once), an event of one of its trials
(shortly after, so that a burst of them is one reconcile), and a pass over every sweep every
:data:`~finetune_operator.handlers.TIMER_INTERVAL` seconds. A failed reconcile is retried with
exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from . import metrics
from .api.sweep import (
    CONDITION_INVALID,
    PARAMS_ANNOTATION,
    PLURAL,
    PRUNED_ANNOTATION,
    REASON_INVALID_SPEC,
    SWEEP_LABEL,
    TRIAL_LABEL,
    FineTuneSweep,
    FineTuneSweepStatus,
    TrialState,
    trial_spec,
)
from .api.v1alpha1 import GROUP, VERSION, Condition
from .api.v1alpha1 import PLURAL as JOB_PLURAL
from .api.validation import InvalidSpec, validate_sweep_object
from .handlers import CHILD_EVENT_DELAY, MAX_CONCURRENT, MIN_DELAY, RETRY_CAP, RETRY_DELAY, TIMER_INTERVAL, slim
from .handlers import State as JobState
from .k8s_io import ApiError, Kube
from .reconcile import MAX_MESSAGE, read_progress, to_second
from .sweep import NewTrial, Observation, decide, observe_trial, trial_job, trial_name

log = logging.getLogger("finetune_operator")

Key = tuple[str, str]
STATES: tuple[TrialState, ...] = ("Running", "Complete", "Pruned", "Failed")
#: What marks and stops a pruned trial: the sweep's annotation (its state from now on) and
#: spec.runPolicy.suspend (the FineTuneJob's own way to stop its gang).
PRUNE_PATCH: dict[str, Any] = {
    "metadata": {"annotations": {PRUNED_ANNOTATION: "true"}},
    "spec": {"runPolicy": {"suspend": True}},
}


@dataclass
class SweepState:
    """Process-wide state of the sweeps' side (the FineTuneJobs' is :data:`handlers.State`)."""

    #: The latest body seen of each FineTuneSweep (watch event or our own status write).
    bodies: dict[Key, dict[str, Any]] = field(default_factory=dict)
    #: kopf's index of trial FineTuneJobs by (namespace, sweep).
    trials: Mapping[Key, Any] = field(default_factory=dict)
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    wakeups: dict[Key, tuple[asyncio.TimerHandle, float]] = field(default_factory=dict)
    failures: dict[Key, int] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    slots: asyncio.Semaphore | None = None


Sweeps = SweepState()


def _kube() -> Kube:
    kube = JobState.kube
    assert kube is not None, "operator not started"
    return kube


def observed_trial(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the study reads of a trial FineTuneJob (its spec is the template's, substituted: not kept)."""
    meta = body["metadata"]
    status = body.get("status") or {}
    annotations = meta.get("annotations") or {}
    return {
        "metadata": {
            "labels": dict(meta.get("labels") or {}),
            "annotations": {k: v for k, v in annotations.items() if k in (PARAMS_ANNOTATION, PRUNED_ANNOTATION)},
        },
        "status": {k: status[k] for k in ("phase", "progress") if k in status},
    }


def _previous(key: Key, raw: Mapping[str, Any]) -> FineTuneSweepStatus:
    try:
        return FineTuneSweepStatus.parse_manifest(dict(raw))
    except ValidationError as exc:
        log.warning("%s/%s: sweep status not readable, rebuilding it from the trials: %s", *key, exc)
        return FineTuneSweepStatus()


def observations(
    sweep: FineTuneSweep, watched: Iterable[Mapping[str, Any]], previous: FineTuneSweepStatus
) -> tuple[list[Observation], list[int]]:
    """The trials as the study takes them (``watched``: the index's :func:`observed_trial` records),
    and the numbers of Running trials that the watch does not show (created but not seen yet, or
    deleted): those are created again, by name."""
    rows = {t.number: t for t in previous.trials}
    metric = sweep.spec.objective.metric
    seen: dict[int, Observation] = {}
    for trial in watched:
        meta, status = trial["metadata"], trial["status"]
        number = meta["labels"].get(TRIAL_LABEL, "")
        obs = observe_trial(
            meta["labels"],
            meta["annotations"],
            status.get("phase"),
            read_progress(status),
            metric,
            rows.get(int(number)) if number.isdigit() else None,
        )
        if obs is not None:
            seen[obs.number] = obs
    unseen: list[int] = []
    for number, row in rows.items():
        if number in seen:
            continue
        # Its outcome is known only here (a Complete, Pruned or Failed trial deleted since), or it is a
        # Running trial this operator created and has not seen yet (or someone deleted): kept as it is.
        seen[number] = Observation(
            number, dict(row.params), row.state, row.value, {i.step: i.value for i in row.intermediate}
        )
        if row.state == "Running":
            unseen.append(number)
    return sorted(seen.values(), key=lambda o: o.number), unseen


async def reconcile_sweep(key: Key) -> float | None:
    """Bring one FineTuneSweep's trials and status in line with its spec. Returns a requeue delay."""
    kube = _kube()
    namespace, name = key
    body = Sweeps.bodies.get(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    raw_status = body.get("status") or {}
    previous = _previous(key, raw_status)
    try:
        sweep = validate_sweep_object({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    except InvalidSpec as exc:
        # Admission (CEL) refuses most; what only Python can check (search paths, the template with
        # each choice) lands here.
        await _write_status(kube, key, body, _invalid(body, previous, str(exc)))
        return None
    trials, unseen = observations(sweep, Sweeps.trials.get(key, ()), previous)
    decision = decide(name, sweep.spec, trials)
    for number in decision.prune:
        trial = trial_name(name, number)
        if await kube.merge_patch("FineTuneJob", namespace, trial, PRUNE_PATCH):
            row = next(t for t in decision.status.trials if t.number == number)
            latest = row.intermediate[-1] if row.intermediate else None
            at = f" ({sweep.spec.objective.metric} {latest.value:.6g} at step {latest.step})" if latest else ""
            pruner = sweep.spec.pruning.type if sweep.spec.pruning else ""
            message = f"trial {trial} pruned by the {pruner} pruner{at}"
            log.info("%s/%s: %s", namespace, name, message)
            await kube.event(body, "Normal", "TrialPruned", message)
    rows = {t.number: t for t in decision.status.trials}
    again = [
        NewTrial(n, trial_name(name, n), dict(rows[n].params), trial_spec(sweep.spec.template, dict(rows[n].params)))
        for n in unseen
    ]
    for new in again:
        if await kube.create_if_absent(trial_job(sweep, new)):
            log.warning("%s/%s: trial %s was gone while running: created again", namespace, name, new.name)
    for new in decision.create:
        if await kube.create_if_absent(trial_job(sweep, new)):
            params = json.dumps(new.params, sort_keys=True)
            log.info("%s/%s: trial %s created with %s", namespace, name, new.name, params)
            await kube.event(body, "Normal", "TrialCreated", f"trial {new.name} created with {params}")
    status = decision.status.model_copy(
        update={"observed_generation": int(body["metadata"].get("generation") or 0), "conditions": []}
    )
    if status.phase != previous.phase and status.phase in ("Succeeded", "Failed"):
        best = f"best {status.best_trial} ({status.best_value:.6g})" if status.best_trial else "no trial completed"
        await kube.event(body, "Normal" if status.phase == "Succeeded" else "Warning", status.phase, best)
    if not await _write_status(kube, key, body, status):
        return 1.0  # changed since we read it: its newer version's event reconciles it again
    _record(key, status)
    return None


def _invalid(body: Mapping[str, Any], previous: FineTuneSweepStatus, message: str) -> FineTuneSweepStatus:
    generation = int(body["metadata"].get("generation") or 0)
    condition = Condition(
        type=CONDITION_INVALID,
        status="True",
        reason=REASON_INVALID_SPEC,
        message=message[:MAX_MESSAGE],
        last_transition_time=to_second(datetime.now(UTC)),
        observed_generation=generation,
    )
    kept = next(
        (c for c in previous.conditions if c.type == CONDITION_INVALID and c.message == condition.message), None
    )
    return previous.model_copy(
        update={"phase": "Failed", "conditions": [kept or condition], "observed_generation": generation}
    )


def status_patch(raw: Mapping[str, Any], status: FineTuneSweepStatus) -> dict[str, Any] | None:
    """The merge patch that makes the stored status ``status`` (a field it no longer has is nulled), or
    None when it already is."""
    new = status.to_manifest()
    patch = {**{k: None for k in raw if k not in new}, **new}
    return patch if any(raw.get(k) != v for k, v in patch.items()) else None


async def _write_status(kube: Kube, key: Key, body: dict[str, Any], status: FineTuneSweepStatus) -> bool:
    """Write ``status`` if it differs from the stored one; False on a conflict (the sweep changed)."""
    patch = status_patch(body.get("status") or {}, status)
    if patch is None:
        return True
    updated = await kube.patch_status(*key, patch, body["metadata"].get("resourceVersion"), kind="FineTuneSweep")
    if updated is None:
        return False
    Sweeps.bodies[key] = slim(updated)
    return True


def _record(key: Key, status: FineTuneSweepStatus) -> None:
    namespace, name = key
    counts = {state: sum(1 for t in status.trials if t.state == state) for state in STATES}
    for state, count in counts.items():
        metrics.SWEEP_TRIALS.labels(namespace=namespace, sweep=name, state=state).set(count)
    if status.best_value is not None:
        metrics.SWEEP_BEST_VALUE.labels(namespace=namespace, sweep=name).set(status.best_value)


def _forget(key: Key) -> None:
    Sweeps.bodies.pop(key, None)
    Sweeps.failures.pop(key, None)
    Sweeps.locks.pop(key, None)
    wakeup = Sweeps.wakeups.pop(key, None)
    if wakeup is not None:
        wakeup[0].cancel()
    for state in STATES:
        with contextlib.suppress(KeyError):  # never set
            metrics.SWEEP_TRIALS.remove(*key, state)
    with contextlib.suppress(KeyError):
        metrics.SWEEP_BEST_VALUE.remove(*key)


async def _reconcile_guarded(key: Key) -> None:
    """One reconcile at a time per sweep, at most MAX_CONCURRENT at once; retried on API errors."""
    lock = Sweeps.locks.setdefault(key, asyncio.Lock())
    assert Sweeps.slots is not None, "operator not started"
    async with lock, Sweeps.slots:
        try:
            delay = await reconcile_sweep(key)
        except ApiError as exc:
            failures = Sweeps.failures[key] = Sweeps.failures.get(key, 0) + 1
            delay = min(RETRY_DELAY * 2 ** (failures - 1), RETRY_CAP)
            log.warning("reconcile of sweep %s/%s failed (%s); retrying in %.0f s", *key, exc, delay)
        else:
            Sweeps.failures.pop(key, None)
    _schedule(key, delay)


def _schedule(key: Key, delay: float | None) -> None:
    """Reconcile sweep ``key`` after ``delay`` seconds (one pending wake-up per sweep, the earliest)."""
    if delay is None:
        return
    loop = asyncio.get_running_loop()
    due = loop.time() + max(delay, MIN_DELAY)
    pending = Sweeps.wakeups.get(key)
    if pending is not None:
        if pending[1] <= due:
            return
        pending[0].cancel()
    Sweeps.wakeups[key] = (loop.call_at(due, _wake, key), due)


def _wake(key: Key) -> None:
    Sweeps.wakeups.pop(key, None)
    _spawn(_reconcile_guarded(key))


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    Sweeps.tasks.add(task)
    task.add_done_callback(Sweeps.tasks.discard)


async def _resync() -> None:
    """Every TIMER_INTERVAL: reconcile every sweep (anything a missed event left)."""
    while True:
        await asyncio.sleep(TIMER_INTERVAL)
        for key in list(Sweeps.bodies):
            if key not in Sweeps.wakeups and not Sweeps.locks.get(key, asyncio.Lock()).locked():
                _spawn(_reconcile_guarded(key))


# -- triggers -------------------------------------------------------------------------------------------

TRIAL_LABELS: dict[str, Any] = {SWEEP_LABEL: kopf.PRESENT, TRIAL_LABEL: kopf.PRESENT}


@kopf.index(GROUP, VERSION, JOB_PLURAL, labels=TRIAL_LABELS)
async def sweep_trials(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels[SWEEP_LABEL]): observed_trial(body)}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_sweep(event: kopf.RawEvent, namespace: str | None, name: str, **kwargs: Any) -> None:
    assert namespace is not None  # FineTuneSweeps are namespaced
    Sweeps.trials = kwargs["sweep_trials"]
    key = (namespace, name)
    if event["type"] == "DELETED":
        _forget(key)  # its trials go with their owner references
        return
    Sweeps.bodies[key] = slim(event["object"])
    await _reconcile_guarded(key)


@kopf.on.event(GROUP, VERSION, JOB_PLURAL, labels=TRIAL_LABELS)
async def on_trial(namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
    """A trial changed (its phase, an evaluation in its progress): reconcile its sweep shortly."""
    Sweeps.trials = kwargs["sweep_trials"]
    key = (namespace or "", labels[SWEEP_LABEL])
    if key in Sweeps.bodies:
        _schedule(key, CHILD_EVENT_DELAY)


def start() -> None:
    """Called in kopf's event loop at start-up, after :func:`handlers.start`."""
    Sweeps.slots = asyncio.Semaphore(MAX_CONCURRENT)
    _spawn(_resync())


async def stop() -> None:
    for task in list(Sweeps.tasks):
        task.cancel()
