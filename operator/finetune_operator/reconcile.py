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

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from . import __version__
from .api.memory import fits_total
from .api.trainer_config import (
    EXIT_DIVERGED,
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_NONFINITE_LOSS,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_ROLLBACK,
)
from .api.v1alpha1 import (
    CONDITION_DATA_VALID,
    CONDITION_DEPENDENCY_READY,
    CONDITION_FITS_IN_MEMORY,
    CONDITION_QUEUED,
    CONDITION_REASON_PATTERN,
    CONDITION_STALLED,
    JOB_URI_SCHEME,
    MODEL_ARTIFACT_KINDS,
    PREFLIGHT_MAX_PROBLEMS,
    PROGRESS_REPORT_DELAY_SECONDS,
    PROVENANCE_OPERATOR_FIELDS,
    REASON_DEPENDENCY_FAILED,
    REASON_INVALID_DATA,
    REASON_NODE_LOST,
    REASON_PREEMPTED,
    REASON_QUEUED,
    REASON_STALLED,
    REASON_WAITING_FOR_JOB,
    REASON_WILL_NOT_FIT,
    STALL_INTERVALS,
    Condition,
    Dependency,
    FailureInfo,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
    PreflightMemory,
    PreflightResult,
    Progress,
    Provenance,
)
from .builders import CONTAINER, LABEL_ATTEMPT, LABEL_PREFLIGHT, job_name

TERMINAL = ("Succeeded", "Failed")
EXIT_REASONS = {
    EXIT_INVALID_CONFIG: "InvalidSpec",
    EXIT_INVALID_DATA: "InvalidData",
    EXIT_NONFINITE_LOSS: "NonFiniteLoss",
    EXIT_PREEMPTED: "Preempted",
    EXIT_DIVERGED: "Diverged",
    EXIT_ROLLBACK: "Diverged",  # rolled back: the gang restarts before the divergence
}
TERMINATED_FIELDS = ("exitCode", "reason", "message", "finishedAt")
#: The taint the node lifecycle controller puts on a node whose Ready condition is False or Unknown;
#: a pod stays bound to it for its toleration's tolerationSeconds (300 s by default, from the
#: DefaultTolerationSeconds admission plugin), then the taint manager evicts it.
NODE_DOWN_TAINTS = {"False": "node.kubernetes.io/not-ready", "Unknown": "node.kubernetes.io/unreachable"}
#: DisruptionTarget reasons of a pod taken away with its node: deleted by the pod garbage collector
#: (its node is gone) or evicted by the taint manager (its node is down past the pod's toleration).
NODE_LOSS_DISRUPTIONS = frozenset({"DeletionByPodGC", "DeletionByTaintManager"})
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
CONDITION_TYPES = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
MAX_MESSAGE = 4000
MAX_REASON = 1024

#: Attempts of the preflight before the job fails, and the wait before attempt n (n >= 1):
#: PREFLIGHT_BACKOFF_SECONDS * 2**(n-1) after the previous attempt's pod finished.
PREFLIGHT_MAX_ATTEMPTS = 4
PREFLIGHT_BACKOFF_SECONDS = 10.0
GIB = 1024**3

#: The status fields the operator writes (FineTuneJobStatus field names). The rest are not its own:
#: status.progress, status.checkpoints and status.artifacts are the trainer's; status.provenance is
#: shared — the operator writes ``PROVENANCE_OPERATOR_FIELDS`` of it, the trainer the others.
OPERATOR_FIELDS = (
    "phase",
    "restarts",
    "observed_generation",
    "conditions",
    "start_time",
    "completion_time",
    "last_failure",
    "preflight",
    "provenance",
    "dependencies",
)
#: Nodes kept in status.provenance.nodes (the API's bound).
MAX_NODES = 256
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
    #: The trainer's status.progress (read, never written: :func:`read_progress`), for stalls.
    progress: Progress | None = None
    #: The other FineTuneJobs of the namespace (name to body: spec and status), for ``ftj://`` models.
    neighbours: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: The nodes the job's pods are bound to, by name (:func:`observed_node`); a node that is not
    #: there was deleted. None: nodes are not watched (an operator limited to namespaces cannot).
    nodes: Mapping[str, Mapping[str, Any]] | None = None
    #: Kueue's Workloads of the job's gang Jobs, by Job name (:func:`observed_workload`): what Kueue
    #: decided about a queued job (``runPolicy.queueName``). Empty without Kueue.
    workloads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class Plan:
    #: The new status: :data:`OPERATOR_FIELDS` as JSON, by :func:`status_json` (None: unset).
    status: dict[str, Any]
    create_job: int | None = None  #: attempt to create
    create_preflight: int | None = None  #: preflight attempt to create
    active_deadline_seconds: int | None = None  #: for the Job to create
    delete_jobs: list[str] = field(default_factory=list)
    set_suspend: tuple[str, bool] | None = None  #: (job name, suspend)
    #: (Workload name, spec.active) of a Kueue-managed gang: how a queued job is suspended and resumed
    #: (the operator never writes ``suspend`` of a Job that Kueue manages).
    set_workload_active: tuple[str, bool] | None = None
    delete_ftj: bool = False
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  #: (type, reason, message)
    #: Why the running gang is stalled (:func:`stall_of`); None: it is not, or is not running.
    stalled: str | None = None
    #: The spec's ``ftj://`` models, resolved (what the trainer config is built with).
    dependencies: list[Dependency] = field(default_factory=list)


