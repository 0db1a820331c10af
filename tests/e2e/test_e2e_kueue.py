"""Kueue for real: FineTuneJobs with `runPolicy.queueName` under Kueue v0.19.2 on the test control plane.

Each test gets its own ResourceFlavor, a ClusterQueue with quota for one gang (one node's GPU) that
admits only its namespace, and a LocalQueue `team` there. Kueue's Job integration turns each gang Job
into a Workload and admits it by unsuspending it; the operator reports what Kueue decided (condition
Queued, Kueue's message) and never writes a queued Job's suspend.

The preemption test runs a real training behind the low-priority gang's pod, as test_e2e_contract does
(the pod's container command and env as a local process, :mod:`pod_process`), and plays the kubelet
when Kueue preempts it: the pod, annotated testcluster.finetune.io/hold-termination, stays terminating
while the test sends the trainer SIGTERM and waits for it to save and exit 85; then the pod goes. When
Kueue readmits the gang, its new pod's trainer resumes from the step it saved.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds
import pytest
from pod_process import PodProcess

if TYPE_CHECKING:
    from conftest import Cluster, Kueue, Operator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import tiny  # noqa: E402

A = "testcluster.finetune.io/"
QUEUE = "team"
PRIORITIES = {"e2e-low": 100, "e2e-high": 1000}
#: Kueue's reaction to a change (a Workload made, admitted, evicted) is one more controller in a chain.
KUEUE_S = bounds.operator(3)
#: What the trainer needs to start, load the tiny model and train a few steps, or to save on SIGTERM.
TRAINER_S = 180.0


@pytest.fixture
def queue(cluster: Cluster, kueue: Kueue, ns: str) -> Iterator[str]:
    """A LocalQueue `team` in ``ns`` whose ClusterQueue has quota for one 1-GPU gang and preempts lower
    priorities within itself; cluster-scoped objects named after the namespace, deleted afterwards."""
    for name, value in PRIORITIES.items():
        cluster.apply(
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value}
        )
    flavor, cq = f"flavor-{ns}", f"gpus-{ns}"
    cluster.apply({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    quota = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "1"}
    cluster.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": cq},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [{"name": r, "nominalQuota": q} for r, q in quota.items()],
                            }
                        ],
                    }
                ],
            },
        }
    )
    cluster.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": cq},
        },
        namespace=ns,
    )
    yield QUEUE
    cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)
    cluster.kubectl("delete", "resourceflavor", flavor, "--wait=false", check=False)


def gang(name: str, model: Path, train: Path, tmp_path: Path, *, priority: str, **overrides: Any) -> dict[str, Any]:
    """A 1-node, 1-GPU gang submitted to the queue; its pod is held Running by kwok (the test decides)."""
    spec: dict[str, Any] = {
        "runPolicy__queueName": QUEUE,
        "resources": {
            "gpusPerNode": 1,
            "priorityClassName": priority,
            "podAnnotations": {A + "hold": "true"},
        },
        "checkpoint": {"uri": f"file://{tmp_path}/storage-{name}"},
        "metrics": {"enabled": False},
        "training__maxSteps": 100000,  # runs until the test is done with it
        **overrides,
    }
    return tiny.job_manifest(name, model, train, **spec)


def queued_condition(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    conditions = cluster.ftj_status(ns, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Queued"), None)


def wait_queued(cluster: Cluster, ns: str, name: str, reason: str, *says: str) -> dict[str, Any]:
    """The Queued condition once it has ``reason`` and its message every one of ``says`` (Kueue words its
    Workload's message in steps: "waiting for admission" first, the quota it lacks when its scheduler has
    tried)."""
    return cluster.wait_for(
        f"FineTuneJob {ns}/{name} Pending with condition Queued True, reason {reason}, message with {says}",
        lambda: (
            (c := queued_condition(cluster, ns, name)) is not None
            and c["status"] == "True"
            and c["reason"] == reason
            and all(text in c["message"] for text in says)
            and cluster.ftj_status(ns, name).get("phase") == "Pending"
            and c
        ),
        timeout=KUEUE_S,
    )


def workload_of(cluster: Cluster, ns: str, job: str) -> dict[str, Any] | None:
    items = cluster.get_json("workloads.kueue.x-k8s.io", namespace=ns)["items"]
    return next(
        (w for w in items if any(o["kind"] == "Job" and o["name"] == job for o in w["metadata"]["ownerReferences"])),
        None,
    )


def test_quota_for_one_gang_runs_one_and_queues_the_other_with_kueues_reason(
    cluster: Cluster, operator: Operator, ns: str, queue: str, tiny_model: Path, tmp_path: Path
) -> None:
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(40))
    cluster.apply(gang("first", tiny_model, train, tmp_path, priority="e2e-low"), namespace=ns)
    cluster.wait_phase(ns, "first", "Running", timeout=KUEUE_S)
    cluster.apply(gang("second", tiny_model, train, tmp_path, priority="e2e-low"), namespace=ns)
    # Kueue's own words, through its Workload: no quota left for the second gang's GPU.
    wait_queued(cluster, ns, "second", "Queued", "waiting for admission by queue team", "nvidia.com/gpu")
    job = cluster.get_json("job", "second-a0", namespace=ns)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert not cluster.job_pods(ns, "second-a0")
    # The label is on the Job only: not on the FineTuneJob's other children.
    config_map = cluster.get_json("configmap", "second-config", namespace=ns)
    assert "kueue.x-k8s.io/queue-name" not in (config_map["metadata"].get("labels") or {})
    assert cluster.ftj_status(ns, "first")["phase"] == "Running"

    # The first gang finishes: its quota goes back, Kueue admits the second, whose pod starts.
    [pod] = cluster.running_pods(ns, "first-a0", 1)
    cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", ns, A + "hold-")
    cluster.wait_phase(ns, "first", "Succeeded")
    cluster.wait_phase(ns, "second", "Running", timeout=KUEUE_S)
    admitted = queued_condition(cluster, ns, "second")
    assert admitted is not None and (admitted["status"], admitted["reason"]) == ("False", "Running"), admitted
    assert cluster.ftj_status(ns, "second")["restarts"] == 0


def test_a_higher_priority_gang_preempts_a_training_which_saves_and_resumes_from_that_step_when_readmitted(
    cluster: Cluster, operator: Operator, ns: str, queue: str, tiny_model: Path, tmp_path: Path
) -> None:
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(200))
    storage = tmp_path / "storage-low"
    low = gang(
        "low",
        tiny_model,
        train,
        tmp_path,
        priority="e2e-low",
        checkpoint={"uri": f"file://{storage}", "everySteps": 2, "keepLast": 2},
    )
    low["spec"]["resources"]["podAnnotations"][A + "hold-termination"] = "true"
    cluster.apply(low, namespace=ns)
    cluster.wait_phase(ns, "low", "Running", timeout=KUEUE_S)
    first = PodProcess(cluster, ns, "low-a0", tmp_path / "first", {})
    try:
        cluster.wait_for(
            "the low-priority training's first committed checkpoint",
            lambda: any(storage.rglob("checkpoint-*/manifest.json")),
            timeout=TRAINER_S,
        )
        [low_pod] = cluster.running_pods(ns, "low-a0", 1)

        # A higher-priority gang needs the only GPU: Kueue evicts the low one (suspends its Job), the Job
        # controller deletes its pod, which stays terminating while its trainer saves.
        cluster.apply(gang("high", tiny_model, train, tmp_path, priority="e2e-high"), namespace=ns)
        name = low_pod["metadata"]["name"]
        cluster.wait_for(
            f"pod {name} being deleted (Kueue preempted its gang)",
            lambda: cluster.get_json("pod", name, namespace=ns)["metadata"].get("deletionTimestamp"),
            timeout=KUEUE_S,
        )
        wait_queued(cluster, ns, "low", "Preempted", "Preempted", "saving and stopping")
        assert cluster.get_json("job", "low-a0", namespace=ns)["spec"]["suspend"] is True
        code = first.terminate(timeout=TRAINER_S)
        assert code == 85, f"exit {code}\n{first.output[-4000:]}"
        saved = re.search(r"preempted at step (\d+): checkpoint-\d+ committed", first.output)
        assert saved, first.output[-4000:]
        step = int(saved.group(1))
        assert step >= 2
    finally:
        first.kill()
    # The pod ends as the trainer did, and goes; the gang waits in the queue behind the high one.
    cluster.kubectl("annotate", "pod", name, "-n", ns, f"{A}exit-code={code}", f"{A}hold-termination-", "--overwrite")
    wait_queued(cluster, ns, "low", "Queued", "evicted before: Preempted")
    cluster.wait_phase(ns, "high", "Running", timeout=KUEUE_S)
    status = cluster.ftj_status(ns, "low")
    assert status["restarts"] == 0 and not status.get("lastFailure"), status  # a preemption is no failure
    evicted = workload_of(cluster, ns, "low-a0")
    assert evicted is not None and any(
        c["type"] == "Evicted" and c["status"] == "True" and c["reason"] == "Preempted"
        for c in evicted["status"]["conditions"]
    ), evicted

    # The high gang finishes; Kueue readmits the low one: the same Job, a new pod, resumed from the saved step.
    [high_pod] = cluster.running_pods(ns, "high-a0", 1)
    cluster.kubectl("annotate", "pod", high_pod["metadata"]["name"], "-n", ns, A + "hold-")
    cluster.wait_phase(ns, "high", "Succeeded")
    cluster.wait_phase(ns, "low", "Running", timeout=KUEUE_S)
    [again] = cluster.running_pods(ns, "low-a0", 1)
    assert again["metadata"]["name"] != name
    second = PodProcess(cluster, ns, "low-a0", tmp_path / "second", {})
    try:
        cluster.wait_for(
            f"the readmitted training resuming from step {step}",
            lambda: f"(step {step}," in second.output and "resuming from" in second.output,
            timeout=TRAINER_S,
        )
    finally:
        second.kill()
        # Let the pod go with the namespace.
        cluster.kubectl("annotate", "pod", again["metadata"]["name"], "-n", ns, f"{A}hold-termination-")
    assert cluster.ftj_status(ns, "low")["restarts"] == 0
