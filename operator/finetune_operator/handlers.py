"""kopf wiring: every trigger runs the same level-triggered :func:`reconcile`.

Triggers: a FineTuneJob is created, changed or found at start-up; one of its Jobs or pods changes;
and a periodic timer (deadlines, TTL, and anything a missed event left behind). Reconcile reads the
current state, asks the pure :func:`~finetune_operator.reconcile.plan` what to do, and does it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import builders, metrics
from .api.v1alpha1 import GROUP, PLURAL, VERSION
from .api.validation import InvalidSpec, validate_object
from .k8s_io import Kube
from .reconcile import Observed, plan

log = logging.getLogger("finetune_operator")
PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
#: Seconds between two periodic reconciles of every FineTuneJob (deadlines, TTL, missed events).
TIMER_INTERVAL = 30.0
#: Seconds a child event waits, so that the events of one gang's pods are reconciled together.
CHILD_EVENT_DELAY = 0.3
MIN_DELAY = 0.1


class State:
    """Process-wide state set at start-up."""

    kube: Kube | None = None
    settings = builders.OperatorSettings()
    locks: dict[tuple[str, str], threading.Lock] = {}
    locks_guard = threading.Lock()
    phases: dict[tuple[str, str], str] = {}
    wakeups: dict[tuple[str, str], tuple[threading.Timer, float]] = {}


def _lock(namespace: str, name: str) -> threading.Lock:
    with State.locks_guard:
        return State.locks.setdefault((namespace, name), threading.Lock())


def _record_phase(namespace: str, name: str, phase: str | None, restarts: int = 0) -> None:
    """Keep the jobs-by-phase gauge, and each job's phase and restarts gauges, as last reconciled."""
    if phase is None:
        if State.phases.pop((namespace, name), None) is not None:
            metrics.JOB_RESTARTS.remove(namespace, name)
            for ph in PHASES:
                metrics.JOB_PHASE.remove(namespace, name, ph)
    else:
        State.phases[(namespace, name)] = phase
        metrics.JOB_RESTARTS.labels(namespace=namespace, job=name).set(restarts)
        for ph in PHASES:
            metrics.JOB_PHASE.labels(namespace=namespace, job=name, phase=ph).set(1 if ph == phase else 0)
    for ph in PHASES:
        count = sum(1 for (ns, _), p in State.phases.items() if ns == namespace and p == ph)
        metrics.JOBS_BY_PHASE.labels(namespace=namespace, phase=ph).set(count)