def observed_job(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Job that :func:`plan` reads: what the operator keeps of each Job it watches."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": dict(meta.get("labels") or {}),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"suspend": (obj.get("spec") or {}).get("suspend")},
        "status": {
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
                for c in status.get("conditions") or []
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
        "spec": {
            "nodeName": (obj.get("spec") or {}).get("nodeName"),
            # What keeps the pod bound to a node that stopped reporting (see :func:`node_loss`).
            "tolerations": [
                {k: t.get(k) for k in ("key", "operator", "effect", "tolerationSeconds")}
                for t in (obj.get("spec") or {}).get("tolerations") or []
                if t.get("key") in (*NODE_DOWN_TAINTS.values(), None, "")
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "reason": status.get("reason"),
            "message": status.get("message"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status"), "reason": c.get("reason")}
                for c in status.get("conditions") or []
                if c.get("type") == "DisruptionTarget"
            ],
            # Each container's name and image by digest; its termination when it has terminated.
            "containerStatuses": [
                {
                    "name": cs.get("name"),
                    "imageID": cs.get("imageID"),
                    "state": {"terminated": {k: terminated.get(k) for k in TERMINATED_FIELDS}} if terminated else {},
                }
                for cs in status.get("containerStatuses") or []
                for terminated in [(cs.get("state") or {}).get("terminated")]
            ],
        },
    }


def observed_workload(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Kueue Workload that :func:`plan` reads: its name, whether it may be admitted
    (``spec.active``), the Job it was made for and its conditions (QuotaReserved, Admitted, Evicted, …)."""
    meta = obj.get("metadata") or {}
    owner = next(
        (o.get("name") for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job" and o.get("controller")),
        None,
    )
    return {
        "metadata": {"name": meta.get("name")},
        "job": owner,
        "spec": {"active": (obj.get("spec") or {}).get("active", True)},
        "status": {
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "reason", "message")}
                for c in (obj.get("status") or {}).get("conditions") or []
            ]
        },
    }


def workload_condition(workload: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The condition ``kind`` of a Workload (:func:`observed_workload`) when it is True."""
    conditions = (workload.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def observed_node(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Node that :func:`plan` reads: its Ready condition's status and since when."""
    conditions: list[dict[str, Any]] = (obj.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), {})
    return {
        "metadata": {"name": (obj.get("metadata") or {}).get("name")},
        "ready": ready.get("status") or "Unknown",
        "since": ready.get("lastTransitionTime"),
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


def read_progress(raw: Mapping[str, Any] | None) -> Progress | None:
    """The trainer's status.progress, typed, or None when there is none or it cannot be read (then no
    stall can be told: the job is not judged on it)."""
    value = (raw or {}).get("progress")
    if not isinstance(value, dict):
        return None
    try:
        return Progress.model_validate(value, strict=False, by_alias=True, by_name=False)
    except ValidationError:
        return None


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
        disruption = next(
            (
                c.get("reason") or ""
                for c in status.get("conditions") or []
                if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
            ),
            None,
        )
        disrupted = disruption is not None
        disrupted_reason = REASON_NODE_LOST if disruption in NODE_LOSS_DISRUPTIONS else "Preempted"
        for cs in status.get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if not terminated:
                continue
            code = terminated.get("exitCode")
            reason = EXIT_REASONS.get(code) or terminated.get("reason") or "Error"
            if disrupted:
                reason = disrupted_reason
            return FailureInfo(
                exit_code=code,
                reason=reason[:MAX_REASON],
                message=(terminated.get("message") or status.get("message") or "")[-MAX_MESSAGE:],
                time=to_second(parse_time(terminated.get("finishedAt")) or now),
            )
        if disrupted or status.get("reason"):
            return FailureInfo(
                reason=disrupted_reason if disrupted else str(status["reason"])[:MAX_REASON],
                message=(status.get("message") or "")[-MAX_MESSAGE:],
                time=to_second(now),
            )
    return None


def _lingering_pods(pods: list[dict[str, Any]], attempt: int, nodes: Mapping[str, Any] | None) -> int:
    """Pods of earlier attempts that are still pending or running — but for those bound to a node that
    is gone: nothing runs there (the pod garbage collector removes them in its own time)."""
    return sum(
        1
        for p in pods
        if int(p["metadata"].get("labels", {}).get(LABEL_ATTEMPT, attempt)) < attempt
        and (p.get("status") or {}).get("phase") in ("Pending", "Running")
        and not (nodes is not None and (n := (p.get("spec") or {}).get("nodeName")) and n not in nodes)
    )


def _toleration_seconds(pod: Mapping[str, Any], taint: str) -> float | None:
    """How long the pod stays bound to a node with this NoExecute taint: its longest matching
    toleration's tolerationSeconds (None: forever), 0 without one (evicted at once)."""
    seconds: list[float | None] = []
    for t in (pod.get("spec") or {}).get("tolerations") or []:
        if t.get("effect") not in (None, "", "NoExecute"):
            continue
        if t.get("key") == taint or (not t.get("key") and t.get("operator") == "Exists"):
            value = t.get("tolerationSeconds")
            seconds.append(None if value is None else max(float(value), 0.0))
    if not seconds:
        return 0.0
    return None if None in seconds else max(s for s in seconds if s is not None)


def node_loss(obs: Observed, pods: list[dict[str, Any]], out: Plan) -> str | None:
    """Why the current attempt's gang has lost a node (the failure's message), or None.

    Lost: a pending or running pod of the gang is bound to a node that was deleted, or to one whose
    Ready condition has been False or Unknown for longer than the pod tolerates the taint that puts
    on it (``node.kubernetes.io/not-ready`` / ``unreachable``, NoExecute) — the moment Kubernetes
    would evict it. The rest of the gang would wait in its next collective until the NCCL timeout:
    the gang is restarted at once. Not lost yet: a wake-up is asked for when it would be."""
    if obs.nodes is None:
        return None
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("name"))):
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name or (pod.get("status") or {}).get("phase") not in ("Pending", "Running"):
            continue
        pod_name = pod["metadata"].get("name")
        node = obs.nodes.get(node_name)
        if node is None:
            return f"node {node_name} of pod {pod_name} was deleted"
        ready = str(node.get("ready") or "Unknown")
        since = parse_time(node.get("since"))
        if ready == "True" or since is None:
            continue
        tolerated = _toleration_seconds(pod, NODE_DOWN_TAINTS.get(ready, NODE_DOWN_TAINTS["Unknown"]))
        if tolerated is None:
            continue
        down = (obs.now - since).total_seconds()
        if down >= tolerated:
            state = "not ready" if ready == "False" else "unreachable"
            return (
                f"node {node_name} of pod {pod_name} has been {state} for {down:.0f}s "
                f"(since {timestamp(since)}; the pod tolerates {tolerated:.0f}s)"
            )
        wake = tolerated - down + 1.0
        out.requeue_after = wake if out.requeue_after is None else min(out.requeue_after, wake)
    return None


def _provenance(prev: Provenance | None, gang_pods: list[dict[str, Any]]) -> Provenance | None:
    """The operator's fields of status.provenance: the trainer image by digest (of the newest attempt's
    pod that reports one), every node a training pod ran on (those recorded before, whose pods may be
    gone, and the pods' now), and the operator's version; None until a training pod is scheduled. The
    trainer's fields are left as they are (they are not in this patch)."""
    nodes = set(prev.nodes if prev else [])
    nodes.update(n for p in gang_pods if (n := (p.get("spec") or {}).get("nodeName")))
    newest = sorted(gang_pods, key=lambda p: int(p["metadata"].get("labels", {}).get(LABEL_ATTEMPT, 0)), reverse=True)
    image = next(
        (
            cs["imageID"]
            for p in newest
            for cs in (p.get("status") or {}).get("containerStatuses") or []
            if cs.get("name") == CONTAINER and cs.get("imageID")
        ),
        None,
    )
    image = image or (prev.image if prev else None)
    if not nodes and image is None:
        return prev
    return Provenance(image=image, nodes=sorted(nodes)[:MAX_NODES], operator_version=__version__)


def stall_of(obs: Observed, current: dict[str, Any], out: Plan) -> str | None:
    """Why the current attempt's running gang is stalled (the message of condition Stalled), or None.

    Stalled: the attempt has reported a step (its progress is newer than its Job: start-up is never a
    stall) and no newer one for ``runPolicy.stallTimeoutSeconds``, and for :data:`STALL_INTERVALS`
    times its own interval between reports. Not stalled yet: a wake-up is asked for when it would be.
    """
    progress, policy = obs.progress, obs.ftj.spec.run_policy
    if progress is None or progress.updated_at is None or progress.step < 1:
        return None
    created = parse_time(current["metadata"].get("creationTimestamp"))
    if created is not None and progress.updated_at < created:
        return None  # the previous attempt's progress: this one has not reported yet
    interval = (progress.seconds_per_step or 0.0) * obs.ftj.spec.training.log_every_steps
    timeout = max(float(policy.stall_timeout_seconds), STALL_INTERVALS * (interval + PROGRESS_REPORT_DELAY_SECONDS))
    quiet = (obs.now - progress.updated_at).total_seconds()
    if quiet <= timeout:
        wake = timeout - quiet + 1.0
        out.requeue_after = wake if out.requeue_after is None else min(out.requeue_after, wake)
        return None
    return (
        f"no progress for {quiet:.0f}s: last step {progress.step} reported at {timestamp(progress.updated_at)} "
        f"(stalled after {timeout:.0f}s: runPolicy.stallTimeoutSeconds {policy.stall_timeout_seconds}, at least "
        f"{STALL_INTERVALS} report intervals)"
    )


def _running_pods(pods: list[dict[str, Any]]) -> int:
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")


ConditionStatus = Literal["True", "False", "Unknown"]


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
        out.append(_condition(kind, "True" if true else "False", cond_reason, cond_message, old, now, generation))
    return out


def _condition(
    kind: str, status: ConditionStatus, reason: str, message: str, old: Condition | None, now: datetime, generation: int
) -> Condition:
    """A condition of ``kind``; its lastTransitionTime is ``old``'s unless its status flips."""
    since = old.last_transition_time if old is not None and old.status == status else to_second(now)
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message[:MAX_MESSAGE],
        last_transition_time=since,
        observed_generation=generation,
    )


# -- the preflight ---------------------------------------------------------------------------------------

PREFLIGHT_CONDITION_TYPES = (CONDITION_DATA_VALID, CONDITION_FITS_IN_MEMORY)
#: What plan() needs to know of a preflight attempt's outcome: the phase it leads to and why.
Gate = tuple[Phase, str, str, FailureInfo | None, PreflightResult | None]


def is_preflight(obj: Mapping[str, Any]) -> bool:
    """A preflight Job or pod (builders.preflight_job), not one of a training gang."""
    return LABEL_PREFLIGHT in ((obj.get("metadata") or {}).get("labels") or {})


def preflight_attempt_of(obj: Mapping[str, Any]) -> int:
    return int(obj["metadata"]["labels"][LABEL_PREFLIGHT])


def _finished(job: dict[str, Any]) -> bool:
    return bool(job_condition(job, "Complete") or job_condition(job, "Failed"))


def parse_preflight_result(message: str | None) -> PreflightResult | None:
    """The PreflightResult a preflight container left as its termination message (JSON, camelCase), or None
    when the message is not one (the container died before writing it: its log's last lines are there).

    Read leniently: keys this version does not know are dropped (a newer image may report more), and
    problems beyond what status.preflight holds are cut."""
    try:
        data = json.loads(message or "")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    known = {f.alias or n for n, f in PreflightResult.model_fields.items()}
    data = {k: v for k, v in data.items() if k in known}
    if isinstance(data.get("memory"), dict):
        mem = {f.alias or n for n, f in PreflightMemory.model_fields.items()}
        data["memory"] = {k: v for k, v in data["memory"].items() if k in mem}
    if isinstance(data.get("problems"), list):
        data["problems"] = [str(p)[:2048] for p in data["problems"][:PREFLIGHT_MAX_PROBLEMS]]
    for verdict in ("fits", "gpuMemory"):  # the operator's to decide, not the pod's
        data.pop(verdict, None)
    try:
        return PreflightResult.model_validate(data, by_alias=True, by_name=False)
    except ValidationError:
        return None


def data_valid(result: PreflightResult) -> bool:
    return result.bad_records == 0 and not result.problems


def _judged(result: PreflightResult, spec: FineTuneJobSpec) -> PreflightResult:
    """``result`` with the operator's verdict on the fit: the GPU memory it was checked against (from the
    spec: gpuMemory, or an nvidia.com/gpu.memory node selector) and whether memory.total fits in it
    (:func:`~.api.memory.fits_total`, the comparison ``finetune plan`` makes too)."""
    fits = None if result.memory is None else fits_total(result.memory.total, spec)
    return result.model_copy(update={"gpu_memory": spec.resources.gpu_memory_bytes, "fits": fits})


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def memory_breakdown(result: PreflightResult) -> str:
    """The estimate in words: the total per GPU, its parts, and the GPU memory it was checked against."""
    m = result.memory
    if m is None:
        return f"no memory estimate: {result.memory_note or 'the model is not supported by the estimator'}"
    ranks = f" of {m.world_size} rank{'s' if m.world_size != 1 else ''}" if m.world_size else ""
    text = (
        f"estimated {_gib(m.total)} per GPU{ranks} (weights {_gib(m.weights)}, gradients {_gib(m.gradients)}, "
        f"optimizer {_gib(m.optimizer)}, activations {_gib(m.activations)}, overhead {_gib(m.overhead)})"
    )
    if result.gpu_memory is not None:
        verdict = "fits in" if result.fits else "does not fit in"
        text += f" {verdict} {_gib(result.gpu_memory)} of GPU memory"
    return text


def problems_message(result: PreflightResult | None, fallback: str = "") -> str:
    if result is None or not (result.problems or result.bad_records):
        return fallback or "the preflight found invalid data"
    count = f"{result.bad_records} bad record{'s' if result.bad_records != 1 else ''}"
    return "\n".join([f"the preflight found invalid data ({count}):", *result.problems])[:MAX_MESSAGE]


def _data_summary(result: PreflightResult) -> str:
    parts = [f"{result.train_records or 0} training and {result.eval_records or 0} evaluation records, none bad"]
    if result.token_length_p50 is not None and result.token_length_max is not None:
        names, values = ["p50"], [f"{result.token_length_p50:g}"]
        if result.token_length_p95 is not None:
            names.append("p95")
            values.append(f"{result.token_length_p95:g}")
        names.append("max")
        values.append(str(result.token_length_max))
        parts.append(f"tokens per sample {'/'.join(names)} {'/'.join(values)}")
    if result.truncated_fraction is not None:
        parts.append(f"{result.truncated_fraction:.1%} truncated at maxSeqLength")
    if result.steps_per_epoch is not None:
        parts.append(f"{result.steps_per_epoch} steps per epoch")
    if result.cache_uri:
        parts.append(f"tokenized cache {'reused' if result.cache_hit else 'written'}: {result.cache_uri}")
    return "; ".join(parts)


def _preflight_conditions(
    previous: list[Condition], result: PreflightResult, spec: FineTuneJobSpec, generation: int, now: datetime
) -> list[Condition]:
    """DataValid and FitsInMemory from status.preflight, by the API conventions (lastTransitionTime moves
    only when the status flips)."""
    by_type = {c.type: c for c in previous}
    data: tuple[ConditionStatus, str, str] = (
        ("True", "Valid", _data_summary(result))
        if data_valid(result)
        else ("False", REASON_INVALID_DATA, problems_message(result))
    )
    fit: tuple[ConditionStatus, str, str]
    if result.memory is None:
        fit = ("Unknown", "NoEstimate", memory_breakdown(result))
    elif result.fits is None:
        fit = (
            "Unknown",
            "GPUMemoryUnknown",
            memory_breakdown(result) + "; set spec.resources.gpuMemory to check it against the GPUs' memory",
        )
    elif result.fits:
        fit = ("True", "Fits", memory_breakdown(result))
    else:
        allowed = (
            " (spec.preflight.allowWillNotFit: the gang starts anyway)" if spec.preflight.allow_will_not_fit else ""
        )
        fit = ("False", REASON_WILL_NOT_FIT, memory_breakdown(result) + allowed)
    out = []
    for kind, (status, reason, message) in ((CONDITION_DATA_VALID, data), (CONDITION_FITS_IN_MEMORY, fit)):
        out.append(_condition(kind, status, reason, message, by_type.get(kind), now, generation))
    return out


def _preflight_pending(
    previous: list[Condition], reason: str, message: str, generation: int, now: datetime
) -> Condition:
    """DataValid while the preflight has no result: Unknown, saying what the preflight is doing (running,
    waiting to try again) or why it ended without one; False when its pod said the data is invalid."""
    status: Literal["False", "Unknown"] = "False" if reason == REASON_INVALID_DATA else "Unknown"
    old = next((c for c in previous if c.type == CONDITION_DATA_VALID), None)
    return Condition(
        type=CONDITION_DATA_VALID,
        status=status,
        reason=condition_reason(reason),
        message=message[:MAX_MESSAGE],
        last_transition_time=old.last_transition_time if old is not None and old.status == status else to_second(now),
        observed_generation=generation,
    )


@dataclass
class _Outcome:
    """How a preflight attempt ended, as far as the observations tell."""

    kind: Literal["running", "result", "permanent", "retriable"]
    result: PreflightResult | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    failure: FailureInfo | None = None


def _preflight_outcome(job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime) -> _Outcome:
    """The outcome of one preflight attempt from its Job and pod. A result (exit 0 or 3, the termination
    message a PreflightResult) is read as soon as the pod terminated; another failure is judged once the
    Job failed too (its reason tells a deadline from a crash)."""
    done = sorted(
        (p for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")),
        key=lambda p: str(p["metadata"].get("name")),
    )
    for pod in done:
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if not terminated:
                continue
            code, text = terminated.get("exitCode"), str(terminated.get("message") or "")
            result = parse_preflight_result(text) if code in (EXIT_OK, EXIT_INVALID_DATA, EXIT_INVALID_CONFIG) else None
            failure = FailureInfo(
                exit_code=code,
                reason=(EXIT_REASONS.get(code) or terminated.get("reason") or "Error")[:MAX_REASON],
                message=text[-MAX_MESSAGE:],
                time=to_second(parse_time(terminated.get("finishedAt")) or now),
            )
            if code == EXIT_OK and result is not None:
                return _Outcome("result", result=result, exit_code=code)
            if code == EXIT_INVALID_DATA:
                failure.message = problems_message(result, text)[-MAX_MESSAGE:]
                return _Outcome(
                    "result" if result else "permanent", result, code, REASON_INVALID_DATA, failure.message, failure
                )
            if code == EXIT_INVALID_CONFIG:
                detail = "; ".join(result.problems) if result and result.problems else text
                return _Outcome(
                    "permanent", None, code, "InvalidSpec", f"the preflight refused the config: {detail}", failure
                )
            if code == EXIT_OK:
                message = f"the preflight exited 0 without a readable result in its termination message: {text[:500]!r}"
                return _Outcome("permanent", None, code, "PreflightFailed", message, failure)
            if job is not None and not job_condition(job, "Failed"):
                return _Outcome("running")  # the Job has not failed yet: its reason decides
            return _judge_failed_job(job, failure)
        if status.get("reason") and (job is None or job_condition(job, "Failed")):
            # Evicted, say: no container terminated. The Job's failure time, where known, paces the retry.
            failure = FailureInfo(
                reason=str(status["reason"])[:MAX_REASON],
                message=str(status.get("message") or "")[-MAX_MESSAGE:],
                time=_failed_at(job),
            )
            return _judge_failed_job(job, failure)
    if job is not None and (failed := job_condition(job, "Failed")):
        failure = FailureInfo(
            reason=str(failed.get("reason") or "Failed")[:MAX_REASON],
            message=str(failed.get("message") or "")[-MAX_MESSAGE:],
            time=_failed_at(job),
        )
        return _judge_failed_job(job, failure)
    if job is not None and job_condition(job, "Complete"):
        failure = FailureInfo(reason="ResultLost", message="the preflight pod was gone before its result was read")
        return _Outcome("retriable", failure=failure, reason="ResultLost", message=failure.message)
    return _Outcome("running")


def _failed_at(job: dict[str, Any] | None) -> datetime | None:
    failed = job_condition(job, "Failed") if job is not None else None
    time = parse_time(failed.get("lastTransitionTime")) if failed is not None else None
    return to_second(time) if time is not None else None


def _judge_failed_job(job: dict[str, Any] | None, failure: FailureInfo) -> _Outcome:
    failed = job_condition(job, "Failed") if job is not None else None
    if failed is not None and failed.get("reason") == "DeadlineExceeded":
        message = (
            "the preflight ran longer than spec.preflight.activeDeadlineSeconds "
            f"(raise it for a large dataset): {failed.get('message') or ''}"
        ).rstrip(": ")
        return _Outcome("permanent", None, failure.exit_code, "PreflightDeadlineExceeded", message, failure)
    return _Outcome("retriable", failure=failure, reason=failure.reason, message=failure.message)


def _preflight_gate(obs: Observed, out: Plan) -> Gate | None:
    """The preflight, before the first gang (spec.preflight.mode auto): None once its result is in
    status.preflight and lets the gang start; otherwise where the job stands, with the preflight Job to
    create (``out.create_preflight``) or the time to look again (``out.requeue_after``).

    Level-triggered: the attempts are the preflight Jobs (and pods) that exist, the result is
    status.preflight. A restarted operator sees the same Jobs, so it neither starts a second preflight
    nor skips one whose result it has not stored."""
    spec, now, prev = obs.ftj.spec, obs.now, obs.status
    last_failure = prev.last_failure
    if prev.preflight is not None:
        result = _judged(prev.preflight, spec)
        if not data_valid(result):
            return "Failed", REASON_INVALID_DATA, problems_message(result), last_failure, result
        if result.fits is False and not spec.preflight.allow_will_not_fit:
            return "Failed", REASON_WILL_NOT_FIT, memory_breakdown(result), last_failure, result
        return None
    jobs = {preflight_attempt_of(j): j for j in obs.jobs if is_preflight(j)}
    pods_by_attempt: dict[int, list[dict[str, Any]]] = {}
    for p in obs.pods:
        if is_preflight(p):
            pods_by_attempt.setdefault(preflight_attempt_of(p), []).append(p)
    attempts = sorted(set(jobs) | set(pods_by_attempt))
    suspended = spec.run_policy.suspend
    if not attempts:
        if suspended:
            return "Suspended", "Suspended", "runPolicy.suspend is true (the preflight has not run)", last_failure, None
        out.create_preflight = 0
        return (
            "Pending",
            "PreflightRunning",
            "preflight attempt 0: checking the data and the memory fit on CPU",
            last_failure,
            None,
        )
    attempt = attempts[-1]
    outcome = _preflight_outcome(jobs.get(attempt), pods_by_attempt.get(attempt, []), now)
    if outcome.kind == "running":
        message = f"preflight attempt {attempt}: checking the data and the memory fit on CPU"
        if suspended:  # a preflight that has started finishes (it holds no GPU); none starts after it
            return "Suspended", "Suspended", f"runPolicy.suspend is true ({message})", last_failure, None
        return "Pending", "PreflightRunning", message, last_failure, None
    if outcome.kind == "result":
        assert outcome.result is not None
        result = _judged(outcome.result, spec)
        failure = outcome.failure or last_failure
        if outcome.exit_code == EXIT_INVALID_DATA or not data_valid(result):
            return "Failed", REASON_INVALID_DATA, problems_message(result), failure, result
        if result.fits is False and not spec.preflight.allow_will_not_fit:
            return "Failed", REASON_WILL_NOT_FIT, memory_breakdown(result), failure, result
        out.events.append(("Normal", "PreflightPassed", f"{_data_summary(result)}; {memory_breakdown(result)}"[:1024]))
        out.requeue_after = 0.5  # the next reconcile, from the stored result, creates the gang
        return "Pending", "PreflightPassed", "the preflight passed: creating the training gang", failure, result
    if outcome.kind == "permanent":
        return "Failed", outcome.reason, outcome.message, outcome.failure or last_failure, None
    failure = outcome.failure
    assert failure is not None
    hint = " (raise spec.preflight.resources.memory)" if failure.reason == "OOMKilled" else ""
    if attempt + 1 >= PREFLIGHT_MAX_ATTEMPTS:
        message = f"the preflight failed {attempt + 1} times; the last time: {failure.reason}{hint}: {failure.message}"
        return "Failed", "PreflightFailed", message.rstrip(": "), failure, None
    if suspended:
        return (
            "Suspended",
            "Suspended",
            f"runPolicy.suspend is true (preflight attempt {attempt} failed: {failure.reason})",
            failure,
            None,
        )
    # Paced from when the attempt failed (a stable time, so that every reconcile agrees); unknown: now.
    wait = PREFLIGHT_BACKOFF_SECONDS * 2**attempt
    due = (failure.time + timedelta(seconds=wait)) if failure.time is not None else now
    message = f"preflight attempt {attempt} failed ({failure.reason}{hint}); attempt {attempt + 1}"
    if now >= due:
        out.create_preflight = attempt + 1
        return "Pending", "PreflightRetrying", f"{message} started", failure, None
    out.requeue_after = (due - now).total_seconds()
    return "Pending", "PreflightRetrying", f"{message} at {timestamp(due)}", failure, None


#: How often a job waiting for another FineTuneJob looks at it again (its own events do not wake this one).
DEPENDENCY_POLL_SECONDS = 10.0
Verdict = tuple[Literal["ready", "waiting", "failed"], str]


def job_references_of(spec: Mapping[str, Any]) -> list[str]:
    """The FineTuneJobs a raw spec (another job's, unvalidated) takes models from."""
    task = spec.get("task") or {}
    uris = [
        (spec.get("model") or {}).get("uri"),
        (task.get("rl") or {}).get("rewardModel"),
        (task.get("dpo") or {}).get("referenceModel"),
        (task.get("distill") or {}).get("teacher"),
    ]
    prefix = f"{JOB_URI_SCHEME}://"
    return [u.removeprefix(prefix) for u in uris if isinstance(u, str) and u.startswith(prefix)]


def _cycle(name: str, start: str, neighbours: Mapping[str, Mapping[str, Any]]) -> list[str] | None:
    """The chain of references from ``start`` back to ``name``, if there is one."""
    path, seen = [start], {start}

    def walk(job: str) -> bool:
        for nxt in job_references_of((neighbours.get(job) or {}).get("spec") or {}):
            if nxt == name:
                path.append(nxt)
                return True
            if nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                if walk(nxt):
                    return True
                path.pop()
        return False

    return path if start == name or walk(start) else None


def resolve_dependency(field_name: str, job: str, obs: Observed) -> Dependency | Verdict:
    """The ``ftj://JOB`` model of ``field_name`` resolved from JOB's status.artifacts, or why it is not
    (still waiting for it, or it will never be)."""
    name = obs.ftj.metadata.name
    cycle = _cycle(name, job, obs.neighbours)
    if cycle is not None:
        return "failed", f"{field_name}: ftj://{job} is a cycle of FineTuneJobs: {' -> '.join([name, *cycle])}"
    body = obs.neighbours.get(job)
    if body is None:
        return "waiting", f"{field_name}: waiting for FineTuneJob {job}, which does not exist in this namespace"
    status = body.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Failed":
        why = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Failed"), "")
        return "failed", f"{field_name}: FineTuneJob {job} failed ({why or 'Failed'})"
    if phase != "Succeeded":
        return "waiting", f"{field_name}: waiting for FineTuneJob {job} to succeed (it is {phase})"
    for artifact in status.get("artifacts") or []:
        if artifact.get("kind") in MODEL_ARTIFACT_KINDS:
            try:
                return Dependency(field=field_name, job=job, uri=artifact["uri"], sha256=artifact["sha256"])
            except (KeyError, ValidationError):
                break
    return "failed", (
        f"{field_name}: FineTuneJob {job} succeeded without a merged model in its status.artifacts "
        "(its spec.output.save must be merged or both, or its method full)"
    )


def _dependency_gate(obs: Observed, out: Plan) -> tuple[Phase, str, str] | None:
    """Before the job starts: its ``ftj://`` models resolved (into ``out.dependencies``; None returned),
    or the phase, reason and message of waiting for them or failing for them."""
    resolved, waiting = [], []
    for field_name, job in sorted(obs.ftj.spec.job_references().items()):
        verdict = resolve_dependency(field_name, job, obs)
        if isinstance(verdict, Dependency):
            resolved.append(verdict)
        elif verdict[0] == "failed":
            return "Failed", REASON_DEPENDENCY_FAILED, verdict[1]
        else:
            waiting.append(verdict[1])
    if waiting:
        out.requeue_after = DEPENDENCY_POLL_SECONDS
        return "Pending", REASON_WAITING_FOR_JOB, "; ".join(waiting)
    out.dependencies = resolved
    return None


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

    preflight = prev.preflight
    gang_jobs = [j for j in obs.jobs if not is_preflight(j)]
    gang_pods = [p for p in obs.pods if not is_preflight(p)]
    current_name = job_name(name, restarts)
    current = next((j for j in gang_jobs if j["metadata"]["name"] == current_name), None)
    out.delete_jobs = [j["metadata"]["name"] for j in gang_jobs if attempt_of(j) < restarts]
    pods = [p for p in gang_pods if p["metadata"].get("labels", {}).get(LABEL_ATTEMPT) == str(restarts)]
    # The gang exists or existed: a Job, a restart, a phase only a gang reaches, or the Created condition
    # (a job that failed or was suspended before its gang, in the preflight, has none).
    created = (
        current is not None
        or bool(gang_jobs)
        or restarts > 0
        or phase in ("Running", "Restarting", "Succeeded")
        or any(c.type == "Created" and c.status == "True" for c in prev.conditions)
    )
    preflight_conditions = [c for c in prev.conditions if c.type in PREFLIGHT_CONDITION_TYPES]
    if created and preflight is None:
        # A preflight still running once the gang exists without its result (the mode changed to skip)
        # has nothing left to do. (The one whose result is stored has finished, whatever its Job's status
        # says yet; one that failed the job keeps its pod and log until its TTL.)
        out.delete_jobs += [j["metadata"]["name"] for j in obs.jobs if is_preflight(j) and not _finished(j)]

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
        # Models from other FineTuneJobs: resolved once, before anything starts, and kept in the status
        # (what the trainer config is built from, whatever becomes of those jobs later).
        dependency_gate = None
        if spec.job_references():
            if {d.field for d in prev.dependencies} == set(spec.job_references()):
                out.dependencies = list(prev.dependencies)
            else:
                dependency_gate = _dependency_gate(obs, out)
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
        elif current is None and (lingering := _lingering_pods(gang_pods, restarts, obs.nodes)):
            # The previous gang is still stopping (saving a checkpoint on SIGTERM, say): start the next
            # one only when it is gone, so it resumes from that checkpoint and does not share GPUs.
            phase, reason = "Restarting", last_failure.reason if last_failure else "Restarting"
            message = f"waiting for {lingering} pod(s) of the previous attempt to stop"
            out.requeue_after = 2.0
        elif current is None and not created and dependency_gate is not None:
            phase, reason, message = dependency_gate
        elif current is None and not created and spec.preflight.mode == "auto" and (gate := _preflight_gate(obs, out)):
            phase, reason, message, last_failure, preflight = gate
            if preflight is None:
                preflight_conditions = [_preflight_pending(prev.conditions, reason, message, obs.generation, now)]
        elif current is None and spec.run_policy.suspend and spec.run_policy.queue_name:
            # Kueue would admit (unsuspend) a queued Job as soon as it is created: it is created when the
            # job is resumed.
            phase, reason = "Suspended", "Suspended"
            message = "runPolicy.suspend is true; the gang is submitted to Kueue when it is false"
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
        if preflight is not None:
            preflight = _judged(preflight, spec)
            preflight_conditions = _preflight_conditions(prev.conditions, preflight, spec, obs.generation, now)
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
            conditions=_conditions(prev.conditions, phase, reason, message, obs.generation, now, created)
            + preflight_conditions
            + _stalled_condition(prev.conditions, out.stalled, phase, obs.generation, now)
            + _queued_condition(prev.conditions, spec, phase, reason, message, obs.generation, now)
            + _dependency_condition(prev.conditions, spec, out.dependencies, reason, message, obs.generation, now),
            start_time=to_second(start_time) if start_time else None,
            completion_time=to_second(completion_time) if completion_time else None,
            last_failure=last_failure,
            preflight=preflight,
            provenance=_provenance(prev.provenance, gang_pods),
            dependencies=out.dependencies,
        )
    )
    if not out.dependencies:
        out.status["dependencies"] = None  # written only for a job that has some
    # Only the operator's fields of status.provenance, and never a null: the trainer's stay as they are.
    provenance = out.status.pop("provenance")
    if provenance is not None:
        keys = [Provenance.model_fields[name].alias or name for name in PROVENANCE_OPERATOR_FIELDS]
        out.status["provenance"] = {k: provenance[k] for k in keys if k in provenance}
    if phase != prev.phase:
        kind = "Warning" if phase in ("Failed", "Restarting") else "Normal"
        out.events.append((kind, reason, f"{phase}: {message}" if message else phase))
    elif out.stalled is not None and not any(
        c.type == CONDITION_STALLED and c.status == "True" for c in prev.conditions
    ):
        out.events.append(("Warning", REASON_STALLED, out.stalled))  # runPolicy.onStall none: it keeps running
    return out


