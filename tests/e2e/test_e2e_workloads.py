"""Workloads on the kwok GPU nodes: scheduling, Jobs, and the pod-control annotations."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds

if TYPE_CHECKING:  # the fixture's type, for readers and type checkers only
    from conftest import Cluster

A = "testcluster.finetune.io/"
IMAGE = "example.invalid/never-pulled:1"  # kwok runs no containers; nothing is pulled


def _pod_spec(annotations: dict[str, str] | None = None, restart: str = "Never", gpus: int = 0) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": IMAGE}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "metadata": {"annotations": annotations or {}, "labels": {"app": "e2e"}},
        "spec": {"restartPolicy": restart, "containers": [container]},
    }


def _job(
    name: str,
    completions: int = 1,
    parallelism: int | None = None,
    indexed: bool = False,
    annotations: dict[str, str] | None = None,
    backoff_limit: int = 0,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": parallelism or completions,
        "backoffLimit": backoff_limit,
        "template": _pod_spec(annotations),
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def _bare_pod(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = _pod_spec(annotations)
    pod["metadata"]["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def _job_condition(cluster: Cluster, ns: str, name: str, cond: str) -> dict[str, Any] | None:
    job = cluster.get_json("job", name, namespace=ns)
    for c in job.get("status", {}).get("conditions", []):
        if c["type"] == cond and c["status"] == "True":
            return job
    return None


def _phase(cluster: Cluster, ns: str, pod: str) -> str:
    return cluster.get_json("pod", pod, namespace=ns).get("status", {}).get("phase", "")


def _job_pods(cluster: Cluster, ns: str, job: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("pods", "-l", f"job-name={job}", namespace=ns)["items"]
    return items


def _stays(cluster: Cluster, what: str, fn: Any, seconds: float) -> None:
    """Assert fn() stays true for `seconds` (a bounded negative check, polled)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert fn(), f"expected {what} for {seconds}s"
        time.sleep(0.3)


