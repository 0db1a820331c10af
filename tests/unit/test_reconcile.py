"""The reconcile plan: observed Job and pods → status, actions and events (pure, no cluster)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator import __version__
from finetune_operator.api.v1alpha1 import FineTuneJobStatus
from finetune_operator.api.validation import validate_object
from finetune_operator.reconcile import (
    Observed,
    Plan,
    condition_reason,
    observed_job,
    observed_node,
    observed_pod,
    observed_workload,
    plan,
    read_progress,
    read_status,
    timestamp,
)

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def ftj(**run_policy: Any) -> Any:
    """A 2-node job whose gang starts at once (spec.preflight.mode skip): the gang's lifecycle."""
    return validate_object(
        {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "llm"},
            "spec": {
                "model": {"uri": "org/m"},
                "data": {"train": {"uri": "t.jsonl"}},
                "training": {"maxSteps": 10},
                "distributed": {"nodes": 2},
                "runPolicy": run_policy,
                "preflight": {"mode": "skip"},
            },
        }
    )


def job(
    attempt: int,
    *,
    condition: str | None = None,
    reason: str = "",
    suspend: bool = False,
    created: datetime = NOW - timedelta(days=1),
) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason, "message": reason}]
        if condition == "Complete":
            status["completionTime"] = timestamp(NOW - timedelta(seconds=5))
    status.setdefault("conditions", []).append({"type": "SuccessCriteriaMet", "status": "False", "reason": "x"})
    return {
        "metadata": {
            "name": f"llm-a{attempt}",
            "labels": {"finetune.io/attempt": str(attempt)},
            "uid": "job-uid",
            "creationTimestamp": timestamp(created),
            "managedFields": [{"manager": "finetune-operator"}],
        },
        "spec": {"suspend": suspend, "completions": 2, "template": {"spec": {"containers": [{"name": "trainer"}]}}},
        "status": {**status, "active": 2, "startTime": timestamp(NOW)},
    }


def pod(
    attempt: int,
    index: int,
    phase: str,
    *,
    exit_code: int | None = None,
    reason: str = "Error",
    message: str = "",
    disrupted: bool = False,
    disruption: str = "PreemptionByScheduler",
    node: str = "node-0",
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason,
                        "message": message,
                        "finishedAt": timestamp(NOW),
                    }
                },
            }
        ]
    else:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "state": {"running": {"startedAt": timestamp(NOW)}},
                "imageID": f"registry.example/trainer@sha256:{'ab' * 32}",
            }
        ]
    status["conditions"] = [{"type": "Ready", "status": "True", "lastTransitionTime": timestamp(NOW)}]
    if disrupted:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption})
    return {
        "metadata": {
            "name": f"llm-a{attempt}-{index}-x",
            "labels": {"finetune.io/attempt": str(attempt), "batch.kubernetes.io/job-completion-index": str(index)},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index), "other": "x" * 100},
            "ownerReferences": [{"kind": "Job", "name": f"llm-a{attempt}"}],
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "trainer", "image": "trainer:1"}],
            # What the DefaultTolerationSeconds admission plugin adds to every pod, unless told otherwise.
            "tolerations": tolerations
            if tolerations is not None
            else [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            ],
        },
        "status": {**status, "podIP": "10.0.0.1", "hostIP": "10.0.0.2"},
    }


def run(
    spec: Any,
    status: dict[str, Any],
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    now: datetime = NOW,
    nodes: dict[str, dict[str, Any]] | None = None,
    workloads: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
) -> Plan:
    previous, problems = read_status(status)
    assert problems == []
    progress = read_progress(status)
    # Nodes and Workloads are always what observed_node/observed_workload keep of them (the operator's
    # indexes hold nothing else).
    cut_nodes = {name: observed_node(n) for name, n in nodes.items()} if nodes is not None else None
    cut_workloads = {w["job"]: w for w in map(observed_workload, workloads)}
    full = plan(
        Observed(
            ftj=spec,
            generation=3,
            status=previous,
            jobs=jobs,
            pods=pods,
            now=now,
            progress=progress,
            nodes=cut_nodes,
            workloads=cut_workloads,
        )
    )
    # The operator keeps only what observed_job/observed_pod cut out of what it watches: every plan
    # must come out the same from those as from the whole objects.
    cut = [observed_job(j) for j in jobs], [observed_pod(p) for p in pods]
    again = Observed(
        ftj=spec,
        generation=3,
        status=previous,
        jobs=cut[0],
        pods=cut[1],
        now=now,
        progress=progress,
        nodes=cut_nodes,
        workloads=cut_workloads,
    )
    assert plan(again) == full
    # The operator writes only its own fields, as the API's typed status has them; of status.provenance,
    # only what it derives from the pods, and only once there is something (never a null over the trainer's).
    assert set(full.status) - {"provenance"} == {
        "phase",
        "restarts",
        "observedGeneration",
        "conditions",
        "startTime",
        "completionTime",
        "lastFailure",
        "preflight",
        "dependencies",
    }
    assert set(full.status.get("provenance") or {"nodes": 1}) <= {"image", "nodes", "operatorVersion"}
    FineTuneJobStatus.parse_manifest({k: v for k, v in full.status.items() if v is not None})
    return full


def cond(p: Plan, kind: str) -> dict[str, Any]:
    return next(c for c in p.status["conditions"] if c["type"] == kind)


def test_first_reconcile_creates_attempt_zero() -> None:
    p = run(ftj(), {}, [], [])
    assert p.create_job == 0 and p.status["phase"] == "Pending" and p.status["restarts"] == 0
    assert cond(p, "Created")["status"] == "True" and p.status["observedGeneration"] == 3
    assert p.events == [("Normal", "Creating", "Pending: creating the training gang")]


