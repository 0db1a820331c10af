"""What the operator's handlers write into a FineTuneJob's status (a recording Kube, no cluster)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from finetune_operator import handlers
from finetune_operator.reconcile import observed_job, observed_pod
from test_reconcile import NOW, job, pf_job, pf_pod, pod, result, timestamp

KEY = ("ns", "llm")
TRAINER = {
    "progress": {"step": 7, "totalSteps": 10},
    "checkpoints": [{"step": 5, "uri": "s3://b/ckpt-5", "time": timestamp(NOW)}],
    "provenance": {"seed": 7, "accelerator": "cpu"},  # the trainer's part of it
}


class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.ensured: list[tuple[str, str]] = []
        self.events: list[str] = []

    async def ensure(self, obj: dict[str, Any]) -> bool:
        self.ensured.append((obj["kind"], obj["metadata"]["name"]))
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        pass

    async def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        pass

    async def event(self, ftj: Any, kind: str, reason: str, message: str) -> None:
        self.events.append(reason)

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any]:
        self.patches.append(status)
        body = handlers.State.bodies[(namespace, name)]
        return {**body, "status": merge_patch(body.get("status", {}), status)}


def merge_patch(target: Any, patch: Any) -> Any:
    """``patch`` applied to ``target`` as the API server applies a JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def body(status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u1", "generation": 2, "resourceVersion": "9"},
        "spec": {
            "model": {"uri": "org/m"},
            "data": {"train": {"uri": "t.jsonl"}},
            "training": {"maxSteps": 10},
            "distributed": {"nodes": 2},
            **spec,
        },
        "status": status,
    }


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingKube]:
    fake = RecordingKube()
    state = handlers.OperatorState(kube=fake)  # type: ignore[arg-type]
    monkeypatch.setattr(handlers, "State", state)
    yield fake
    handlers._forget(KEY)


def reconcile(status: dict[str, Any], jobs: list[Any], pods: list[Any], **spec: Any) -> None:
    handlers.State.bodies[KEY] = body(status, **spec)
    handlers.State.jobs = {KEY: [observed_job(j) for j in jobs]}
    handlers.State.pods = {KEY: [observed_pod(p) for p in pods]}
    asyncio.run(handlers.reconcile(KEY))


def test_the_patch_holds_the_operators_fields_and_clears_only_what_is_there(kube: RecordingKube) -> None:
    running = [pod(0, 0, "Running"), pod(0, 1, "Running")]
    reconcile({"phase": "Pending", **TRAINER}, [job(0)], running)
    [patch] = kube.patches
    assert set(patch) == {"phase", "restarts", "observedGeneration", "conditions", "startTime", "provenance"}
    assert patch["phase"] == "Running" and patch["observedGeneration"] == 2
    # Of status.provenance, the operator's fields only: merged, the trainer's stay.
    assert set(patch["provenance"]) == {"image", "nodes", "operatorVersion"}
    assert handlers.State.bodies[KEY]["status"]["provenance"]["seed"] == 7
    # Unchanged observations: nothing to write (the merged provenance holds what the patch would set).
    reconcile(handlers.State.bodies[KEY]["status"], [job(0)], running)
    assert len(kube.patches) == 1
    # A completionTime left from before is cleared (null in the merge patch); the trainer's fields
    # are never in the patch.
    status = {**handlers.State.bodies[KEY]["status"], "completionTime": timestamp(NOW)}
    reconcile(status, [job(0)], running)
    assert kube.patches[-1] == {**patch, "completionTime": None, "startTime": status["startTime"]}


def test_an_invalid_spec_fails_the_job_with_one_condition(kube: RecordingKube) -> None:
    reconcile({**TRAINER}, [], [], training={"maxSteps": 0})
    [patch] = kube.patches
    assert set(patch) == {"phase", "observedGeneration", "completionTime", "conditions"}
    [condition] = patch["conditions"]
    assert patch["phase"] == "Failed" and condition["reason"] == "InvalidSpec" and condition["type"] == "Failed"
    assert condition["lastTransitionTime"] == patch["completionTime"] and patch["completionTime"].endswith("Z")
    assert condition["observedGeneration"] == 2 and "maxSteps" in condition["message"]
    reconcile(handlers.State.bodies[KEY]["status"], [], [], training={"maxSteps": 0})
    assert len(kube.patches) == 1, "a job that failed for its spec is written once"