def test_nodes_are_fake_gpu_nodes(cluster: Cluster) -> None:
    nodes = cluster.get_json("nodes", "-l", "type=kwok")["items"]
    assert len(nodes) >= 1
    for n in nodes:
        assert n["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert not n["spec"].get("taints"), n["spec"].get("taints")
        ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
        assert ready == "True"
    # Liveness comes from node Leases that kwok renews.
    leases = cluster.get_json("leases", namespace="kube-node-lease")["items"]
    assert {lease["metadata"]["name"] for lease in leases} >= {n["metadata"]["name"] for n in nodes}


def test_deployment_gets_three_ready_pods_on_kwok_nodes(cluster: Cluster, namespace: str) -> None:
    # A GPU each: this file runs last, after every earlier test's namespace was deleted, so it also
    # proves their GPUs came back (test_a_deleted_running_job_pod_goes_and_frees_its_gpu).
    tmpl = _pod_spec(restart="Always", gpus=1)
    tmpl["metadata"]["labels"] = {"app": "web"}
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": tmpl},
        },
        namespace,
    )

    waiting: list[tuple[str, str, str]] = []  # what each pod waits for, at the last poll

    def ready() -> bool:
        if cluster.get_json("deployment", "web", namespace=namespace).get("status", {}).get("readyReplicas") == 3:
            return True
        pods = cluster.get_json("pods", "-l", "app=web", namespace=namespace)["items"]
        waiting[:] = [
            (p["metadata"]["name"], p["status"].get("phase", ""), str(p["status"].get("conditions", ""))[:400])
            for p in pods
        ]
        return False

    try:
        # deployment controller (ReplicaSet), ReplicaSet controller (pods), scheduler, kwok (Running, Ready),
        # ReplicaSet and deployment status
        cluster.wait_for("deployment web to have 3 ready replicas", ready, timeout=bounds.reactions(6))
    except AssertionError as exc:
        nodes = cluster.kubectl("describe", "nodes", "-l", "type=kwok")
        allocated = [line for line in nodes.splitlines() if "nvidia.com/gpu" in line]
        raise AssertionError(f"{exc}; pods: {waiting}; node GPUs: {allocated}") from None
    pods = cluster.get_json("pods", "-l", "app=web", namespace=namespace)["items"]
    assert len(pods) == 3
    kwok_nodes = {n["metadata"]["name"] for n in cluster.get_json("nodes", "-l", "type=kwok")["items"]}
    for p in pods:
        assert p["spec"]["nodeName"] in kwok_nodes
        assert p["status"]["phase"] == "Running"
        conds = {c["type"]: c["status"] for c in p["status"]["conditions"]}
        assert conds["Ready"] == "True"

    # A deleted pod goes away (pod-delete stage) and the ReplicaSet replaces it.
    victim = pods[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", victim, "-n", namespace, "--wait=true", timeout=bounds.reactions(2))

    def replaced() -> bool:
        items = cluster.get_json("pods", "-l", "app=web", namespace=namespace)["items"]
        names = {p["metadata"]["name"] for p in items}
        ready = [p for p in items if p.get("status", {}).get("phase") == "Running"]
        return victim not in names and len(ready) == 3

    cluster.wait_for("the deleted pod to be replaced", replaced, timeout=bounds.reactions(4))


def test_indexed_job_of_four_completes(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("indexed", completions=4, parallelism=2, indexed=True), namespace)
    job = cluster.wait_for(
        "indexed job Complete",
        lambda: _job_condition(cluster, namespace, "indexed", "Complete"),
        timeout=bounds.reactions(8),  # two waves of two pods: job controller, scheduler, kwok (Running, Succeeded)
    )
    assert job["status"]["succeeded"] == 4
    assert job["status"].get("completedIndexes") == "0-3"
    pods = _job_pods(cluster, namespace, "indexed")
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1", "2", "3"]
    for p in pods:
        assert p["status"]["phase"] == "Succeeded"
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0

    # Deleting the Job lets the garbage collector remove its pods.
    cluster.kubectl("delete", "job", "indexed", "-n", namespace, "--cascade=background")
    cluster.wait_for(
        "the GC to delete the Job's pods", lambda: not _job_pods(cluster, namespace, "indexed"), bounds.reactions(3)
    )


def test_pod_marked_for_failure_fails_with_exit_code_and_reason(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        _bare_pod(
            "crash",
            {
                A + "fail": "true",
                A + "exit-code": "137",
                A + "reason": "OOMKilled",
                A + "message": "rank 0 ran out of memory",
            },
        ),
        namespace,
    )
    cluster.wait_for(
        "pod crash Failed", lambda: _phase(cluster, namespace, "crash") == "Failed", timeout=bounds.reactions(3)
    )
    pod = cluster.get_json("pod", "crash", namespace=namespace)
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 137
    assert term["reason"] == "OOMKilled"
    assert term["message"] == "rank 0 ran out of memory"
    assert pod["status"]["reason"] == "OOMKilled"


def test_failure_takes_precedence_over_job_completion(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("doomed", completions=1, annotations={A + "fail": "true", A + "exit-code": "3"}), namespace)
    job = cluster.wait_for(
        "job doomed Failed", lambda: _job_condition(cluster, namespace, "doomed", "Failed"), bounds.reactions(5)
    )
    assert job["status"].get("succeeded", 0) == 0
    pods = _job_pods(cluster, namespace, "doomed")
    assert pods, "the Job's pod is gone"
    assert all(p["status"]["phase"] == "Failed" for p in pods)
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_a_deleted_running_job_pod_goes_and_frees_its_gpu(cluster: Cluster, namespace: str) -> None:
    """A running pod of a Job with a podFailurePolicy (as every gang's) holds the Job controller's
    job-tracking finalizer, which it removes only once the pod is terminal. Deleted with its namespace,
    the pod must be terminated (pod-terminate), then removed (pod-delete) — it once stayed Running with
    its GPU allocated for the rest of the run."""
    job = _job("gang", annotations={A + "hold": "true"})
    job["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    job["spec"]["podFailurePolicy"] = {
        "rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3]}}]
    }
    cluster.apply(job, namespace)
    [pod] = cluster.wait_for(
        "the gang's pod Running with the job-tracking finalizer",
        lambda: [
            p
            for p in _job_pods(cluster, namespace, "gang")
            if p["status"].get("phase") == "Running"
            and "batch.kubernetes.io/job-tracking" in p["metadata"]["finalizers"]
        ],
        timeout=bounds.reactions(3),
    )
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    name = pod["metadata"]["name"]
    cluster.wait_for(
        f"pod {namespace}/{name} gone after its namespace was deleted",
        lambda: cluster.kubectl_result("get", "pod", name, "-n", namespace).returncode != 0,
        timeout=bounds.reactions(4),  # namespace controller, job controller (finalizer), kwok twice
    )


def test_hold_keeps_job_pod_running_until_removed(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("held", completions=1, annotations={A + "hold": "true"}), namespace)

    def running_pod() -> str | None:
        pods = _job_pods(cluster, namespace, "held")
        return pods[0]["metadata"]["name"] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod = cluster.wait_for("held pod Running", running_pod, timeout=bounds.reactions(3))
    _stays(cluster, "the held pod to stay Running", lambda: _phase(cluster, namespace, pod) == "Running", 3)
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, A + "hold-")
    cluster.wait_for(
        "job held Complete", lambda: _job_condition(cluster, namespace, "held", "Complete"), bounds.reactions(3)
    )


