"""The operator against a real control plane: FineTuneJob → training gang → status, through failures.

The operator runs as a local process with the admin kubeconfig; kwok plays the kubelets, and pod
annotations (hack/testcluster/README.md) decide when a trainer pod completes or fails and with which
exit code.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds

if TYPE_CHECKING:
    from conftest import Cluster, Operator

REPO = Path(__file__).resolve().parents[2]
HOLD = "testcluster.finetune.io/hold"
A = "testcluster.finetune.io/"


def manifest(name: str, *, nodes: int = 2, hold: bool = True, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "org/model"},
        "data": {"train": {"uri": "s3://data/train.jsonl"}},
        "training": {"maxSteps": 100},
        "distributed": {"nodes": nodes, "procsPerNode": 2},
        "resources": {"gpusPerNode": 2, "podAnnotations": {HOLD: "true"} if hold else {}},
        "checkpoint": {"uri": "s3://ckpt", "credentials": {"name": "s3-creds"}},
        # The gang's lifecycle: no preflight first (tests/e2e/test_e2e_preflight.py drives that one).
        "preflight": {"mode": "skip"},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def annotate(cluster: Cluster, ns: str, pod: str, *pairs: str) -> None:
    cluster.kubectl("annotate", "--overwrite", "-n", ns, "pod", pod, *pairs)


def release(cluster: Cluster, ns: str, job: str) -> None:
    for p in cluster.job_pods(ns, job):
        annotate(cluster, ns, p["metadata"]["name"], f"{HOLD}-")


def fail(cluster: Cluster, ns: str, pod: str, code: int, reason: str = "Error", message: str = "") -> None:
    annotate(
        cluster,
        ns,
        pod,
        f"{A}fail=true",
        f"{A}exit-code={code}",
        f"{A}reason={reason}",
        f"{A}message={message}",
        f"{HOLD}-",
    )


def test_create_run_succeed(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm"), namespace=ns)
    job = cluster.wait_for(
        "Job llm-a0", lambda: cluster.get_json("job", "llm-a0", namespace=ns), timeout=bounds.OPERATOR_S
    )
    for kind, name in [
        ("configmap", "llm-config"),
        ("service", "llm"),
        ("serviceaccount", "llm-trainer"),
        ("role", "llm-trainer"),
        ("rolebinding", "llm-trainer"),
    ]:
        obj = cluster.get_json(kind, name, namespace=ns)
        assert obj["metadata"]["ownerReferences"][0]["name"] == "llm"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    running = cluster.running_pods(ns, "llm-a0", 2)
    for index, p in enumerate(running):
        assert p["spec"]["hostname"] == f"llm-a0-{index}" and p["spec"]["subdomain"] == "llm"
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        assert env["MASTER_ADDR"] == "llm-a0-0.llm" and env["FINETUNE_JOB_NAME"] == "llm"
        assert p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
    s = cluster.wait_phase(ns, "llm", "Running")
    assert s["startTime"] and s["observedGeneration"] == 1
    release(cluster, ns, "llm-a0")
    s = cluster.wait_phase(ns, "llm", "Succeeded")
    assert s["completionTime"] and s["restarts"] == 0
    kinds = {c["type"]: c["status"] for c in s["conditions"]}
    assert kinds == {"Created": "True", "Running": "False", "Succeeded": "True"}
    columns = cluster.kubectl("get", "ftj", "llm", "-n", ns)
    assert "Succeeded" in columns
    events = cluster.get_json("events", "--field-selector", "involvedObject.name=llm", namespace=ns)["items"]
    assert {"Creating", "AllPodsRunning", "Completed"} <= {e["reason"] for e in events}
    assert "finetune_operator_jobs_created_total" in operator.metrics()


def test_a_job_waits_for_the_job_whose_model_it_takes_then_trains_on_its_output(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    cluster.apply(manifest("sft", model={"uri": "ftj://cpt"}), namespace=ns)

    def ready_condition(name: str, status: str) -> dict[str, Any] | None:
        conditions = cluster.ftj_status(ns, name).get("conditions") or []
        return next((c for c in conditions if c["type"] == "DependencyReady" and c["status"] == status), None)

    waiting = cluster.wait_for(
        "sft waiting for cpt", lambda: ready_condition("sft", "False"), timeout=bounds.OPERATOR_S
    )
    assert waiting["reason"] == "WaitingForJob" and "FineTuneJob cpt, which does not exist" in waiting["message"]
    assert cluster.ftj_status(ns, "sft")["phase"] == "Pending"
    for kind, name in (("job", "sft-a0"), ("configmap", "sft-config")):
        assert cluster.kubectl_result("get", kind, name, "-n", ns).returncode != 0, f"{kind} {name} exists already"

    cluster.apply(manifest("cpt", output={"save": "merged"}), namespace=ns)
    cluster.running_pods(ns, "cpt-a0", 2)
    # What the trainer's status reporter writes when it has saved its outputs (kwok pods do not train).
    merged = {"kind": "merged", "uri": f"s3://ckpt/{ns}/cpt/output/merged", "sha256": "ab" * 32, "bytes": 1234}
    cluster.kubectl(
        "patch", "ftj", "cpt", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"artifacts": [merged]}}),
    )  # fmt: skip
    cluster.wait_for(
        "sft waiting for cpt to succeed",
        lambda: (c := ready_condition("sft", "False")) and c["message"].endswith("to succeed (it is Running)"),
        timeout=30,  # woken by the events of the job it waits for (and polled every 10 s)
    )
    release(cluster, ns, "cpt-a0")
    cluster.wait_phase(ns, "cpt", "Succeeded")
    cluster.wait_for("the dependent job's gang", lambda: cluster.get_json("job", "sft-a0", namespace=ns), timeout=30)
    status = cluster.ftj_status(ns, "sft")
    assert status["dependencies"] == [
        {"field": "spec.model.uri", "job": "cpt", "uri": merged["uri"], "sha256": merged["sha256"]}
    ]
    assert ready_condition("sft", "True") is not None
    config = json.loads(cluster.get_json("configmap", "sft-config", namespace=ns)["data"]["trainer-config.json"])
    assert config["spec"]["model"]["uri"] == merged["uri"] and config["modelDigests"] == {merged["uri"]: "ab" * 32}

    # A dependency that fails fails the job that waits for it.
    cluster.apply(manifest("dpo", model={"uri": "ftj://bad"}), namespace=ns)
    cluster.apply(manifest("bad"), namespace=ns)
    fail(cluster, ns, cluster.running_pods(ns, "bad-a0", 2)[0]["metadata"]["name"], 2, "Error", "bad config")
    s = cluster.wait_phase(ns, "dpo", "Failed", timeout=30 + bounds.PHASE_S)
    failed = next(c for c in s["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DependencyFailed" and "FineTuneJob bad failed" in failed["message"], failed
    assert cluster.kubectl_result("get", "job", "dpo-a0", "-n", ns).returncode != 0


def test_retriable_failure_restarts_the_gang(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm", runPolicy={"backoffLimit": 2}), namespace=ns)
    first = cluster.running_pods(ns, "llm-a0", 2)
    fail(cluster, ns, first[1]["metadata"]["name"], 137, "OOMKilled", "CUDA out of memory")
    s = cluster.wait_for("restart count 1", lambda: (x := cluster.ftj_status(ns, "llm")).get("restarts") == 1 and x)
    assert s["lastFailure"]["reason"] == "OOMKilled" and s["lastFailure"]["exitCode"] == 137
    second = cluster.running_pods(ns, "llm-a1", 2)
    assert {p["spec"]["hostname"] for p in second} == {"llm-a1-0", "llm-a1-1"}
    assert cluster.kubectl_result("get", "job", "llm-a0", "-n", ns).returncode != 0, "the failed gang was not replaced"
    release(cluster, ns, "llm-a1")
    s = cluster.wait_phase(ns, "llm", "Succeeded")
    assert s["restarts"] == 1
    restarting = next(c for c in s["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "False" and restarting["reason"] == "Succeeded"


def test_a_node_lost_under_a_running_gang_restarts_it_at_once(cluster: Cluster, operator: Operator, ns: str) -> None:
    # A node of this test's own (kwok plays its kubelet), so that deleting it takes no other test's pods.
    node_name, pool = f"kwok-{ns}", {"testcluster.finetune.io/pool": ns}
    gpus = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"}
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": node_name, **pool},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "status": {"capacity": gpus, "allocatable": gpus},
    }
    cluster.apply(node)
    try:
        cluster.apply(manifest("llm", runPolicy={"backoffLimit": 2}, resources={"nodeSelector": pool}), namespace=ns)
        first = cluster.running_pods(ns, "llm-a0", 2)
        assert {p["spec"]["nodeName"] for p in first} == {node_name}
        cluster.kubectl("delete", "node", node_name, "--wait=false")
        # The operator watches nodes: the gang restarts on the deletion, not when its ranks' collectives
        # time out nor when the pod garbage collector gets to the orphaned pods.
        s = cluster.wait_for(
            "restart after the node loss",
            lambda: (x := cluster.ftj_status(ns, "llm")).get("restarts") == 1 and x,
            timeout=bounds.OPERATOR_S,
        )
        assert s["lastFailure"]["reason"] == "NodeLost", s["lastFailure"]
        assert s["lastFailure"]["message"].startswith(f"node {node_name} of pod llm-a0-"), s["lastFailure"]
        assert next(c for c in s["conditions"] if c["type"] == "Restarting")["reason"] == "NodeLost"
        # Attempt 1 does not wait for the pods on the deleted node (nothing runs there): its Job is
        # created at once, and its pods run when a node of the pool is back.
        cluster.wait_for("Job llm-a1", lambda: cluster.kubectl_result("get", "job", "llm-a1", "-n", ns).returncode == 0)
        cluster.apply(node)
        cluster.running_pods(ns, "llm-a1", 2)
        s = cluster.wait_phase(ns, "llm", "Running")
        assert s["restarts"] == 1
    finally:
        cluster.kubectl("delete", "node", node_name, "--ignore-not-found", "--wait=false")


def test_permanent_exit_code_fails_at_once(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm"), namespace=ns)
    first = cluster.running_pods(ns, "llm-a0", 2)
    fail(cluster, ns, first[0]["metadata"]["name"], 3, "Error", "train.jsonl:7: missing column completion")
    s = cluster.wait_phase(ns, "llm", "Failed")
    failed = next(c for c in s["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidData" and "train.jsonl:7" in failed["message"]
    assert s["restarts"] == 0 and s["lastFailure"]["exitCode"] == 3


def test_backoff_exhausted_fails(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm", runPolicy={"backoffLimit": 0}), namespace=ns)
    first = cluster.running_pods(ns, "llm-a0", 2)
    fail(cluster, ns, first[0]["metadata"]["name"], 1)
    s = cluster.wait_phase(ns, "llm", "Failed")
    assert next(c for c in s["conditions"] if c["type"] == "Failed")["reason"] == "BackoffLimitExceeded"


def test_suspend_and_resume(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm", runPolicy={"suspend": True}), namespace=ns)
    cluster.wait_phase(ns, "llm", "Suspended")
    assert cluster.get_json("job", "llm-a0", namespace=ns)["spec"]["suspend"] is True
    assert cluster.job_pods(ns, "llm-a0") == []
    cluster.kubectl("patch", "ftj", "llm", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    cluster.running_pods(ns, "llm-a0", 2)
    cluster.wait_phase(ns, "llm", "Running")
    cluster.kubectl("patch", "ftj", "llm", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    cluster.wait_phase(ns, "llm", "Suspended")
    # The operator suspends the Job, the job controller deletes its pods, kwok finishes deleting them.
    gone = bounds.operator(3)
    cluster.wait_for("pods gone after suspend", lambda: cluster.job_pods(ns, "llm-a0") == [], timeout=gone)


def test_deadline_exceeded(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm", runPolicy={"activeDeadlineSeconds": 4}), namespace=ns)
    s = cluster.wait_phase(ns, "llm", "Failed", timeout=4 + bounds.PHASE_S)
    assert next(c for c in s["conditions"] if c["type"] == "Failed")["reason"] == "DeadlineExceeded"


def test_ttl_deletes_finished_job_and_children(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm", hold=False, runPolicy={"ttlSecondsAfterFinished": 2}), namespace=ns)
    cluster.wait_for(
        "the finished FineTuneJob deleted by its TTL",
        lambda: cluster.kubectl_result("get", "ftj", "llm", "-n", ns).returncode != 0,
        timeout=bounds.PODS_RUNNING_S + bounds.PHASE_S + 2,  # pods run and complete, then the 2 s TTL
    )
    for kind in ("configmap", "service", "serviceaccount", "role", "rolebinding", "job"):
        cluster.wait_for(
            f"{kind}s of llm garbage-collected",
            lambda kind=kind: not cluster.get_json(kind, "-l", "finetune.io/job=llm", namespace=ns)["items"],
            timeout=bounds.reactions(2),  # the garbage collector, then kwok for pods
        )


def test_delete_removes_every_child(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.apply(manifest("llm"), namespace=ns)
    cluster.running_pods(ns, "llm-a0", 2)
    cluster.kubectl("delete", "ftj", "llm", "-n", ns, "--wait=false")
    for kind in ("configmap", "service", "serviceaccount", "role", "rolebinding", "job", "pod"):
        cluster.wait_for(
            f"{kind}s of llm garbage-collected",
            lambda kind=kind: not cluster.get_json(kind, "-l", "finetune.io/job=llm", namespace=ns)["items"],
            timeout=bounds.reactions(3),  # the garbage collector (FineTuneJob, then Job), then kwok for pods
        )


def test_same_name_in_two_namespaces(cluster: Cluster, operator: Operator, ns: str) -> None:
    other = f"{ns}-b"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other}})
    try:
        cluster.apply(manifest("twin"), namespace=ns)
        cluster.apply(manifest("twin", runPolicy={"backoffLimit": 0}), namespace=other)
        cluster.running_pods(ns, "twin-a0", 2)
        other_pods = cluster.running_pods(other, "twin-a0", 2)
        fail(cluster, other, other_pods[0]["metadata"]["name"], 1)
        cluster.wait_phase(other, "twin", "Failed")
        release(cluster, ns, "twin-a0")
        cluster.wait_phase(ns, "twin", "Succeeded")
        assert cluster.ftj_status(other, "twin")["phase"] == "Failed"
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false")


def test_restricted_pod_security_admits_trainer_pods(cluster: Cluster, operator: Operator, ns: str) -> None:
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", "--overwrite")
    cluster.apply(manifest("llm"), namespace=ns)
    running = cluster.running_pods(ns, "llm-a0", 2)
    volumes = {v["name"]: v for v in running[0]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_operator_killed_mid_creation_converges_without_duplicates(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    op = operator
    names = [f"burst-{i}" for i in range(12)]
    # No GPUs: a dozen gangs must fit on the kwok nodes beside what earlier tests leave behind.
    burst = [manifest(n, nodes=1, resources={"gpusPerNode": 0}) for n in names]
    cluster.apply({"apiVersion": "v1", "kind": "List", "items": burst}, namespace=ns)
    # Kill it while it is part-way through: some jobs have children, some do not yet.
    cluster.wait_for(
        "the operator to start creating children",
        lambda: (
            len(
                cluster.get_json("configmaps", "-l", "app.kubernetes.io/managed-by=finetune-operator", namespace=ns)[
                    "items"
                ]
            )
            >= 1
        ),
        timeout=bounds.OPERATOR_S,
    )
    op.kill(signal.SIGKILL)
    partial = len(cluster.get_json("jobs", namespace=ns)["items"])
    op.start()  # the same operator, restarted: the module's later tests go on with it
    try:
        for name in names:
            cluster.wait_phase(ns, name, "Running", timeout=bounds.PODS_RUNNING_S + bounds.PHASE_S)
        for kind in ("jobs", "configmaps", "services", "serviceaccounts", "roles", "rolebindings"):
            items = cluster.get_json(kind, "-l", "app.kubernetes.io/managed-by=finetune-operator", namespace=ns)[
                "items"
            ]
            owners = [i["metadata"]["labels"]["finetune.io/job"] for i in items]
            assert sorted(owners) == sorted(names), f"{kind}: {owners}"
        assert partial <= len(names)
    finally:
        assert op.proc is not None and op.proc.poll() is None, "the restarted operator died"


def test_operator_metrics(operator: Operator) -> None:
    text = operator.metrics()
    for name in (
        "finetune_operator_jobs",
        "finetune_operator_jobs_created_total",
        "finetune_operator_reconcile_duration_seconds_bucket",
        "finetune_operator_jobs_restarted_total",
    ):
        assert name in text, name
    assert json.dumps(text)  # served as text, parseable


def test_immutable_fields_are_refused_and_mutable_ones_accepted(cluster: Cluster, crd_installed: None, ns: str) -> None:
    cluster.apply(manifest("llm", runPolicy={"suspend": True}), namespace=ns)
    for patch, field in [
        ({"model": {"uri": "org/other-model"}}, "spec.model"),
        ({"method": {"type": "full"}}, "spec.method"),
        ({"training": {"maxSteps": 5}}, "spec.training"),
        ({"distributed": {"nodes": 4}}, "spec.distributed"),
        ({"checkpoint": {"uri": "s3://elsewhere"}}, "spec.checkpoint.uri"),
    ]:
        result = cluster.kubectl_result(
            "patch", "ftj", "llm", "-n", ns, "--type=merge", "-p", json.dumps({"spec": patch})
        )
        assert result.returncode != 0, f"{field} changed"
        assert f"{field} cannot change after the job is created" in result.stderr, result.stderr
    for patch in [
        {"runPolicy": {"suspend": False, "backoffLimit": 7}},
        {"resources": {"podLabels": {"team": "nlp"}}},
        {"output": {"uri": "s3://models/llm"}},
    ]:
        cluster.kubectl("patch", "ftj", "llm", "-n", ns, "--type=merge", "-p", json.dumps({"spec": patch}))