def test_an_unreadable_status_is_logged_once_and_rewritten(
    kube: RecordingKube, caplog: pytest.LogCaptureFixture
) -> None:
    old = {"phase": "Queued", "conditions": [{"type": "Created", "status": "Yes"}], **TRAINER}
    with caplog.at_level(logging.WARNING, logger="finetune_operator"):
        for _ in range(2):
            reconcile(old, [job(0)], [pod(0, 0, "Running")])
    warnings = [r.getMessage() for r in caplog.records if "not fully readable" in r.getMessage()]
    assert len(warnings) == 1 and "status.phase" in warnings[0] and "status.conditions[0]" in warnings[0]
    assert kube.patches[-1]["phase"] == "Pending"
    assert [c["status"] for c in kube.patches[-1]["conditions"]] == ["True"]


def test_the_preflight_job_comes_after_what_its_pod_needs_and_only_once(kube: RecordingKube) -> None:
    # spec.preflight.mode auto (the default), a fresh job: the preflight's Job, not the gang's.
    reconcile({}, [], [])
    jobs = [name for kind, name in kube.ensured if kind == "Job"]
    assert jobs == ["llm-pf0"]
    order = [kind for kind, _ in kube.ensured]
    assert order.index("Job") > max(order.index("ConfigMap"), order.index("ServiceAccount"))
    [patch] = kube.patches
    assert patch["phase"] == "Pending" and [c["type"] for c in patch["conditions"]] == ["DataValid"]
    # The Job index does not show it yet: the next reconcile does not ask for it again.
    reconcile(handlers.State.bodies[KEY]["status"], [], [])
    assert [name for kind, name in kube.ensured if kind == "Job"] == ["llm-pf0"]


def test_the_fit_verdict_is_cleared_when_the_gpu_memory_is_no_longer_known(kube: RecordingKube) -> None:
    # status.preflight is merged into the status: a verdict the spec no longer supports is cleared (null),
    # then nothing more is written.
    judged = {"trainRecords": 9, "badRecords": 0, "cacheHit": False, "writeAccess": [], "problems": []}
    judged |= {"gpuMemory": 85899345920, "fits": True}
    created = {"type": "Created", "status": "True", "reason": "JobCreated", "lastTransitionTime": timestamp(NOW)}
    status = {"phase": "Pending", "preflight": judged, "conditions": [created]}
    reconcile(status, [job(0)], [pod(0, 0, "Running"), pod(0, 1, "Running")])
    [patch] = kube.patches
    assert patch["preflight"] == {**judged, "gpuMemory": None, "fits": None}
    written = {k: v for k, v in patch["preflight"].items() if v is not None}
    reconcile(
        {**handlers.State.bodies[KEY]["status"], "preflight": written},
        [job(0)],
        [pod(0, 0, "Running"), pod(0, 1, "Running")],
    )
    assert len(kube.patches) == 1


def test_a_fresh_job_through_its_preflight_costs_four_requests_more_than_without(kube: RecordingKube) -> None:
    # What README says: without the preflight 5 children, the Job, 2 status writes and 2 Events (10); the
    # preflight adds its Job, 2 status writes and an Event.
    def requests() -> int:
        return len(kube.ensured) + len(kube.patches) + len(kube.events)

    running = [pod(0, 0, "Running"), pod(0, 1, "Running")]
    reconcile({}, [], [], preflight={"mode": "skip"})
    reconcile(handlers.State.bodies[KEY]["status"], [job(0)], running, preflight={"mode": "skip"})
    assert requests() == 10 and kube.events == ["Creating", "AllPodsRunning"]
    handlers._forget(KEY)
    kube.ensured, kube.patches, kube.events = [], [], []

    done = [pf_job(0, condition="Complete")], [pf_pod(0, "Succeeded", exit_code=0, message=result())]
    reconcile({}, [], [])  # the preflight's Job
    reconcile(handlers.State.bodies[KEY]["status"], *done)  # its result, stored
    reconcile(handlers.State.bodies[KEY]["status"], *done)  # the gang's Job
    reconcile(handlers.State.bodies[KEY]["status"], [done[0][0], job(0)], [*done[1], *running])
    assert [name for kind, name in kube.ensured if kind == "Job"] == ["llm-pf0", "llm-a0"]
    assert kube.events == ["PreflightRunning", "PreflightPassed", "AllPodsRunning"]
    assert requests() == 14 and len(kube.patches) == 4