def reconcile(namespace: str, name: str, *, ensure_children: bool = True) -> float | None:
    """Bring one FineTuneJob's children and status in line with its spec. Returns a requeue delay.

    Child events (a pod started, a Job finished) skip re-checking the long-lived children: the
    FineTuneJob's own triggers (create, update, resume, the periodic timer) do that.
    """
    kube = State.kube
    assert kube is not None, "operator not started"
    with _lock(namespace, name), metrics.RECONCILE_SECONDS.time():
        body = kube.get_finetunejob(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            _record_phase(namespace, name, None)
            return None
        status = body.get("status") or {}
        try:
            ftj = validate_object({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        except InvalidSpec as exc:
            # Admission (CEL) normally refuses these; an object stored before a rule existed lands here.
            _invalid(kube, body, status, str(exc))
            raise kopf.PermanentError(f"invalid spec: {exc}") from None
        uid = body["metadata"]["uid"]
        if ensure_children:
            for child in builders.children(ftj, namespace, uid, State.settings):
                kube.ensure(child)
        observed = Observed(
            ftj=ftj,
            generation=int(body["metadata"].get("generation") or 0),
            status=status,
            jobs=kube.list_jobs(namespace, name),
            pods=kube.list_pods(namespace, name),
            now=datetime.now(UTC),
        )
        p = plan(observed)
        for job_name in dict.fromkeys(p.delete_jobs):
            kube.delete_job(namespace, job_name)
        if p.set_suspend is not None:
            kube.set_job_suspend(namespace, *p.set_suspend)
        if p.create_job is not None:
            job = builders.job(
                ftj, namespace, uid, p.create_job, State.settings, active_deadline_seconds=p.active_deadline_seconds
            )
            if kube.ensure(job):
                metrics.JOBS_CREATED.inc()
        new_status = {k: v for k, v in p.status.items() if v is not None or k in status}
        if _differs(status, new_status):
            kube.patch_status(namespace, name, new_status)
            _count_transition(status, new_status)
        for kind, reason, message in p.events:
            kube.event(body, kind, reason, message)
        _record_phase(namespace, name, new_status["phase"], int(new_status.get("restarts") or 0))
        if p.delete_ftj:
            log.info("deleting %s/%s: ttlSecondsAfterFinished elapsed", namespace, name)
            kube.delete_finetunejob(namespace, name)
            _record_phase(namespace, name, None)
            return None
        return p.requeue_after


def _differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _count_transition(old: dict[str, Any], new: dict[str, Any]) -> None:
    if old.get("phase") == new.get("phase"):
        return
    if new["phase"] == "Succeeded":
        metrics.JOBS_SUCCEEDED.inc()
    elif new["phase"] == "Failed":
        failed: dict[str, Any] = next((c for c in new["conditions"] if c["type"] == "Failed"), {})
        metrics.JOBS_FAILED.labels(reason=failed.get("reason", "Unknown")).inc()
    if int(new.get("restarts") or 0) > int(old.get("restarts") or 0):
        metrics.JOBS_RESTARTED.inc()


def _invalid(kube: Kube, body: dict[str, Any], status: dict[str, Any], message: str) -> None:
    if status.get("phase") == "Failed":
        return
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    generation = int(body["metadata"].get("generation") or 0)
    kube.patch_status(
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        {
            "phase": "Failed",
            "observedGeneration": generation,
            "completionTime": now,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "InvalidSpec",
                    "message": message[:4000],
                    "lastTransitionTime": now,
                    "observedGeneration": generation,
                }
            ],
        },
    )
    kube.event(body, "Warning", "InvalidSpec", message)


def _run(namespace: str, name: str) -> None:
    try:
        delay = reconcile(namespace, name)
    except ApiException as exc:
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status}: {exc.reason}", delay=5) from exc
    _schedule(namespace, name, delay)


def _schedule(namespace: str, name: str, delay: float | None) -> None:
    """Reconcile again after ``delay`` seconds (a burst of child events settles, a TTL or deadline
    falls due, an old gang is stopping). One pending wake-up per job, the earliest asked for; the
    periodic timer covers anything longer than its interval."""
    if delay is None or delay >= TIMER_INTERVAL:
        return
    key = (namespace, name)
    due = time.monotonic() + max(delay, MIN_DELAY)
    with State.locks_guard:
        pending = State.wakeups.get(key)
        if pending is not None and pending[0].is_alive():
            if pending[1] <= due:
                return
            pending[0].cancel()
        wakeup = threading.Timer(due - time.monotonic(), _wake, args=key)
        wakeup.daemon = True
        State.wakeups[key] = (wakeup, due)
        wakeup.start()


def _wake(namespace: str, name: str) -> None:
    with State.locks_guard:
        State.wakeups.pop((namespace, name), None)
    try:
        _schedule(namespace, name, reconcile(namespace, name, ensure_children=False))
    except (ApiException, kopf.PermanentError):
        log.exception("scheduled reconcile of %s/%s failed; the periodic timer retries it", namespace, name)


# -- triggers -------------------------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_finetunejob(namespace: str | None, name: str, **_: Any) -> None:
    assert namespace is not None  # FineTuneJobs are namespaced
    _run(namespace, name)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_finetunejob_deleted(namespace: str | None, name: str, **_: Any) -> None:
    assert namespace is not None
    # Children go with the owner references; only the metrics need to forget the job.
    _record_phase(namespace, name, None)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_INTERVAL)
def periodic(namespace: str | None, name: str, **_: Any) -> None:
    assert namespace is not None
    _run(namespace, name)


def _owner_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    """A Job or pod of a FineTuneJob changed: reconcile its owner shortly. The pods of a gang change
    together; waiting a moment turns a burst of their events into one reconcile."""
    owner = labels.get(builders.LABEL_JOB)
    if namespace and owner:
        _schedule(namespace, owner, CHILD_EVENT_DELAY)


CHILD_LABELS: dict[str, Any] = {
    builders.LABEL_JOB: kopf.PRESENT,
    builders.LABEL_MANAGED_BY: builders.MANAGER,
}
kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)(_owner_event)
kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)(_owner_event)
