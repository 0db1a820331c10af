"""Level-triggered reconciliation, as a pure function: what is observed → what should be done.

:func:`plan` looks at a FineTuneJob and the Jobs and pods it owns — never at what happened before
except what the FineTuneJob's own status records (phase, restarts, times) — and returns the status
to write, the changes to make and the events to emit. Calling it again after an operator restart,
with the same observations, gives the same answer: no chain of edge-triggered handlers to get stuck.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .api.trainer_config import EXIT_INVALID_CONFIG, EXIT_INVALID_DATA, EXIT_NONFINITE_LOSS, EXIT_PREEMPTED
from .api.v1alpha1 import FineTuneJob
from .builders import LABEL_ATTEMPT, job_name

TERMINAL = ("Succeeded", "Failed")
EXIT_REASONS = {
    EXIT_INVALID_CONFIG: "InvalidSpec",
    EXIT_INVALID_DATA: "InvalidData",
    EXIT_NONFINITE_LOSS: "NonFiniteLoss",
    EXIT_PREEMPTED: "Preempted",
}
TERMINATED_FIELDS = ("exitCode", "reason", "message", "finishedAt")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
CONDITION_TYPES = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
MAX_MESSAGE = 4000


@dataclass
class Observed:
    """Everything the plan depends on."""

    ftj: FineTuneJob
    generation: int
    status: dict[str, Any]
    jobs: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    now: datetime


@dataclass
class Plan:
    status: dict[str, Any]
    create_job: int | None = None  #: attempt to create
    active_deadline_seconds: int | None = None  #: for the Job to create
    delete_jobs: list[str] = field(default_factory=list)
    set_suspend: tuple[str, bool] | None = None  #: (job name, suspend)
    delete_ftj: bool = False
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  #: (type, reason, message)


def observed_job(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Job that :func:`plan` reads: what the operator keeps of each Job it watches."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {"suspend": (obj.get("spec") or {}).get("suspend")},
        "status": {
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message")} for c in status.get("conditions") or []
            ],
            "completionTime": status.get("completionTime"),
        },
    }


def observed_pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a pod that :func:`plan` reads: what the operator keeps of each pod it watches."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    index = (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {COMPLETION_INDEX: index} if index is not None else {},
        },
        "status": {
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "message": status.get("message"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
                if c.get("type") == "DisruptionTarget"
            ],
            "containerStatuses": [
                {"state": {"terminated": {k: cs["state"]["terminated"].get(k) for k in TERMINATED_FIELDS}}}
                for cs in status.get("containerStatuses") or []
                if (cs.get("state") or {}).get("terminated")
            ],
        },
    }


def timestamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)  # RFC 3339, with "Z" or an offset
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def attempt_of(job: dict[str, Any]) -> int:
    return int(job["metadata"].get("labels", {}).get(LABEL_ATTEMPT, "-1"))


def job_condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def failure_of(pods: list[dict[str, Any]], now: datetime) -> dict[str, Any] | None:
    """The failure of the first failed trainer container (lowest completion index)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: int(p["metadata"].get("annotations", {}).get(COMPLETION_INDEX, 0)))
    for pod in failed:
        status = pod.get("status") or {}
        disrupted = any(
            c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        for cs in status.get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if not terminated:
                continue
            code = terminated.get("exitCode")
            reason = EXIT_REASONS.get(code) or terminated.get("reason") or "Error"
            if disrupted:
                reason = "Preempted"
            return {
                "exitCode": code,
                "reason": reason,
                "message": (terminated.get("message") or status.get("message") or "")[-MAX_MESSAGE:],
                "time": terminated.get("finishedAt") or timestamp(now),
            }
        if disrupted or status.get("reason"):
            return {
                "reason": "Preempted" if disrupted else str(status["reason"]),
                "message": (status.get("message") or "")[-MAX_MESSAGE:],
                "time": timestamp(now),
            }
    return None


def _lingering_pods(pods: list[dict[str, Any]], attempt: int) -> int:
    """Pods of earlier attempts that are still pending or running."""
    return sum(
        1
        for p in pods
        if int(p["metadata"].get("labels", {}).get(LABEL_ATTEMPT, attempt)) < attempt
        and (p.get("status") or {}).get("phase") in ("Pending", "Running")
    )


def _running_pods(pods: list[dict[str, Any]]) -> int:
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")


def _conditions(
    previous: list[dict[str, Any]], phase: str, reason: str, message: str, generation: int, now: datetime, created: bool
) -> list[dict[str, Any]]:
    """Conditions by the API conventions: one per type, lastTransitionTime moves only on a flip."""
    by_type = {c["type"]: c for c in previous}
    truth = {
        "Created": created,
        "Running": phase == "Running",
        "Restarting": phase == "Restarting",
        "Suspended": phase == "Suspended",
        "Succeeded": phase == "Succeeded",
        "Failed": phase == "Failed",
    }
    out = []
    for kind in CONDITION_TYPES:
        old, true = by_type.get(kind), truth[kind]
        if old is None and not true:
            continue  # a condition appears once it first becomes true
        if kind == "Created":
            cond_reason, cond_message = "JobCreated", "the training gang was created"
        elif true:
            cond_reason, cond_message = reason, message
        else:
            cond_reason, cond_message = phase, ""
        status = "True" if true else "False"
        since = old["lastTransitionTime"] if old is not None and old.get("status") == status else timestamp(now)
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": cond_reason,
                "message": cond_message[:MAX_MESSAGE],
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return out


def plan(obs: Observed) -> Plan:
    ftj, now = obs.ftj, obs.now
    spec = ftj.spec
    name = ftj.metadata.name
    prev = obs.status or {}
    restarts = int(prev.get("restarts") or 0)
    phase = prev.get("phase") or "Pending"
    start_time = parse_time(prev.get("startTime"))
    completion_time = parse_time(prev.get("completionTime"))
    last_failure = prev.get("lastFailure")
    reason, message = "Pending", "waiting for the training gang to be created"
    out = Plan(status={})

    current_name = job_name(name, restarts)
    current = next((j for j in obs.jobs if j["metadata"]["name"] == current_name), None)
    out.delete_jobs = [j["metadata"]["name"] for j in obs.jobs if attempt_of(j) < restarts]
    pods = [p for p in obs.pods if p["metadata"].get("labels", {}).get(LABEL_ATTEMPT) == str(restarts)]
    created = current is not None or bool(obs.jobs) or restarts > 0 or phase != "Pending"

    if phase in TERMINAL:
        reason = next((c["reason"] for c in prev.get("conditions", []) if c["type"] == phase), phase)
        message = next((c.get("message", "") for c in prev.get("conditions", []) if c["type"] == phase), "")
        if current is not None and not (job_condition(current, "Complete") or job_condition(current, "Failed")):
            out.delete_jobs.append(current_name)
        ttl = spec.run_policy.ttl_seconds_after_finished
        if ttl is not None and completion_time is not None:
            due = completion_time + timedelta(seconds=ttl)
            if now >= due:
                out.delete_ftj = True
            else:
                out.requeue_after = (due - now).total_seconds()
    else:
        deadline = spec.run_policy.active_deadline_seconds
        remaining = None
        if deadline is not None and start_time is not None:
            remaining = deadline - (now - start_time).total_seconds()
        if remaining is not None and remaining <= 0:
            phase, reason = "Failed", "DeadlineExceeded"
            message = f"the job ran longer than runPolicy.activeDeadlineSeconds ({deadline}s)"
            completion_time = now
            if current is not None:
                out.delete_jobs.append(current_name)
        elif current is None and (lingering := _lingering_pods(obs.pods, restarts)):
            # The previous gang is still stopping (saving a checkpoint on SIGTERM, say): start the next
            # one only when it is gone, so it resumes from that checkpoint and does not share GPUs.
            phase, reason = "Restarting", (last_failure or {}).get("reason", "Restarting")
            message = f"waiting for {lingering} pod(s) of the previous attempt to stop"
            out.requeue_after = 2.0
        elif current is None:
            out.create_job = restarts
            out.active_deadline_seconds = int(remaining) if remaining is not None else deadline
            created = True
            if spec.run_policy.suspend:
                phase, reason, message = "Suspended", "Suspended", "runPolicy.suspend is true"
            elif restarts:
                phase, reason = "Restarting", (last_failure or {}).get("reason", "Restarting")
                message = f"starting attempt {restarts} from the newest checkpoint"
            else:
                phase, reason, message = "Pending", "Creating", "creating the training gang"
        else:
            phase, reason, message, completion_time, restarts, last_failure = _from_job(
                obs, current, pods, restarts, last_failure, out
            )
            if remaining is not None and phase not in TERMINAL:
                out.requeue_after = max(remaining, 1.0)
        if phase == "Running" and start_time is None:
            start_time = now
        if phase in TERMINAL and completion_time is None:
            completion_time = now
        if phase in TERMINAL and spec.run_policy.ttl_seconds_after_finished is not None:
            out.requeue_after = float(spec.run_policy.ttl_seconds_after_finished)

    status: dict[str, Any] = {
        "phase": phase,
        "restarts": restarts,
        "observedGeneration": obs.generation,
        "conditions": _conditions(prev.get("conditions") or [], phase, reason, message, obs.generation, now, created),
        "startTime": timestamp(start_time) if start_time else None,
        "completionTime": timestamp(completion_time) if completion_time else None,
        "lastFailure": last_failure,
    }
    out.status = status
    if phase != prev.get("phase"):
        kind = "Warning" if phase in ("Failed", "Restarting") else "Normal"
        out.events.append((kind, reason, f"{phase}: {message}" if message else phase))
    return out


def _from_job(
    obs: Observed,
    current: dict[str, Any],
    pods: list[dict[str, Any]],
    restarts: int,
    last_failure: dict[str, Any] | None,
    out: Plan,
) -> tuple[str, str, str, datetime | None, int, dict[str, Any] | None]:
    """Phase from the current attempt's Job and pods: (phase, reason, message, completion, restarts, failure)."""
    spec = obs.ftj.spec
    nodes = spec.distributed.nodes
    name = current["metadata"]["name"]
    complete = job_condition(current, "Complete")
    if complete:
        done = parse_time((current.get("status") or {}).get("completionTime")) or obs.now
        return "Succeeded", "Completed", "training finished", done, restarts, last_failure
    failed = job_condition(current, "Failed")
    if failed:
        failure = failure_of(pods, obs.now) or {
            "reason": failed.get("reason") or "Failed",
            "message": failed.get("message", ""),
            "time": timestamp(obs.now),
        }
        if failed.get("reason") == "DeadlineExceeded":
            return "Failed", "DeadlineExceeded", failed.get("message", ""), obs.now, restarts, failure
        if failed.get("reason") == "PodFailurePolicy":
            detail = failure.get("message") or failed.get("message", "")
            return "Failed", failure["reason"], detail, obs.now, restarts, failure
        if restarts < spec.run_policy.backoff_limit:
            out.delete_jobs.append(name)
            message = f"attempt {restarts} failed ({failure['reason']}); restarting the gang"
            return "Restarting", failure["reason"], message, None, restarts + 1, failure
        limit = spec.run_policy.backoff_limit
        message = f"{restarts} restarts used (runPolicy.backoffLimit {limit}); last failure: {failure['reason']}"
        return "Failed", "BackoffLimitExceeded", message, obs.now, restarts, failure
    job_suspended = bool((current.get("spec") or {}).get("suspend"))
    want_suspend = spec.run_policy.suspend
    if job_suspended != want_suspend and not (not want_suspend and spec.run_policy.queue_name):
        out.set_suspend = (name, want_suspend)
    if want_suspend:
        return "Suspended", "Suspended", "runPolicy.suspend is true", None, restarts, last_failure
    if job_suspended and spec.run_policy.queue_name:
        return (
            "Pending",
            "Queued",
            f"waiting for admission by queue {spec.run_policy.queue_name}",
            None,
            restarts,
            last_failure,
        )
    running = _running_pods(pods)
    if running >= nodes:
        return "Running", "AllPodsRunning", f"{running}/{nodes} pods running", None, restarts, last_failure
    phase = "Restarting" if restarts else "Pending"
    reason = (last_failure or {}).get("reason", "Restarting") if restarts else "PodsStarting"
    return phase, reason, f"{running}/{nodes} pods running", None, restarts, last_failure
