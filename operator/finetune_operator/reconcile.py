"""Level-triggered reconciliation, as a pure function: what is observed → what should be done.

:func:`plan` looks at a FineTuneJob and the Jobs and pods it owns — never at what happened before
except what the FineTuneJob's own status records (phase, restarts, times) — and returns the status
to write, the changes to make and the events to emit. Calling it again after an operator restart,
with the same observations, gives the same answer: no chain of edge-triggered handlers to get stuck.

The status is typed both ways: the previous one is read into a
:class:`~finetune_operator.api.v1alpha1.FineTuneJobStatus` (:func:`read_status`, tolerant of what an
older version wrote), and the new one is built from the API's models and written as their JSON
(:func:`status_json`). The operator owns :data:`OPERATOR_FIELDS` of the status and no other:
``status.progress`` and ``status.checkpoints`` are the trainer's, and are neither read nor written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from .api.trainer_config import EXIT_INVALID_CONFIG, EXIT_INVALID_DATA, EXIT_NONFINITE_LOSS, EXIT_PREEMPTED
from .api.v1alpha1 import (
    CONDITION_REASON_PATTERN,
    Condition,
    FailureInfo,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
)
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
MAX_REASON = 1024

#: The status fields the operator writes (FineTuneJobStatus field names). The rest are not its own:
#: status.progress and status.checkpoints are the trainer's, status.artifacts nobody's yet.
OPERATOR_FIELDS = (
    "phase",
    "restarts",
    "observed_generation",
    "conditions",
    "start_time",
    "completion_time",
    "last_failure",
)
_ALIASES = {name: FineTuneJobStatus.model_fields[name].alias or name for name in OPERATOR_FIELDS}


@dataclass
class Observed:
    """Everything the plan depends on."""

    ftj: FineTuneJob
    generation: int
    status: FineTuneJobStatus  #: the previous status, by :func:`read_status`
    jobs: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    now: datetime


@dataclass
class Plan:
    #: The new status: :data:`OPERATOR_FIELDS` as JSON, by :func:`status_json` (None: unset).
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


def to_second(t: datetime) -> datetime:
    """``t`` in UTC, to the second: what a status time holds (it is written as :func:`timestamp` writes it)."""
    return t.astimezone(UTC).replace(microsecond=0)


def status_json(status: FineTuneJobStatus, fields: Iterable[str] = OPERATOR_FIELDS) -> dict[str, Any]:
    """``fields`` of ``status`` as a merge patch carries them: camelCase keys, the API's JSON forms,
    unset optionals left out inside objects, and None for a field itself unset (a patch clears it)."""
    names = tuple(fields)
    dumped = status.model_dump(by_alias=True, exclude_none=True, mode="json", include=set(names))
    return {_ALIASES[name]: dumped.get(_ALIASES[name]) for name in names}


def _errors(exc: ValidationError, prefix: str) -> str:
    return "; ".join(
        f"{prefix}{''.join(f'[{part}]' if isinstance(part, int) else f'.{part}' for part in e['loc'])}: {e['msg']}"
        for e in exc.errors()[:3]
    )


def read_status(raw: Mapping[str, Any] | None) -> tuple[FineTuneJobStatus, list[str]]:
    """The previous status, typed: the :data:`OPERATOR_FIELDS` of it (the only ones the plan reads),
    and what of it could not be read.

    The API server has checked the status against the CRD, so it normally validates. One the model
    refuses (an older version wrote it, say) is read field by field, and each condition alone, in
    lax mode; what still fails is left out (the plan then treats it as never set, and its patch
    rewrites it) and named in the problems returned. Never raises.
    """
    mine = {alias: raw[alias] for alias in _ALIASES.values() if raw and raw.get(alias) is not None}
    try:
        return FineTuneJobStatus.model_validate(mine, by_alias=True, by_name=False), []
    except ValidationError:
        pass
    fields: dict[str, Any] = {}
    problems: list[str] = []
    for name, alias in _ALIASES.items():
        if alias not in mine:
            continue
        value = mine[alias]
        if name == "conditions" and isinstance(value, list):
            fields[name] = []
            for i, item in enumerate(value):
                try:
                    fields[name].append(Condition.model_validate(item, strict=False, by_alias=True, by_name=False))
                except ValidationError as exc:
                    problems.append(_errors(exc, f"status.conditions[{i}]"))
            continue
        try:
            one = FineTuneJobStatus.model_validate({alias: value}, strict=False, by_alias=True, by_name=False)
        except ValidationError as exc:
            problems.append(_errors(exc, "status"))
        else:
            fields[name] = getattr(one, name)
    return FineTuneJobStatus(**fields), problems


def condition_reason(text: str) -> str:
    """``text`` as a condition reason (CamelCase, CONDITION_REASON_PATTERN). Kubernetes' own reasons
    already are; another (a runtime's, with spaces or dashes) keeps its letters, digits and ``_``,
    each word capitalised, so that the API server never refuses the status for it."""
    if len(text) <= MAX_REASON and re.fullmatch(CONDITION_REASON_PATTERN, text):
        return text
    words = re.findall(r"[A-Za-z0-9_]+", text)
    return "".join(w[:1].upper() + w[1:] for w in words).lstrip("0123456789_")[:MAX_REASON] or "Error"


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


def failure_of(pods: list[dict[str, Any]], now: datetime) -> FailureInfo | None:
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
            return FailureInfo(
                exit_code=code,
                reason=reason[:MAX_REASON],
                message=(terminated.get("message") or status.get("message") or "")[-MAX_MESSAGE:],
                time=to_second(parse_time(terminated.get("finishedAt")) or now),
            )
        if disrupted or status.get("reason"):
            return FailureInfo(
                reason="Preempted" if disrupted else str(status["reason"])[:MAX_REASON],
                message=(status.get("message") or "")[-MAX_MESSAGE:],
                time=to_second(now),
            )
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
    previous: list[Condition], phase: str, reason: str, message: str, generation: int, now: datetime, created: bool
) -> list[Condition]:
    """Conditions by the API conventions: one per type, lastTransitionTime moves only on a flip."""
    by_type = {c.type: c for c in previous}
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
            cond_reason, cond_message = condition_reason(reason), message
        else:
            cond_reason, cond_message = phase, ""
        status: Literal["True", "False"] = "True" if true else "False"
        since = old.last_transition_time if old is not None and old.status == status else to_second(now)
        out.append(
            Condition(
                type=kind,
                status=status,
                reason=cond_reason,
                message=cond_message[:MAX_MESSAGE],
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return out


def plan(obs: Observed) -> Plan:
    ftj, now = obs.ftj, obs.now
    spec = ftj.spec
    name = ftj.metadata.name
    prev = obs.status
    restarts = prev.restarts
    phase: Phase = prev.phase or "Pending"
    start_time = prev.start_time
    completion_time = prev.completion_time
    last_failure = prev.last_failure
    reason, message = "Pending", "waiting for the training gang to be created"
    out = Plan(status={})

    current_name = job_name(name, restarts)
    current = next((j for j in obs.jobs if j["metadata"]["name"] == current_name), None)
    out.delete_jobs = [j["metadata"]["name"] for j in obs.jobs if attempt_of(j) < restarts]
    pods = [p for p in obs.pods if p["metadata"].get("labels", {}).get(LABEL_ATTEMPT) == str(restarts)]
    created = current is not None or bool(obs.jobs) or restarts > 0 or phase != "Pending"

    if phase in TERMINAL:
        reason = next((c.reason for c in prev.conditions if c.type == phase), phase)
        message = next((c.message for c in prev.conditions if c.type == phase), "")
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
            phase, reason = "Restarting", last_failure.reason if last_failure else "Restarting"
            message = f"waiting for {lingering} pod(s) of the previous attempt to stop"
            out.requeue_after = 2.0
        elif current is None:
            out.create_job = restarts
            out.active_deadline_seconds = int(remaining) if remaining is not None else deadline
            created = True
            if spec.run_policy.suspend:
                phase, reason, message = "Suspended", "Suspended", "runPolicy.suspend is true"
            elif restarts:
                phase, reason = "Restarting", last_failure.reason if last_failure else "Restarting"
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

    out.status = status_json(
        FineTuneJobStatus(
            phase=phase,
            restarts=restarts,
            observed_generation=obs.generation,
            conditions=_conditions(prev.conditions, phase, reason, message, obs.generation, now, created),
            start_time=to_second(start_time) if start_time else None,
            completion_time=to_second(completion_time) if completion_time else None,
            last_failure=last_failure,
        )
    )
    if phase != prev.phase:
        kind = "Warning" if phase in ("Failed", "Restarting") else "Normal"
        out.events.append((kind, reason, f"{phase}: {message}" if message else phase))
    return out


def _from_job(
    obs: Observed,
    current: dict[str, Any],
    pods: list[dict[str, Any]],
    restarts: int,
    last_failure: FailureInfo | None,
    out: Plan,
) -> tuple[Phase, str, str, datetime | None, int, FailureInfo | None]:
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
        # A Job condition's message may be absent (None in what observed_job keeps).
        job_message = str(failed.get("message") or "")
        failure = failure_of(pods, obs.now) or FailureInfo(
            reason=str(failed.get("reason") or "Failed")[:MAX_REASON],
            message=job_message[-MAX_MESSAGE:],
            time=to_second(obs.now),
        )
        if failed.get("reason") == "DeadlineExceeded":
            return "Failed", "DeadlineExceeded", job_message, obs.now, restarts, failure
        if failed.get("reason") == "PodFailurePolicy":
            detail = failure.message or job_message
            return "Failed", failure.reason, detail, obs.now, restarts, failure
        if restarts < spec.run_policy.backoff_limit:
            out.delete_jobs.append(name)
            message = f"attempt {restarts} failed ({failure.reason}); restarting the gang"
            return "Restarting", failure.reason, message, None, restarts + 1, failure
        limit = spec.run_policy.backoff_limit
        message = f"{restarts} restarts used (runPolicy.backoffLimit {limit}); last failure: {failure.reason}"
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
    phase: Phase = "Restarting" if restarts else "Pending"
    reason = (last_failure.reason if last_failure else "Restarting") if restarts else "PodsStarting"
    return phase, reason, f"{running}/{nodes} pods running", None, restarts, last_failure