def _dependency_condition(
    previous: list[Condition],
    spec: FineTuneJobSpec,
    dependencies: list[Dependency],
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """Condition DependencyReady of a job with ``ftj://`` models: True once all are resolved; False,
    with the phase's reason (WaitingForJob, DependencyFailed) and message, until then."""
    if not spec.job_references():
        return []
    old = next((c for c in previous if c.type == CONDITION_DEPENDENCY_READY), None)
    if len(dependencies) == len(spec.job_references()):
        done = "; ".join(f"{d.field}: ftj://{d.job} is {d.uri}" for d in dependencies)
        return [_condition(CONDITION_DEPENDENCY_READY, "True", "Resolved", done, old, now, generation)]
    if reason not in (REASON_WAITING_FOR_JOB, REASON_DEPENDENCY_FAILED):  # e.g. deleted before resolving
        reason = REASON_WAITING_FOR_JOB
    return [_condition(CONDITION_DEPENDENCY_READY, "False", reason, message, old, now, generation)]


def _stalled_condition(
    previous: list[Condition], stalled: str | None, phase: str, generation: int, now: datetime
) -> list[Condition]:
    """Condition Stalled: True while the running gang is stalled (:func:`stall_of`), False once it
    reports progress again or its attempt has ended; absent until a first stall."""
    old = next((c for c in previous if c.type == CONDITION_STALLED), None)
    if stalled is not None:
        return [_condition(CONDITION_STALLED, "True", "NoProgress", stalled, old, now, generation)]
    if old is None:
        return []
    reason = "Progressing" if phase == "Running" else condition_reason(phase)
    return [_condition(CONDITION_STALLED, "False", reason, "", old, now, generation)]


def _queued_condition(
    previous: list[Condition],
    spec: FineTuneJobSpec,
    phase: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """Condition Queued of a job submitted to Kueue (``runPolicy.queueName``): True while Kueue holds
    its gang (reason Queued, or Preempted while an evicted gang stops), with Kueue's message; False
    once admitted (reason: the phase). Absent until the job is first queued."""
    old = next((c for c in previous if c.type == CONDITION_QUEUED), None)
    if not spec.run_policy.queue_name:
        return []
    if reason in (REASON_QUEUED, REASON_PREEMPTED) and phase == "Pending":
        return [_condition(CONDITION_QUEUED, "True", reason, message, old, now, generation)]
    if old is None:
        return []
    return [_condition(CONDITION_QUEUED, "False", condition_reason(phase), "", old, now, generation)]


def _restart(
    obs: Observed, name: str, restarts: int, failure: FailureInfo, out: Plan, message: str
) -> tuple[Phase, str, str, datetime | None, int, FailureInfo | None]:
    """A retriable failure of attempt ``restarts`` (its Job ``name``): the next attempt, while
    ``runPolicy.backoffLimit`` allows one; Failed (BackoffLimitExceeded) once it does not."""
    limit = obs.ftj.spec.run_policy.backoff_limit
    if restarts < limit:
        out.delete_jobs.append(name)
        return "Restarting", failure.reason, message, None, restarts + 1, failure
    message = f"{restarts} restarts used (runPolicy.backoffLimit {limit}); last failure: {failure.reason}"
    return "Failed", "BackoffLimitExceeded", message, obs.now, restarts, failure


def queued(queue: str, workload: Mapping[str, Any] | None, pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(reason, message) of a gang that Kueue holds suspended: ``Preempted`` while the pods of a gang
    Kueue evicted are still stopping (saving their step), then ``Queued``, with Kueue's own words."""
    if workload is None:
        return REASON_QUEUED, f"waiting for Kueue to admit the gang to queue {queue} (no Workload for it yet)"
    evicted = workload_condition(workload, "Evicted")
    stopping = sum(1 for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
    if evicted is not None and stopping:
        why = f"{evicted.get('reason')}: {evicted.get('message')}"
        return REASON_PREEMPTED, f"Kueue evicted the gang ({why}); {stopping} pod(s) saving and stopping"
    conditions = (workload.get("status") or {}).get("conditions") or []
    pending = next((c for c in conditions if c.get("type") == "QuotaReserved" and c.get("status") == "False"), None)
    message = f"waiting for admission by queue {queue}"
    if pending is not None and pending.get("message"):
        message += f": {pending['message']}"
    if evicted is not None:
        message += f" (evicted before: {evicted.get('reason')}: {evicted.get('message')})"
    return REASON_QUEUED, message


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
        return _restart(
            obs, name, restarts, failure, out, f"attempt {restarts} failed ({failure.reason}); restarting the gang"
        )
    lost = node_loss(obs, pods, out)
    if lost is not None:
        failure = FailureInfo(reason=REASON_NODE_LOST, message=lost, time=to_second(obs.now))
        message = f"attempt {restarts} lost a node; restarting the gang from the newest checkpoint: {lost}"
        return _restart(obs, name, restarts, failure, out, message)
    job_suspended = bool((current.get("spec") or {}).get("suspend"))
    want_suspend = spec.run_policy.suspend
    queue = spec.run_policy.queue_name
    workload = obs.workloads.get(name)
    if queue:
        # Kueue owns a queued Job's suspend: it is suspended and resumed through its Workload.
        if workload is not None and bool(workload["spec"]["active"]) == want_suspend:
            out.set_workload_active = (workload["metadata"]["name"], not want_suspend)
    elif job_suspended != want_suspend:
        out.set_suspend = (name, want_suspend)
    if want_suspend:
        message = "runPolicy.suspend is true" + ("; its Kueue Workload is deactivated" if queue else "")
        return "Suspended", "Suspended", message, None, restarts, last_failure
    if job_suspended and queue:
        reason, message = queued(queue, workload, pods)
        return "Pending", reason, message, None, restarts, last_failure
    running = _running_pods(pods)
    if running >= nodes:
        stalled = stall_of(obs, current, out)
        out.stalled = stalled
        if stalled is None or spec.run_policy.on_stall == "none":
            return "Running", "AllPodsRunning", f"{running}/{nodes} pods running", None, restarts, last_failure
        failure = FailureInfo(reason=REASON_STALLED, message=stalled, time=to_second(obs.now))
        if spec.run_policy.on_stall == "fail":
            return "Failed", REASON_STALLED, stalled, obs.now, restarts, failure
        message = f"attempt {restarts} stalled; restarting the gang from the newest checkpoint: {stalled}"
        return _restart(obs, name, restarts, failure, out, message)
    phase: Phase = "Restarting" if restarts else "Pending"
    reason = (last_failure.reason if last_failure else "Restarting") if restarts else "PodsStarting"
    return phase, reason, f"{running}/{nodes} pods running", None, restarts, last_failure