def test_all_pods_running_is_running_and_stable() -> None:
    first = run(ftj(), {"phase": "Pending"}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    assert first.status["phase"] == "Running" and first.status["startTime"] == timestamp(NOW)
    assert first.create_job is None and not first.delete_jobs
    again = run(
        ftj(), first.status, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")], now=NOW + timedelta(minutes=5)
    )
    # Level-triggered: the same observations give the same status; no transition, no event.
    assert again.status == {**first.status}
    assert again.events == []


def test_one_pod_running_is_pending() -> None:
    p = run(ftj(), {}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Pending")])
    assert p.status["phase"] == "Pending" and p.status["startTime"] is None
    assert p.events == [("Normal", "PodsStarting", "Pending: 1/2 pods running")]


def test_complete_job_succeeds() -> None:
    running = run(ftj(), {}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    p = run(ftj(), running.status, [job(0, condition="Complete")], [])
    assert p.status["phase"] == "Succeeded"
    assert p.status["completionTime"] == timestamp(NOW - timedelta(seconds=5))
    assert cond(p, "Succeeded")["status"] == "True" and cond(p, "Running")["status"] == "False"


def test_retriable_failure_restarts_the_gang_then_creates_the_next_attempt() -> None:
    failed = [pod(0, 0, "Failed", exit_code=1, message="RuntimeError: NCCL timeout"), pod(0, 1, "Running")]
    p = run(
        ftj(backoffLimit=2), {"phase": "Running"}, [job(0, condition="Failed", reason="BackoffLimitExceeded")], failed
    )
    assert p.status["phase"] == "Restarting" and p.status["restarts"] == 1
    assert p.delete_jobs == ["llm-a0"] and p.create_job is None
    assert p.status["lastFailure"]["exitCode"] == 1
    assert "NCCL timeout" in p.status["lastFailure"]["message"]
    assert p.events[0][0] == "Warning"
    # The old gang still has a running pod: wait for it before starting attempt 1.
    waiting = run(ftj(backoffLimit=2), p.status, [], failed)
    assert waiting.create_job is None and waiting.requeue_after == 2.0
    gone = run(ftj(backoffLimit=2), p.status, [], [])
    assert gone.create_job == 1 and gone.status["phase"] == "Restarting"


def test_preemption_and_oom_are_named() -> None:
    preempted = run(
        ftj(),
        {"phase": "Running"},
        [job(0, condition="Failed", reason="BackoffLimitExceeded")],
        [pod(0, 0, "Failed", exit_code=85)],
    )
    assert preempted.status["lastFailure"]["reason"] == "Preempted"
    assert cond(preempted, "Restarting")["reason"] == "Preempted"
    evicted = run(
        ftj(),
        {"phase": "Running"},
        [job(0, condition="Failed", reason="BackoffLimitExceeded")],
        [pod(0, 1, "Failed", exit_code=137, reason="Error", disrupted=True)],
    )
    assert evicted.status["lastFailure"]["reason"] == "Preempted"
    oom = run(
        ftj(),
        {"phase": "Running"},
        [job(0, condition="Failed", reason="BackoffLimitExceeded")],
        [pod(0, 0, "Failed", exit_code=137, reason="OOMKilled")],
    )
    assert oom.status["lastFailure"]["reason"] == "OOMKilled"


def test_permanent_exit_code_fails_without_restart() -> None:
    p = run(
        ftj(),
        {"phase": "Running"},
        [job(0, condition="Failed", reason="PodFailurePolicy")],
        [pod(0, 0, "Failed", exit_code=3, message="train.jsonl:7: missing column 'completion'")],
    )
    assert p.status["phase"] == "Failed" and p.status["restarts"] == 0 and p.create_job is None
    failed = cond(p, "Failed")
    assert failed["reason"] == "InvalidData" and "train.jsonl:7" in failed["message"]


def test_backoff_exhausted_fails() -> None:
    p = run(
        ftj(backoffLimit=1),
        {"phase": "Restarting", "restarts": 1},
        [job(1, condition="Failed", reason="BackoffLimitExceeded")],
        [pod(1, 0, "Failed", exit_code=1)],
    )
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "BackoffLimitExceeded"


def test_deadline_exceeded_fails_and_deletes_the_job() -> None:
    status = {"phase": "Running", "startTime": timestamp(NOW - timedelta(seconds=120))}
    p = run(ftj(activeDeadlineSeconds=60), status, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    assert p.status["phase"] == "Failed" and cond(p, "Failed")["reason"] == "DeadlineExceeded"
    assert p.delete_jobs == ["llm-a0"]
    # The Job of a later attempt gets only the time that is left.
    fresh = run(
        ftj(activeDeadlineSeconds=600),
        {"phase": "Restarting", "restarts": 1, "startTime": timestamp(NOW - timedelta(seconds=100))},
        [],
        [],
    )
    assert fresh.create_job == 1 and fresh.active_deadline_seconds == 500


def test_ttl_deletes_the_finished_job() -> None:
    done = {"phase": "Succeeded", "completionTime": timestamp(NOW - timedelta(seconds=30)), "conditions": []}
    assert run(ftj(ttlSecondsAfterFinished=60), done, [], []).requeue_after == 30.0
    assert run(ftj(ttlSecondsAfterFinished=10), done, [], []).delete_ftj is True
    assert run(ftj(), done, [], []).delete_ftj is False


def test_suspend_and_resume() -> None:
    p = run(ftj(suspend=True), {"phase": "Running"}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    assert p.set_suspend == ("llm-a0", True) and p.status["phase"] == "Suspended"
    resumed = run(ftj(suspend=False), p.status, [job(0, suspend=True)], [])
    assert resumed.set_suspend == ("llm-a0", False) and resumed.status["phase"] == "Pending"
    assert cond(resumed, "Suspended")["status"] == "False"
    created_suspended = run(ftj(suspend=True), {}, [], [])
    assert created_suspended.create_job == 0 and created_suspended.status["phase"] == "Suspended"


def test_condition_transition_time_moves_only_on_a_flip() -> None:
    running = run(ftj(), {"phase": "Pending"}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    later = NOW + timedelta(hours=1)
    done = run(ftj(), running.status, [job(0, condition="Complete")], [], now=later)
    assert cond(done, "Created")["lastTransitionTime"] == cond(running, "Created")["lastTransitionTime"]
    assert cond(done, "Running")["lastTransitionTime"] == timestamp(later)


def test_the_trainers_fields_are_neither_read_nor_written() -> None:
    trainer = {
        "progress": {"step": 7, "totalSteps": 10, "updatedAt": timestamp(NOW)},
        "checkpoints": [{"step": 5, "uri": "s3://b/ckpt-5", "time": timestamp(NOW)}],
    }
    p = run(ftj(), {"phase": "Pending", **trainer}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    assert p.status["phase"] == "Running"
    assert "progress" not in p.status and "checkpoints" not in p.status and "artifacts" not in p.status


def test_provenance_names_the_image_by_digest_and_every_node_and_keeps_the_trainers_part() -> None:
    trainer_part = {"seed": 7, "accelerator": "cpu", "libraries": {"torch": "2.13.0"}}
    running = [pod(0, 0, "Running"), {**pod(0, 1, "Running"), "spec": {"nodeName": "node-1"}}]
    p = run(ftj(), {"phase": "Pending", "provenance": trainer_part}, [job(0)], running)
    assert p.status["provenance"] == {
        "image": f"registry.example/trainer@sha256:{'ab' * 32}",
        "nodes": ["node-0", "node-1"],
        "operatorVersion": __version__,
    }
    # The next attempt runs elsewhere: the nodes of the first stay recorded after its pods are gone.
    status = {"phase": "Restarting", "restarts": 1, "provenance": {**trainer_part, **p.status["provenance"]}}
    moved = {**pod(1, 0, "Running"), "spec": {"nodeName": "node-7"}}
    again = run(ftj(), status, [job(1)], [moved, pod(1, 1, "Running")])
    assert again.status["provenance"]["nodes"] == ["node-0", "node-1", "node-7"]
    # Nothing scheduled yet: no provenance in the patch at all (not a null that would clear the trainer's).
    assert "provenance" not in run(ftj(), {}, [], []).status


def progress_at(step: int, quiet: float, *, per_step: float = 1.0) -> dict[str, Any]:
    """The trainer's status.progress, last reported ``quiet`` seconds before NOW."""
    return {"step": step, "secondsPerStep": per_step, "updatedAt": timestamp(NOW - timedelta(seconds=quiet))}


RUNNING = [pod(0, 0, "Running"), pod(0, 1, "Running")]


def test_a_gang_quiet_past_the_stall_timeout_restarts_from_its_checkpoint() -> None:
    spec = ftj(stallTimeoutSeconds=600)
    busy = run(spec, {"phase": "Running", "progress": progress_at(40, 590)}, [job(0)], RUNNING)
    assert busy.status["phase"] == "Running" and not busy.delete_jobs
    assert busy.requeue_after == pytest.approx(11.0)  # woken when it would count as stalled
    assert "Stalled" not in types(busy)
    p = run(spec, {"phase": "Running", "progress": progress_at(40, 601)}, [job(0)], RUNNING)
    assert (p.status["phase"], p.status["restarts"], p.delete_jobs) == ("Restarting", 1, ["llm-a0"])
    stalled = cond(p, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "NoProgress"
    assert (
        "no progress for 601s: last step 40" in stalled["message"] and "stallTimeoutSeconds 600" in stalled["message"]
    )
    assert p.status["lastFailure"]["reason"] == "Stalled" and cond(p, "Restarting")["reason"] == "Stalled"
    assert ("Warning", "Stalled") in [(kind, reason) for kind, reason, _ in p.events]
    # The next attempt: the old progress is older than its Job, so starting up is not a stall...
    status = {**p.status, "progress": progress_at(40, 3000)}
    fresh = [pod(1, 0, "Running"), pod(1, 1, "Running")]
    again = run(spec, status, [job(1, created=NOW - timedelta(seconds=120))], fresh)
    assert again.status["phase"] == "Running" and cond(again, "Stalled")["status"] == "False"
    # ...and once it reports, its progress counts.
    status = {**again.status, "progress": progress_at(44, 30)}
    assert cond(run(spec, status, [job(1, created=NOW - timedelta(seconds=120))], fresh), "Stalled")["reason"] == (
        "Progressing"
    )


def test_the_stall_timeout_is_never_shorter_than_a_few_report_intervals() -> None:
    # 100 steps between reports of 20 s each: a report every 2010 s at most, so 5 of them before a stall.
    base = ftj(stallTimeoutSeconds=600)
    training = base.spec.training.model_copy(update={"log_every_steps": 100})
    spec = base.model_copy(update={"spec": base.spec.model_copy(update={"training": training})})
    quiet = run(spec, {"phase": "Running", "progress": progress_at(100, 9000, per_step=20)}, [job(0)], RUNNING)
    assert quiet.status["phase"] == "Running" and quiet.requeue_after == pytest.approx(5 * 2010 - 9000 + 1)
    late = run(spec, {"phase": "Running", "progress": progress_at(100, 10051, per_step=20)}, [job(0)], RUNNING)
    assert late.status["phase"] == "Restarting"


@pytest.mark.parametrize("policy", ["fail", "none"])
def test_on_stall_fail_or_none(policy: str) -> None:
    spec = ftj(stallTimeoutSeconds=600, onStall=policy)
    p = run(spec, {"phase": "Running", "progress": progress_at(7, 4000)}, [job(0)], RUNNING)
    assert cond(p, "Stalled")["status"] == "True"
    if policy == "fail":
        assert (p.status["phase"], cond(p, "Failed")["reason"], p.delete_jobs) == ("Failed", "Stalled", [])
    else:  # it keeps running, with a Warning event once
        assert p.status["phase"] == "Running" and not p.delete_jobs and p.status["restarts"] == 0
        assert [e[:2] for e in p.events] == [("Warning", "Stalled")]
        status = {**p.status, "progress": progress_at(7, 4100)}
        assert run(spec, status, [job(0)], RUNNING).events == []


def test_stalls_use_up_the_backoff_limit() -> None:
    spec = ftj(stallTimeoutSeconds=600, backoffLimit=1)
    p = run(spec, {"phase": "Running", "restarts": 1, "progress": progress_at(7, 4000)}, [job(1)], RUNNING_1)
    assert (p.status["phase"], cond(p, "Failed")["reason"]) == ("Failed", "BackoffLimitExceeded")


RUNNING_1 = [pod(1, 0, "Running"), pod(1, 1, "Running")]


def dependent(**task: Any) -> Any:
    """A job that trains on the merged model of FineTuneJob `cpt` (and ``task``'s references)."""
    return validate_object(
        {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "llm"},
            "spec": {
                "model": {"uri": "ftj://cpt"},
                "task": task or {"type": "sft"},
                "data": {"train": {"uri": "t.jsonl"}},
                "training": {"maxSteps": 10},
                "distributed": {"nodes": 2},
                "preflight": {"mode": "skip"},
            },
        }
    )


DIGEST = "ab" * 32


def neighbour(phase: str, *artifacts: str, refers_to: str | None = None, reason: str = "") -> dict[str, Any]:
    """Another FineTuneJob's body as the operator watches it."""
    status: dict[str, Any] = {"phase": phase}
    if reason:
        status["conditions"] = [{"type": phase, "status": "True", "reason": reason}]
    status["artifacts"] = [
        {"kind": kind, "uri": f"s3://out/cpt/{kind}", "sha256": DIGEST, "bytes": 1} for kind in artifacts
    ]
    return {"spec": {"model": {"uri": refers_to or "org/base"}}, "status": status}


def planned(
    spec: Any, status: dict[str, Any], neighbours: dict[str, Any], jobs: list[dict[str, Any]] | None = None
) -> Plan:
    previous, problems = read_status(status)
    assert problems == []
    observed = Observed(
        ftj=spec, generation=3, status=previous, jobs=jobs or [], pods=[], now=NOW, neighbours=neighbours
    )
    return plan(observed)


def test_a_job_waits_for_the_job_it_takes_its_model_from_then_starts_with_its_merged_model() -> None:
    for neighbours, why in (
        ({}, "waiting for FineTuneJob cpt, which does not exist in this namespace"),
        ({"cpt": neighbour("Running")}, "waiting for FineTuneJob cpt to succeed (it is Running)"),
    ):
        p = planned(dependent(), {}, neighbours)
        assert (p.status["phase"], p.create_job, p.requeue_after) == ("Pending", None, 10.0)
        ready = cond(p, "DependencyReady")
        assert (ready["status"], ready["reason"]) == ("False", "WaitingForJob")
        assert ready["message"] == f"spec.model.uri: {why}"
        assert p.status["dependencies"] is None and p.dependencies == []
    p = planned(dependent(), {}, {"cpt": neighbour("Succeeded", "adapter", "merged")})
    assert p.create_job == 0
    resolved = {"field": "spec.model.uri", "job": "cpt", "uri": "s3://out/cpt/merged", "sha256": DIGEST}
    assert p.status["dependencies"] == [resolved]
    assert cond(p, "DependencyReady")["status"] == "True"
    # Resolved once: the job keeps what it was built from, whatever becomes of the other job.
    again = planned(dependent(), {**p.status, "phase": "Pending"}, {}, [job(0)])
    assert again.status["dependencies"] == [resolved] and [d.uri for d in again.dependencies] == [resolved["uri"]]


@pytest.mark.parametrize(
    ("neighbours", "message"),
    [
        ({"cpt": neighbour("Failed", reason="OOMKilled")}, "spec.model.uri: FineTuneJob cpt failed (OOMKilled)"),
        ({"cpt": neighbour("Succeeded", "adapter")}, "succeeded without a merged model"),
        ({"cpt": neighbour("Pending", refers_to="ftj://llm")}, "a cycle of FineTuneJobs: llm -> cpt -> llm"),
    ],
    ids=["failed", "adapter-only", "cycle"],
)
def test_a_dependency_that_cannot_serve_fails_the_job(neighbours: dict[str, Any], message: str) -> None:
    p = planned(dependent(), {}, neighbours)
    assert (p.status["phase"], cond(p, "Failed")["reason"], p.create_job) == ("Failed", "DependencyFailed", None)
    assert message in cond(p, "Failed")["message"] and cond(p, "DependencyReady")["reason"] == "DependencyFailed"


def test_every_model_field_can_name_a_job() -> None:
    spec = dependent(type="rl", rl={"rewardModel": "ftj://rm", "numGenerations": 2})
    assert spec.spec.job_references() == {"spec.model.uri": "cpt", "spec.task.rl.rewardModel": "rm"}
    p = planned(spec, {}, {"cpt": neighbour("Succeeded", "merged"), "rm": neighbour("Running")})
    assert (
        p.status["phase"] == "Pending"
        and "spec.task.rl.rewardModel: waiting for FineTuneJob rm" in (cond(p, "DependencyReady")["message"])
    )


def test_a_status_an_older_version_wrote_is_read_as_far_as_it_goes() -> None:
    created = {"type": "Created", "status": "True", "reason": "JobCreated", "lastTransitionTime": timestamp(NOW)}
    old = {
        "phase": "Queued",  # not a phase any more
        "restarts": 1,
        "startTime": timestamp(NOW - timedelta(minutes=1)),
        "conditions": [created, {"type": "Running", "status": "True", "reason": "All pods running"}],
        "lastFailure": {"reason": "OOMKilled", "exitCode": 137, "node": "n1"},  # an unknown field
        "progress": {"step": "many"},  # the trainer's, not read
    }
    previous, problems = read_status(old)
    assert previous.restarts == 1 and previous.phase is None and previous.last_failure is None
    assert previous.start_time == NOW - timedelta(minutes=1)
    assert [c.type for c in previous.conditions] == ["Created"]
    assert len(problems) == 3 and any("status.phase" in m for m in problems), problems
    assert any("status.conditions[1]" in m for m in problems) and any("status.lastFailure" in m for m in problems)
    later = NOW + timedelta(minutes=5)
    p = plan(Observed(ftj=ftj(), generation=3, status=previous, jobs=[job(1)], pods=[], now=later))
    # The plan goes on from what it could read, and its status replaces what it could not.
    assert p.status["phase"] == "Restarting" and p.status["restarts"] == 1 and p.status["lastFailure"] is None
    assert cond(p, "Created")["lastTransitionTime"] == timestamp(NOW)
    assert read_status(p.status) == (read_status(p.status)[0], [])
    assert read_status(None)[0] == FineTuneJobStatus() and read_status({})[1] == []


def test_a_foreign_reason_becomes_a_condition_reason() -> None:
    assert condition_reason("OOMKilled") == "OOMKilled"
    assert condition_reason("container cannot-run") == "ContainerCannotRun"
    assert condition_reason("137: killed") == "Killed"
    assert condition_reason("!!!") == "Error"
    p = run(
        ftj(),
        {"phase": "Running"},
        [job(0, condition="Failed", reason="BackoffLimitExceeded")],
        [pod(0, 0, "Failed", exit_code=1, reason="Runtime error")],
    )
    assert p.status["lastFailure"]["reason"] == "Runtime error"
    assert cond(p, "Restarting")["reason"] == "RuntimeError"


def test_status_times_are_whole_seconds_in_utc() -> None:
    now = NOW.replace(microsecond=123456)
    p = run(ftj(), {"phase": "Pending"}, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")], now=now)
    assert p.status["startTime"] == timestamp(NOW) == cond(p, "Running")["lastTransitionTime"]


# -- the preflight (spec.preflight.mode auto) -------------------------------------------------------------

GIB = 1024**3


def auto(**spec: Any) -> Any:
    """A 2-node job with the preflight (the default mode) and 80 GiB GPUs."""
    body: dict[str, Any] = {
        "model": {"uri": "org/m"},
        "data": {"train": {"uri": "s3://data/train.jsonl"}},
        "training": {"maxSteps": 10},
        "distributed": {"nodes": 2},
        "resources": {"gpuMemory": "80Gi"},
    }
    body.update(spec)
    return validate_object(
        {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "llm"}, "spec": body}
    )


def result(*, total_gib: float = 20, problems: tuple[str, ...] = (), **extra: Any) -> str:
    """A preflight's termination message: its PreflightResult as compact JSON, as the pod writes it."""
    total = int(total_gib * GIB)
    body: dict[str, Any] = {
        "trainRecords": 900,
        "evalRecords": 100,
        "badRecords": len(problems),
        "tokenLengthP50": 120,
        "tokenLengthP95": 480.5,
        "tokenLengthMax": 1024,
        "truncatedFraction": 0.02,
        "tokensPerEpoch": 130000,
        "stepsPerEpoch": 57,
        "cacheUri": "s3://ckpt/default/llm/cache/3f2a",
        "cacheHit": False,
        "memory": {
            "weights": total // 4,
            "gradients": total // 8,
            "optimizer": total // 4,
            "activations": total // 4,
            "overhead": total // 8,
            "total": total,
            "hostBytes": 0,
            "worldSize": 2,
            "parameters": 8_030_261_248,
            "trainableParameters": 41_943_040,
        },
        "writeAccess": ["s3://ckpt/default/llm", "s3://ckpt/default/llm/output"],
        "problems": list(problems),
        "completedAt": timestamp(NOW),
    }
    body.update(extra)
    return json.dumps(body, separators=(",", ":"))


def pf_job(attempt: int, *, condition: str | None = None, reason: str = "", at: datetime = NOW) -> dict[str, Any]:
    status: dict[str, Any] = {"active": 0 if condition else 1, "startTime": timestamp(NOW)}
    if condition:
        status["conditions"] = [
            {
                "type": condition,
                "status": "True",
                "reason": reason,
                "message": reason,
                "lastTransitionTime": timestamp(at),
            }
        ]
    return {
        "metadata": {
            "name": f"llm-pf{attempt}",
            "labels": {"finetune.io/job": "llm", "finetune.io/preflight-attempt": str(attempt)},
            "managedFields": [{"manager": "finetune-operator"}],
        },
        "spec": {"completions": 1, "template": {"spec": {"containers": [{"name": "preflight"}]}}},
        "status": status,
    }


def pf_pod(
    attempt: int,
    phase: str,
    *,
    exit_code: int | None = None,
    reason: str = "Completed",
    message: str = "",
    at: datetime = NOW,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": timestamp(NOW)}}
    if exit_code is not None:
        state = {
            "terminated": {"exitCode": exit_code, "reason": reason, "message": message, "finishedAt": timestamp(at)}
        }
    return {
        "metadata": {
            "name": f"llm-pf{attempt}-x7k2p",
            "labels": {
                "finetune.io/job": "llm",
                "finetune.io/preflight-attempt": str(attempt),
                "job-name": f"llm-pf{attempt}",
            },
            "ownerReferences": [{"kind": "Job", "name": f"llm-pf{attempt}"}],
        },
        "spec": {"containers": [{"name": "preflight"}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "preflight", "state": state}]},
    }


def succeeded(message: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [pf_job(0, condition="Complete")], [pf_pod(0, "Succeeded", exit_code=0, message=message)]


def types(p: Plan) -> set[str]:
    return {c["type"] for c in p.status["conditions"]}


def test_the_preflight_runs_before_the_gang_and_its_stored_result_starts_it() -> None:
    first = run(auto(), {}, [], [])
    assert first.create_preflight == 0 and first.create_job is None
    assert first.status["phase"] == "Pending" and first.status["preflight"] is None
    assert "Created" not in types(first)  # no gang yet
    assert (cond(first, "DataValid")["status"], cond(first, "DataValid")["reason"]) == ("Unknown", "PreflightRunning")
    assert first.events == [("Normal", "PreflightRunning", "Pending: " + cond(first, "DataValid")["message"])]
    running = run(auto(), first.status, [pf_job(0)], [pf_pod(0, "Running")])
    # Level-triggered: the same observations give the same status, no new preflight, no event.
    assert running.create_preflight is None and running.create_job is None
    assert running.status == first.status and running.events == []

    done = run(auto(), running.status, *succeeded(result()))
    assert done.create_job is None and done.create_preflight is None  # the gang comes from the stored result
    stored = done.status["preflight"]
    assert stored["trainRecords"] == 900 and stored["tokenLengthP95"] == 480.5 and stored["memory"]["total"] == 20 * GIB
    assert stored["gpuMemory"] == 80 * GIB and stored["fits"] is True  # the operator's verdict, not the pod's
    assert cond(done, "DataValid")["status"] == "True" and "900 training" in cond(done, "DataValid")["message"]
    fits = cond(done, "FitsInMemory")
    assert fits["status"] == "True" and fits["reason"] == "Fits" and "20.00 GiB per GPU" in fits["message"]
    assert [e[1] for e in done.events] == ["PreflightPassed"] and done.requeue_after is not None

    later = NOW + timedelta(seconds=2)
    gang = run(auto(), done.status, *succeeded(result()), now=later)
    assert gang.create_job == 0 and gang.create_preflight is None
    assert cond(gang, "Created")["status"] == "True"
    # The preflight's conditions keep the time they became what they are.
    assert cond(gang, "DataValid")["lastTransitionTime"] == cond(done, "DataValid")["lastTransitionTime"]
    # The job controller has not marked the preflight's Job Complete yet: it is not stopped for that.
    jobs, pods = [pf_job(0)], succeeded(result())[1]
    on = run(auto(), gang.status, [*jobs, job(0)], [*pods, pod(0, 0, "Running"), pod(0, 1, "Running")], now=later)
    assert on.status["phase"] == "Running" and on.delete_jobs == [] and on.status["preflight"] == stored


def test_restarting_mid_preflight_neither_duplicates_nor_skips_it() -> None:
    # A restarted operator has no memory of its own: only the status and the Jobs and pods it lists.
    started = run(auto(), {}, [], [])
    assert run(auto(), started.status, [pf_job(0)], []).create_preflight is None  # the Job exists: no second one
    assert run(auto(), {}, [pf_job(0)], [pf_pod(0, "Pending")]).create_preflight is None  # even with no status yet
    # The pod finished while no operator ran: its result is read, not skipped, and the gang waits for it.
    harvested = run(auto(), started.status, *succeeded(result()))
    assert harvested.status["preflight"] is not None and harvested.create_job is None


def test_mode_skip_starts_the_gang_at_once() -> None:
    skip = run(auto(preflight={"mode": "skip"}), {}, [], [])
    assert skip.create_job == 0 and skip.create_preflight is None and skip.status["preflight"] is None
    assert not types(skip) & {"DataValid", "FitsInMemory"}
    # Switched to skip while a preflight runs: the gang starts and the preflight is stopped.
    switched = run(auto(preflight={"mode": "skip"}), {"phase": "Pending"}, [pf_job(0)], [pf_pod(0, "Running")])
    assert switched.create_job == 0
    gang = run(auto(preflight={"mode": "skip"}), switched.status, [pf_job(0), job(0)], [pf_pod(0, "Running")])
    assert gang.delete_jobs == ["llm-pf0"]


def test_bad_data_fails_invalid_data_naming_file_and_line_and_never_starts_the_gang() -> None:
    problems = ("train.jsonl:7: missing column 'completion'", "train.jsonl:4001: not valid JSON")
    jobs = [pf_job(0, condition="Failed", reason="BackoffLimitExceeded")]
    pods = [pf_pod(0, "Failed", exit_code=3, reason="Error", message=result(problems=problems))]
    p = run(auto(), {"phase": "Pending"}, jobs, pods)
    assert p.status["phase"] == "Failed" and p.create_job is None and p.create_preflight is None
    failed = cond(p, "Failed")
    assert failed["reason"] == "InvalidData" and "train.jsonl:7: missing column" in failed["message"]
    assert "train.jsonl:4001" in failed["message"] and "2 bad records" in failed["message"]
    data = cond(p, "DataValid")
    assert (data["status"], data["reason"]) == ("False", "InvalidData") and "train.jsonl:7" in data["message"]
    assert p.status["preflight"]["problems"] == list(problems) and p.status["lastFailure"]["exitCode"] == 3
    assert "Created" not in types(p) and p.events[0][:2] == ("Warning", "InvalidData")
    # Terminal: nothing is ever created, whatever is observed later.
    again = run(auto(), p.status, jobs, pods, now=NOW + timedelta(hours=1))
    assert again.create_job is None and again.create_preflight is None and again.status == p.status
    # A pod that died with exit 3 before writing its result: the log's last lines are the message.
    logs = [pf_pod(0, "Failed", exit_code=3, reason="Error", message="eval.jsonl:12: text is not UTF-8 (byte 40)")]
    text = run(auto(), {"phase": "Pending"}, jobs, logs)
    assert cond(text, "Failed")["reason"] == "InvalidData" and "eval.jsonl:12" in cond(text, "Failed")["message"]
    assert text.status["preflight"] is None


def test_a_job_that_cannot_fit_fails_will_not_fit_unless_allowed() -> None:
    big = succeeded(result(total_gib=93.5))
    p = run(auto(), {"phase": "Pending"}, *big)
    assert p.status["phase"] == "Failed" and p.create_job is None
    failed, fits = cond(p, "Failed"), cond(p, "FitsInMemory")
    assert failed["reason"] == "WillNotFit" and (fits["status"], fits["reason"]) == ("False", "WillNotFit")
    for text in (failed["message"], fits["message"]):
        assert "estimated 93.50 GiB per GPU of 2 ranks" in text and "does not fit in 80.00 GiB" in text
        assert "weights 23.38 GiB" in text and "optimizer" in text and "activations" in text
    assert p.status["preflight"]["fits"] is False and cond(p, "DataValid")["status"] == "True"
    assert run(auto(), p.status, *big).create_job is None

    allowed = auto(resources={"gpuMemory": "80Gi"}, preflight={"allowWillNotFit": True})
    stored = run(allowed, {"phase": "Pending"}, *big)
    assert stored.status["phase"] == "Pending"
    gang = run(allowed, stored.status, *big)
    assert gang.create_job == 0 and cond(gang, "FitsInMemory")["status"] == "False"
    assert "allowWillNotFit" in cond(gang, "FitsInMemory")["message"]

    # The GPU memory from NVIDIA GPU feature discovery's label, pinned by the node selector (MiB).
    labelled = auto(resources={"nodeSelector": {"nvidia.com/gpu.memory": "81920"}})
    assert cond(run(labelled, {"phase": "Pending"}, *big), "Failed")["reason"] == "WillNotFit"
    # Unknown GPU memory, or no estimate: FitsInMemory Unknown, and the gang starts.
    unknown = auto(resources={})
    first = run(unknown, {"phase": "Pending"}, *big)
    assert (cond(first, "FitsInMemory")["status"], cond(first, "FitsInMemory")["reason"]) == (
        "Unknown",
        "GPUMemoryUnknown",
    )
    assert "fits" not in first.status["preflight"] and run(unknown, first.status, *big).create_job == 0
    note = "model_type 'gpt2' is not supported by the estimator"
    unsupported = run(auto(), {"phase": "Pending"}, *succeeded(result(memory=None, memoryNote=note)))
    assert (
        cond(unsupported, "FitsInMemory")["reason"] == "NoEstimate"
        and note in cond(unsupported, "FitsInMemory")["message"]
    )


def test_a_preflight_that_crashes_is_retried_with_backoff_then_fails() -> None:
    oom = pf_pod(0, "Failed", exit_code=137, reason="OOMKilled", message="Killed")
    # The pod failed, the Job not yet: its reason (a deadline?) is not known, nothing is judged.
    assert run(auto(), {"phase": "Pending"}, [pf_job(0)], [oom]).create_preflight is None
    failed_job = pf_job(0, condition="Failed", reason="BackoffLimitExceeded")
    waiting = run(auto(), {"phase": "Pending"}, [failed_job], [oom])
    assert waiting.create_preflight is None and waiting.requeue_after == 10.0
    assert waiting.status["phase"] == "Pending" and waiting.status["lastFailure"]["reason"] == "OOMKilled"
    retrying = cond(waiting, "DataValid")
    assert (retrying["status"], retrying["reason"]) == ("Unknown", "PreflightRetrying")
    assert "OOMKilled (raise spec.preflight.resources.memory)" in retrying["message"]
    assert f"attempt 1 at {timestamp(NOW + timedelta(seconds=10))}" in retrying["message"]
    # The wait is counted from when the pod finished, so every reconcile until then agrees.
    assert run(auto(), waiting.status, [failed_job], [oom], now=NOW + timedelta(seconds=4)).status == waiting.status
    later = run(auto(), waiting.status, [failed_job], [oom], now=NOW + timedelta(seconds=10))
    assert later.create_preflight == 1 and later.status["lastFailure"] == waiting.status["lastFailure"]
    # Attempt n waits 10 s x 2^n after attempt n-1 failed; the last allowed attempt's failure fails the job.
    jobs = [pf_job(n, condition="Failed", reason="BackoffLimitExceeded") for n in range(3)]
    pods = [pf_pod(n, "Failed", exit_code=1, reason="Error", message="ConnectionResetError") for n in range(3)]
    assert run(auto(), {"phase": "Pending"}, jobs, pods).requeue_after == 40.0
    assert run(auto(), {"phase": "Pending"}, jobs, pods, now=NOW + timedelta(seconds=40)).create_preflight == 3
    jobs.append(pf_job(3, condition="Failed", reason="BackoffLimitExceeded"))
    pods.append(pf_pod(3, "Failed", exit_code=1, reason="Error", message="ConnectionResetError"))
    last = run(auto(), {"phase": "Pending"}, jobs, pods)
    assert last.status["phase"] == "Failed" and cond(last, "Failed")["reason"] == "PreflightFailed"
    assert (
        "failed 4 times" in cond(last, "Failed")["message"]
        and "ConnectionResetError" in cond(last, "Failed")["message"]
    )


def test_a_preflight_that_cannot_succeed_fails_the_job_at_once() -> None:
    deadline = pf_job(0, condition="Failed", reason="DeadlineExceeded")
    p = run(auto(), {"phase": "Pending"}, [deadline], [pf_pod(0, "Failed", exit_code=137, reason="Error")])
    assert (
        cond(p, "Failed")["reason"] == "PreflightDeadlineExceeded"
        and "activeDeadlineSeconds" in cond(p, "Failed")["message"]
    )
    assert cond(run(auto(), {"phase": "Pending"}, [deadline], []), "Failed")["reason"] == "PreflightDeadlineExceeded"
    config = [pf_pod(0, "Failed", exit_code=2, reason="Error", message="invalid trainer config: spec.model: ...")]
    refused = run(auto(), {"phase": "Pending"}, [pf_job(0, condition="Failed", reason="BackoffLimitExceeded")], config)
    assert cond(refused, "Failed")["reason"] == "InvalidSpec" and "spec.model" in cond(refused, "Failed")["message"]
    silent = run(auto(), {"phase": "Pending"}, *succeeded("Done."))
    assert cond(silent, "Failed")["reason"] == "PreflightFailed" and silent.create_job is None


def workload(attempt: int, *conditions: tuple[str, str, str, str], active: bool = True) -> dict[str, Any]:
    """Kueue's Workload of gang attempt ``attempt``, with (type, status, reason, message) conditions."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": f"job-llm-a{attempt}-1f2e3",
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": f"llm-a{attempt}", "controller": True}
            ],
            "labels": {"kueue.x-k8s.io/job-uid": "job-uid"},
        },
        "spec": {"active": active, "queueName": "team", "podSets": [{"name": "main", "count": 2}]},
        "status": {
            "conditions": [
                {"type": t, "status": st, "reason": r, "message": m, "lastTransitionTime": timestamp(NOW)}
                for t, st, r, m in conditions
            ]
        },
    }


NO_QUOTA = ("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set main: insufficient quota")
ADMITTED = ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus")
PREEMPTED = ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: u2) in the ClusterQueue")


def test_a_queued_job_waits_for_kueue_with_kueues_reason_and_never_touches_suspend() -> None:
    queued = ftj(queueName="team")
    first = run(queued, {}, [], [])
    assert first.create_job == 0  # created suspended, labelled (test_builders); Kueue unsuspends it
    waiting = run(queued, first.status, [job(0, suspend=True)], [])
    assert (waiting.status["phase"], cond(waiting, "Queued")["reason"]) == ("Pending", "Queued")
    assert "no Workload" in cond(waiting, "Queued")["message"] and waiting.set_suspend is None
    held = run(queued, waiting.status, [job(0, suspend=True)], [], workloads=[workload(0, NO_QUOTA)])
    assert "queue team: couldn't assign flavors" in cond(held, "Queued")["message"]
    assert held.set_suspend is None and held.set_workload_active is None and held.create_job is None
    pods = [pod(0, 0, "Running"), pod(0, 1, "Running")]
    admitted = run(queued, held.status, [job(0)], pods, workloads=[workload(0, ADMITTED)])
    assert admitted.status["phase"] == "Running" and admitted.set_suspend is None
    assert (cond(admitted, "Queued")["status"], cond(admitted, "Queued")["reason"]) == ("False", "Running")
    assert "Queued" not in {c["type"] for c in run(ftj(), {}, [], []).status["conditions"]}


def test_a_gang_kueue_preempts_is_preempted_while_it_saves_then_queued_then_resumes_in_the_same_job() -> None:
    queued = ftj(queueName="team")
    pods = [pod(0, 0, "Running"), pod(0, 1, "Running")]
    running = run(queued, {"phase": "Pending"}, [job(0)], pods, workloads=[workload(0, ADMITTED)])
    # Kueue evicts: it suspends the Job; the Job controller deletes the pods, whose trainers save on SIGTERM.
    evicted = [workload(0, PREEMPTED, NO_QUOTA)]
    stopping = run(queued, running.status, [job(0, suspend=True)], pods, workloads=evicted)
    assert (stopping.status["phase"], cond(stopping, "Queued")["reason"]) == ("Pending", "Preempted")
    assert (
        "Preempted to accommodate" in cond(stopping, "Queued")["message"]
        and "2 pod(s) saving" in (cond(stopping, "Queued")["message"])
    )
    assert stopping.events == [("Normal", "Preempted", f"Pending: {cond(stopping, 'Queued')['message']}")]
    saved = [pod(0, i, "Failed", exit_code=85, reason="Error") for i in range(2)]
    requeued = run(queued, stopping.status, [job(0, suspend=True)], saved, workloads=evicted)
    assert (
        cond(requeued, "Queued")["reason"] == "Queued"
        and "evicted before: Preempted" in (cond(requeued, "Queued")["message"])
    )
    # Not a failure of the attempt: no restart, no Job deleted, nothing written to the Job.
    for p in (stopping, requeued):
        assert p.status["restarts"] == 0 and not p.delete_jobs and p.create_job is None and p.set_suspend is None
        assert p.status["lastFailure"] is None
    readmitted = run(queued, requeued.status, [job(0)], pods, workloads=[workload(0, ADMITTED)])
    assert readmitted.status["phase"] == "Running" and cond(readmitted, "Queued")["status"] == "False"


def test_suspending_a_queued_job_deactivates_its_workload() -> None:
    pods = [pod(0, 0, "Running"), pod(0, 1, "Running")]
    suspended = run(
        ftj(queueName="team", suspend=True), {"phase": "Running"}, [job(0)], pods, workloads=[workload(0, ADMITTED)]
    )
    assert suspended.set_workload_active == ("job-llm-a0-1f2e3", False) and suspended.set_suspend is None
    assert suspended.status["phase"] == "Suspended"
    inactive = [workload(0, active=False)]
    resumed = run(ftj(queueName="team"), suspended.status, [job(0, suspend=True)], [], workloads=inactive)
    assert resumed.set_workload_active == ("job-llm-a0-1f2e3", True) and resumed.set_suspend is None
    assert resumed.status["phase"] == "Pending" and cond(resumed, "Queued")["status"] == "True"
    # Suspended before its gang exists: no Job is made (Kueue would admit it), until resumed.
    held = run(ftj(queueName="team", suspend=True), {}, [], [])
    assert held.create_job is None and held.status["phase"] == "Suspended"
    assert run(ftj(queueName="team"), held.status, [], []).create_job == 0


def test_suspend_holds_the_preflight_until_resumed() -> None:
    held = run(auto(runPolicy={"suspend": True}), {}, [], [])
    assert held.status["phase"] == "Suspended" and held.create_preflight is None and held.create_job is None
    assert "Created" not in types(held)
    resumed = run(auto(), held.status, [], [])
    assert resumed.create_preflight == 0 and resumed.status["phase"] == "Pending"


def test_the_result_is_read_leniently_and_bounded() -> None:
    from finetune_operator.reconcile import parse_preflight_result

    many = [f"train.jsonl:{i}: empty completion" for i in range(1, 40)]
    parsed = parse_preflight_result(result(problems=tuple(many), newerField=1, fits=True))
    assert parsed is not None and len(parsed.problems) == 20 and parsed.fits is None  # the fit is the operator's
    assert parse_preflight_result("Traceback (most recent call last):") is None
    assert parse_preflight_result("[1, 2]") is None and parse_preflight_result(None) is None


def node(name: str, ready: str = "True", since: datetime = NOW - timedelta(days=1)) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"type": "kwok"}},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "lastTransitionTime": timestamp(NOW)},
                {"type": "Ready", "status": ready, "lastTransitionTime": timestamp(since)},
            ]
        },
    }


ON_TWO_NODES = [pod(0, 0, "Running", node="node-0"), pod(0, 1, "Running", node="node-1")]


def test_a_gang_with_a_pod_on_a_deleted_node_restarts_at_once_as_node_lost() -> None:
    healthy = run(
        ftj(), {"phase": "Running"}, [job(0)], ON_TWO_NODES, nodes={"node-0": node("node-0"), "node-1": node("node-1")}
    )
    assert healthy.status["phase"] == "Running" and not healthy.delete_jobs
    p = run(ftj(), {"phase": "Running"}, [job(0)], ON_TWO_NODES, nodes={"node-0": node("node-0")})
    assert (p.status["phase"], p.status["restarts"], p.delete_jobs) == ("Restarting", 1, ["llm-a0"])
    assert p.status["lastFailure"]["reason"] == "NodeLost" and cond(p, "Restarting")["reason"] == "NodeLost"
    assert p.status["lastFailure"]["message"] == "node node-1 of pod llm-a0-1-x was deleted"
    assert ("Warning", "NodeLost") in [e[:2] for e in p.events]
    # The next attempt waits for the rank on the healthy node to stop (it saves a checkpoint on SIGTERM),
    # not for the one on the deleted node: nothing runs there.
    waiting = run(ftj(), p.status, [], ON_TWO_NODES, nodes={"node-0": node("node-0")})
    assert waiting.create_job is None and "waiting for 1 pod(s)" in cond(waiting, "Restarting")["message"]
    started = run(ftj(), p.status, [], ON_TWO_NODES[1:], nodes={"node-0": node("node-0")})
    assert started.create_job == 1
    # Node losses use up runPolicy.backoffLimit like any retriable failure.
    spent = run(ftj(backoffLimit=0), {"phase": "Running"}, [job(0)], ON_TWO_NODES, nodes={"node-0": node("node-0")})
    assert (spent.status["phase"], cond(spent, "Failed")["reason"]) == ("Failed", "BackoffLimitExceeded")


@pytest.mark.parametrize(("ready", "state"), [("Unknown", "unreachable"), ("False", "not ready")])
def test_a_node_down_past_the_pods_toleration_is_lost(ready: str, state: str) -> None:
    def at(down: float) -> Plan:
        nodes = {"node-0": node("node-0"), "node-1": node("node-1", ready, NOW - timedelta(seconds=down))}
        return run(ftj(), {"phase": "Running"}, [job(0)], ON_TWO_NODES, nodes=nodes)

    # Within the 300 s the pod tolerates the taint: it may come back; woken when it would be lost.
    early = at(100)
    assert early.status["phase"] == "Running" and early.requeue_after == pytest.approx(201.0)
    late = at(301)
    assert late.status["phase"] == "Restarting" and late.status["lastFailure"]["reason"] == "NodeLost"
    assert f"node node-1 of pod llm-a0-1-x has been {state} for 301s" in late.status["lastFailure"]["message"]
    assert "the pod tolerates 300s" in late.status["lastFailure"]["message"]


def test_a_pods_own_tolerations_decide_how_long_a_down_node_is_waited_for() -> None:
    nodes = {"node-0": node("node-0", "Unknown", NOW - timedelta(seconds=10))}

    def with_tolerations(tolerations: list[dict[str, Any]]) -> Plan:
        pods = [pod(0, 0, "Running", tolerations=tolerations), pod(0, 1, "Running", tolerations=tolerations)]
        return run(ftj(), {"phase": "Running"}, [job(0)], pods, nodes=nodes)

    # No toleration of the taint: evicted at once, so lost at once.
    assert with_tolerations([]).status["phase"] == "Restarting"
    # Tolerated forever (no tolerationSeconds, or every taint): never judged lost by the node's state.
    forever = [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}]
    assert with_tolerations(forever).status["phase"] == "Running"
    assert with_tolerations([{"operator": "Exists"}]).status["phase"] == "Running"
    # A NoSchedule toleration of the taint does not keep a pod on a down node.
    no_schedule = [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoSchedule"}]
    assert with_tolerations(no_schedule).status["phase"] == "Restarting"


def test_without_a_node_watch_node_loss_is_read_from_the_pods_disruption() -> None:
    # An operator limited to namespaces cannot watch nodes: a pod on a node it cannot see is not judged...
    assert run(ftj(), {"phase": "Running"}, [job(0)], ON_TWO_NODES, nodes=None).status["phase"] == "Running"
    # ...and the pods Kubernetes takes away with their node say so in their DisruptionTarget reason.
    for disruption, reason in [
        ("DeletionByPodGC", "NodeLost"),
        ("DeletionByTaintManager", "NodeLost"),
        ("PreemptionByScheduler", "Preempted"),
        ("EvictionByEvictionAPI", "Preempted"),
    ]:
        failed = [pod(0, 1, "Failed", exit_code=137, disrupted=True, disruption=disruption), pod(0, 0, "Running")]
        p = run(ftj(), {"phase": "Running"}, [job(0, condition="Failed", reason="BackoffLimitExceeded")], failed)
        assert (p.status["phase"], p.status["lastFailure"]["reason"]) == ("Restarting", reason), disruption


def test_a_divergence_rolls_back_as_a_restart_or_fails_the_job() -> None:
    # Exit 86: the trainer removed the checkpoints since the divergence; the gang restarts before it.
    rolled = [pod(0, 0, "Failed", exit_code=86, message="diverged: ... rollback 1 of 2 ..."), pod(0, 1, "Running")]
    p = run(ftj(), {"phase": "Running"}, [job(0, condition="Failed", reason="BackoffLimitExceeded")], rolled)
    assert (p.status["phase"], p.status["restarts"], p.status["lastFailure"]["reason"]) == ("Restarting", 1, "Diverged")
    # Exit 6 (permanent, so the Job's podFailurePolicy failed it at once): Failed, reason Diverged.
    failed = [pod(0, 0, "Failed", exit_code=6, message="diverged: training loss diverged: ...")]
    p = run(ftj(), {"phase": "Running"}, [job(0, condition="Failed", reason="PodFailurePolicy")], failed)
    assert (p.status["phase"], cond(p, "Failed")["reason"], p.status["restarts"]) == ("Failed", "Diverged", 0)