def test_held_pod_fails_on_demand(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("rank", completions=1, annotations={A + "hold": "true"}), namespace)
    pod = cluster.wait_for(
        "held pod Running",
        lambda: next(
            (
                p["metadata"]["name"]
                for p in _job_pods(cluster, namespace, "rank")
                if p["status"].get("phase") == "Running"
            ),
            None,
        ),
        timeout=bounds.reactions(3),  # job controller, scheduler, kwok
    )
    cluster.kubectl(
        "annotate",
        "pod",
        pod,
        "-n",
        namespace,
        "--overwrite",
        f"{A}fail=true",
        f"{A}exit-code=42",
        f"{A}reason=NCCLTimeout",
        f"{A}hold-",
    )
    cluster.wait_for("pod Failed", lambda: _phase(cluster, namespace, pod) == "Failed", timeout=bounds.reactions(2))
    term = cluster.get_json("pod", pod, namespace=namespace)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (42, "NCCLTimeout")
    cluster.wait_for(
        "job rank Failed", lambda: _job_condition(cluster, namespace, "rank", "Failed"), bounds.reactions(2)
    )


def test_finish_after_delays_completion(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("slow", completions=1, annotations={A + "finish-after": "4s"}), namespace)
    cluster.wait_for(
        "job slow Complete",
        lambda: _job_condition(cluster, namespace, "slow", "Complete"),
        bounds.reactions(5, periods=4),
    )
    pod = _job_pods(cluster, namespace, "slow")[0]
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    started = datetime.fromisoformat(pod["status"]["startTime"].replace("Z", "+00:00"))
    finished = datetime.fromisoformat(term["finishedAt"].replace("Z", "+00:00"))
    assert (finished - started).total_seconds() >= 3, (started, finished)


def test_bare_pods_run_until_asked_to_complete(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_bare_pod("worker"), namespace)
    cluster.wait_for(
        "pod worker Running", lambda: _phase(cluster, namespace, "worker") == "Running", bounds.reactions(2)
    )
    _stays(cluster, "a bare pod to stay Running", lambda: _phase(cluster, namespace, "worker") == "Running", 2)
    cluster.kubectl("annotate", "pod", "worker", "-n", namespace, f"{A}complete=true")
    cluster.wait_for(
        "pod worker Succeeded", lambda: _phase(cluster, namespace, "worker") == "Succeeded", bounds.reactions(2)
    )


def test_helm_installs_a_chart(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    assert "v4." in cluster.helm("version")
    chart = tmp_path / "demo"
    cluster.helm("create", str(chart))
    cluster.helm(
        "install",
        "demo",
        str(chart),
        "-n",
        namespace,
        "--wait",
        "--timeout",
        "90s",
        "--set",
        f"image.repository={IMAGE.split(':')[0]}",
        timeout=120,
    )
    dep = cluster.get_json("deployment", "demo", namespace=namespace)
    assert dep["status"].get("readyReplicas") == 1
    assert "demo" in cluster.helm("list", "-n", namespace, "-q")
    cluster.helm("uninstall", "demo", "-n", namespace, "--wait", timeout=120)


def test_hold_cancels_a_pending_finish_after(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_job("later", completions=1, annotations={A + "finish-after": "4s"}), namespace)
    pod = cluster.wait_for(
        "pod Running",
        lambda: next(
            (
                p["metadata"]["name"]
                for p in _job_pods(cluster, namespace, "later")
                if p["status"].get("phase") == "Running"
            ),
            None,
        ),
        timeout=bounds.reactions(3),  # job controller, scheduler, kwok
    )
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, f"{A}hold=true")
    _stays(
        cluster,
        "the held pod to stay Running past finish-after",
        lambda: _phase(cluster, namespace, pod) == "Running",
        6,
    )
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, f"{A}hold-")
    cluster.wait_for(
        "job later Complete", lambda: _job_condition(cluster, namespace, "later", "Complete"), bounds.reactions(3)
    )
