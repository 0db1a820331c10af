"""The reconcile plan: observed Job and pods → status, actions and events (pure, no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.api.v1alpha1 import FineTuneJobStatus
from finetune_operator.api.validation import validate_object
from finetune_operator.reconcile import (
    Observed,
    Plan,
    condition_reason,
    observed_job,
    observed_pod,
    plan,
    read_status,
    timestamp,
)

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def ftj(**run_policy: Any) -> Any:
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
            },
        }
    )


def job(attempt: int, *, condition: str | None = None, reason: str = "", suspend: bool = False) -> dict[str, Any]:
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
        status["containerStatuses"] = [{"name": "trainer", "state": {"running": {"startedAt": timestamp(NOW)}}}]
    status["conditions"] = [{"type": "Ready", "status": "True", "lastTransitionTime": timestamp(NOW)}]
    if disrupted:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"})
    return {
        "metadata": {
            "name": f"llm-a{attempt}-{index}-x",
            "labels": {"finetune.io/attempt": str(attempt), "batch.kubernetes.io/job-completion-index": str(index)},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index), "other": "x" * 100},
            "ownerReferences": [{"kind": "Job", "name": f"llm-a{attempt}"}],
        },
        "spec": {"nodeName": "node-0", "containers": [{"name": "trainer", "image": "trainer:1"}]},
        "status": {**status, "podIP": "10.0.0.1", "hostIP": "10.0.0.2"},
    }


def run(
    spec: Any, status: dict[str, Any], jobs: list[dict[str, Any]], pods: list[dict[str, Any]], now: datetime = NOW
) -> Plan:
    previous, problems = read_status(status)
    assert problems == []
    full = plan(Observed(ftj=spec, generation=3, status=previous, jobs=jobs, pods=pods, now=now))
    # The operator keeps only what observed_job/observed_pod cut out of what it watches: every plan
    # must come out the same from those as from the whole objects.
    cut = [observed_job(j) for j in jobs], [observed_pod(p) for p in pods]
    assert plan(Observed(ftj=spec, generation=3, status=previous, jobs=cut[0], pods=cut[1], now=now)) == full
    # The operator writes only its own fields, as the API's typed status has them.
    assert set(full.status) == {
        "phase",
        "restarts",
        "observedGeneration",
        "conditions",
        "startTime",
        "completionTime",
        "lastFailure",
    }
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
