"""The Helm chart on a real control plane: install, run the operator with ONLY the chart's RBAC, uninstall.

`helm install` creates the CRD, the operator Deployment (its pod admitted under the *restricted* Pod
Security profile; kwok plays the kubelet, so no container runs), ServiceAccount and RBAC. The operator
itself then runs as a local process with exactly the arguments rendered into the installed
Deployment and a kubeconfig holding nothing but a TokenRequest token of the chart's ServiceAccount.
A FineTuneJob driven through its whole life (children, status, a retriable failure, suspend and
resume, a spec change, success, TTL deletion) proves the chart's RBAC is sufficient; any RBAC denial
in the operator's log fails the test. `helm uninstall` must leave nothing but the CRD.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds
import yaml
from polling import free_port

if TYPE_CHECKING:
    from conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CRD_NAME = "finetunejobs.finetune.io"
A = "testcluster.finetune.io/"
HOLD = f"{A}hold"
INSTANCE = "app.kubernetes.io/instance"
NAMESPACED_KINDS = ("deployments", "replicasets", "pods", "services", "serviceaccounts", "roles", "rolebindings")
CLUSTER_KINDS = ("clusterroles", "clusterrolebindings")
#: What kopf logs when a watch or list it wants is forbidden (it then degrades instead of failing).
KOPF_FORBIDDEN = "Not enough permissions"


def uid() -> str:
    return uuid.uuid4().hex[:6]


def restricted_namespace(cluster: Cluster, name: str) -> str:
    """A namespace whose pods must pass the restricted Pod Security profile (enforced at admission)."""
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }
    )
    return name


def example_job(namespace: str) -> dict[str, Any]:
    """examples/lora-sft-2-nodes.yaml, made to fit the kwok nodes and to hold its pods until released."""
    job: dict[str, Any] = copy.deepcopy(yaml.safe_load((REPO / "examples" / "lora-sft-2-nodes.yaml").read_text()))
    job["metadata"]["namespace"] = namespace
    spec = job["spec"]
    spec["resources"].update(
        gpusPerNode=2,
        cpu=1,
        memory="1Gi",
        sharedMemory="1Gi",
        nodeSelector={"nvidia.com/gpu.present": "true"},
        podAnnotations={HOLD: "true"},
    )
    spec["runPolicy"] = {"backoffLimit": 2, "ttlSecondsAfterFinished": 3}
    # kwok runs no containers, so no preflight pod could read the data (tests/e2e/test_e2e_preflight.py).
    spec["preflight"] = {"mode": "skip"}
    return job


# -- helm ------------------------------------------------------------------------------------------------


def helm_install(cluster: Cluster, release: str, namespace: str, *sets: str) -> None:
    args = ["install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s"]
    for s in sets:
        args += ["--set", s]
    cluster.helm(*args, timeout=180)


def release_objects(cluster: Cluster, release: str) -> list[str]:
    """Every object of these kinds labelled with the release, as 'kind ns/name'."""
    found = []
    selector = f"{INSTANCE}={release}"
    for kind in NAMESPACED_KINDS:
        for item in cluster.get_json(kind, "-A", "-l", selector)["items"]:
            found.append(f"{kind} {item['metadata']['namespace']}/{item['metadata']['name']}")
    for kind in CLUSTER_KINDS:
        for item in cluster.get_json(kind, "-l", selector)["items"]:
            found.append(f"{kind} {item['metadata']['name']}")
    return found


def uninstall_leaves_only_the_crd(cluster: Cluster, release: str, namespace: str) -> None:
    cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", timeout=180)
    leftovers: list[str] = []

    def gone() -> bool:
        leftovers[:] = release_objects(cluster, release)
        return not leftovers

    cluster.wait_for(f"every object of release {release} deleted (left: {leftovers})", gone, timeout=90)
    established = cluster.get_json("crd", CRD_NAME)["status"]["conditions"]
    assert any(c["type"] == "Established" and c["status"] == "True" for c in established), (
        "helm uninstall must keep the CRD (files in crds/ are never deleted)"
    )


# -- the operator, run locally as the chart's ServiceAccount -----------------------------------------------


class ChartOperator:
    """`finetune-operator` with the installed Deployment's args and only its ServiceAccount's token."""

    def __init__(self, cluster: Cluster, namespace: str, deployment: str, workdir: Path):
        self.cluster = cluster
        obj = cluster.get_json("deployment", deployment, namespace=namespace)
        pod = obj["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        self.args: list[str] = container["args"]
        self.service_account = f"system:serviceaccount:{namespace}:{pod['serviceAccountName']}"
        token = cluster.kubectl("create", "token", pod["serviceAccountName"], "-n", namespace, "--duration=1h").strip()
        self.kubeconfig = cluster.write_token_kubeconfig(workdir / "operator.kubeconfig", token)
        self.log = workdir / "operator.log"
        self.health_port = int(next(a for a in self.args if a.startswith("--health-port=")).split("=", 1)[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).with_name("finetune-operator")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        env.pop("KUBERNETES_SERVICE_PORT", None)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(exe), *self.args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.cluster.wait_for("the operator's /healthz", self._healthy, timeout=60)

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"operator exited:\n{self.log_text()[-4000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            return r.status == 200

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rbac_denials(self) -> list[str]:
        """Log lines where the API server refused this ServiceAccount, or kopf said it could not watch."""
        denied = re.compile(rf"{re.escape(self.service_account)}\W+cannot|{KOPF_FORBIDDEN}")
        return [line for line in self.log_text().splitlines() if denied.search(line)]

    def failed_reconciles(self) -> list[str]:
        """Reconciles that raised an API error (the operator retries them). Some requests succeed for an
        admin and fail for a least-privilege account: a RoleBinding created before its Role exists is
        refused (404 NotFound) to a creator without `bind`, because the API server's escalation check
        must read the Role to compare its rules with the creator's; an admin skips that check. So the
        operator must create each trainer Role before its RoleBinding, never both at once."""
        return [line for line in self.log_text().splitlines() if re.search(r"reconcile of \S+ failed", line)]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def chart_operator(cluster: Cluster, namespace: str, deployment: str, workdir: Path) -> Iterator[ChartOperator]:
    op = ChartOperator(cluster, namespace, deployment, workdir)
    op.start()
    try:
        yield op
    finally:
        op.stop()


# -- driving a FineTuneJob ----------------------------------------------------------------------------------


def release_pods(cluster: Cluster, ns: str, job: str) -> None:
    for p in cluster.job_pods(ns, job):
        cluster.kubectl("annotate", "--overwrite", "-n", ns, "pod", p["metadata"]["name"], f"{HOLD}-")


def children_created(cluster: Cluster, ns: str, name: str) -> None:
    for kind, child in [
        ("configmap", f"{name}-config"),
        ("service", name),
        ("serviceaccount", f"{name}-trainer"),
        ("role", f"{name}-trainer"),
        ("rolebinding", f"{name}-trainer"),
        ("job", f"{name}-a0"),
    ]:
        obj = cluster.wait_for(
            f"{kind} {ns}/{child} created by the operator",
            lambda kind=kind, child=child: cluster.get_json(kind, child, namespace=ns),
            timeout=bounds.OPERATOR_S,
        )
        assert obj["metadata"]["ownerReferences"][0]["name"] == name


def drive_through_a_whole_life(cluster: Cluster, op: ChartOperator, ns: str) -> None:
    """Every API call the operator makes, made with the chart's RBAC: create children, derive status,
    replace a changed ConfigMap, replace a failed gang, suspend and resume, post events, delete by TTL."""
    try:
        _drive(cluster, op, ns)
    except AssertionError as exc:
        # A wait that timed out: show why, when the API server refused the operator something.
        denied = "\n".join(dict.fromkeys(op.rbac_denials() + op.failed_reconciles()))
        raise AssertionError(f"{exc}\noperator log ({op.log}), denials and failed reconciles:\n{denied}") from exc


def _drive(cluster: Cluster, op: ChartOperator, ns: str) -> None:
    job = example_job(ns)
    name = job["metadata"]["name"]
    cluster.apply(job)
    children_created(cluster, ns, name)
    cluster.running_pods(ns, f"{name}-a0", 2)
    cluster.wait_phase(ns, name, "Running")

    # A spec change that changes the trainer config: the operator reads and replaces its ConfigMap.
    before = cluster.get_json("configmap", f"{name}-config", namespace=ns)["data"]
    cluster.kubectl(
        "patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"output":{"uri":"s3://ml-team-models/v2"}}}'
    )
    cluster.wait_for(
        "the trainer ConfigMap replaced after spec.output changed",
        lambda: (
            (d := cluster.get_json("configmap", f"{name}-config", namespace=ns)["data"]) != before
            and "s3://ml-team-models/v2" in str(d)
        ),
        timeout=bounds.OPERATOR_S,
    )

    # A retriable failure: the operator deletes the failed gang's Job and creates the next attempt.
    first = cluster.running_pods(ns, f"{name}-a0", 2)
    cluster.kubectl(
        "annotate",
        "--overwrite",
        "-n",
        ns,
        "pod",
        first[1]["metadata"]["name"],
        f"{A}fail=true",
        f"{A}exit-code=137",
        f"{A}reason=OOMKilled",
        f"{HOLD}-",
    )
    cluster.wait_for(
        f"{ns}/{name} restarted once",
        lambda: cluster.ftj_status(ns, name).get("restarts") == 1,
        timeout=bounds.PHASE_S,  # kwok fails the pod, the job controller the Job, the operator restarts
    )
    cluster.running_pods(ns, f"{name}-a1", 2)
    cluster.wait_for(
        f"the failed Job {ns}/{name}-a0 deleted",
        lambda: cluster.kubectl_result("get", "job", f"{name}-a0", "-n", ns).returncode != 0,
        timeout=bounds.OPERATOR_S,
    )

    # Suspend and resume: the operator patches the Job's spec.suspend.
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    cluster.wait_phase(ns, name, "Suspended")
    assert cluster.get_json("job", f"{name}-a1", namespace=ns)["spec"]["suspend"] is True
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    cluster.running_pods(ns, f"{name}-a1", 2)
    cluster.wait_phase(ns, name, "Running")

    # Success; the operator's Events; then ttlSecondsAfterFinished: the operator deletes the FineTuneJob.
    release_pods(cluster, ns, f"{name}-a1")
    s = cluster.wait_phase(ns, name, "Succeeded")
    assert s["restarts"] == 1 and s["completionTime"]
    events = cluster.get_json("events", "--field-selector", f"involvedObject.name={name}", namespace=ns)["items"]
    assert "Completed" in {e["reason"] for e in events}, [e["reason"] for e in events]
    cluster.wait_for(
        f"FineTuneJob {ns}/{name} deleted by its TTL",
        lambda: cluster.kubectl_result("get", "ftj", name, "-n", ns).returncode != 0,
        timeout=3 + bounds.OPERATOR_S,  # ttlSecondsAfterFinished 3, then the operator deletes it
    )
    assert op.proc is not None and op.proc.poll() is None, f"operator exited:\n{op.log_text()[-4000:]}"
    assert not op.rbac_denials(), "the chart's RBAC denied the operator:\n" + "\n".join(op.rbac_denials())
    assert not op.failed_reconciles(), "reconciles failed under the chart's RBAC:\n" + "\n".join(op.failed_reconciles())


def can_i(cluster: Cluster, subject: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    out = cluster.kubectl_result("auth", "can-i", verb, resource, *scope, f"--as={subject}")
    return out.stdout.strip() == "yes"


# -- tests ---------------------------------------------------------------------------------------------------


def helm_test_check(
    cluster: Cluster, release: str, namespace: str, op: ChartOperator, *, timeout: int
) -> subprocess.CompletedProcess[str]:
    """The `helm test` pod's command, as the release renders it, run here as the chart's ServiceAccount
    (kwok runs no containers). Its health URL names the operator's Service; the operator runs here, so
    the Service's host becomes 127.0.0.1 (the port is the chart's healthPort, which the operator serves)."""
    hooks = [d for d in yaml.safe_load_all(cluster.helm("get", "hooks", release, "-n", namespace)) if d]
    (pod,) = [d for d in hooks if d["kind"] == "Pod" and d["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    args = [re.sub(r"^--timeout=.*", f"--timeout={timeout}", a) for a in container["args"]]
    args = [re.sub(r"^(--health-url=http://)[^:/]+", r"\g<1>127.0.0.1", a) for a in args]
    assert f"--health-url=http://127.0.0.1:{op.health_port}/healthz" in args, container["args"]
    exe = Path(sys.executable).with_name(container["command"][0])
    env = {**os.environ, "KUBECONFIG": str(op.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_cluster_scope_install_run_uninstall(cluster: Cluster, tmp_path: Path) -> None:
    release = f"fto-{uid()}"
    system = restricted_namespace(cluster, f"fto-system-{uid()}")
    jobs_ns = f"fto-jobs-{uid()}"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": jobs_ns}})
    helm_install(
        cluster,
        release,
        system,
        f"operator.metricsPort={free_port()}",
        f"operator.healthPort={free_port()}",
        "trainer.image.repository=trainer",
        "trainer.image.tag=e2e",
    )
    try:
        crd = cluster.wait_for(
            "the chart's CRD Established",
            lambda: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in cluster.get_json("crd", CRD_NAME).get("status", {}).get("conditions", [])
            ),
            timeout=60,
        )
        assert crd
        fullname = f"{release}-finetune-operator"
        deployment = cluster.get_json("deployment", fullname, namespace=system)
        assert deployment["status"].get("availableReplicas") == 2, deployment["status"]  # a leader, a standby
        # The pod exists in a namespace enforcing the restricted Pod Security profile: it was admitted.
        assert cluster.get_json("pods", "-l", f"{INSTANCE}={release}", namespace=system)["items"]
        cluster.get_json("serviceaccount", fullname, namespace=system)
        cluster.get_json("clusterrole", fullname)
        binding = cluster.get_json("clusterrolebinding", fullname)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": system}]
        service = cluster.get_json("service", f"{fullname}-metrics", namespace=system)
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics", "health"]

        with chart_operator(cluster, system, fullname, tmp_path) as op:
            assert "--all-namespaces" in op.args and "--trainer-image=trainer:e2e" in op.args
            subject = op.service_account
            assert not can_i(cluster, subject, "get", "secrets", jobs_ns), "the operator must not read Secrets"
            assert not can_i(cluster, subject, "create", "pods", jobs_ns), "the Job controller creates pods, not us"
            drive_through_a_whole_life(cluster, op, jobs_ns)
            healthy = helm_test_check(cluster, release, system, op, timeout=60)
            assert healthy.returncode == 0, healthy.stdout + healthy.stderr
            assert "ok: the operator is healthy" in healthy.stdout, healthy.stdout
            assert "ok: the API server serves finetunejobs.finetune.io/v1alpha1" in healthy.stdout, healthy.stdout
        # The operator stopped: the check fails, saying which part.
        down = helm_test_check(cluster, release, system, op, timeout=1)
        assert down.returncode == 1 and "FAIL: the operator is not healthy" in down.stdout, down.stdout
    finally:
        uninstall_leaves_only_the_crd(cluster, release, system)
        cluster.kubectl("delete", "namespace", system, jobs_ns, "--wait=false", check=False)


def test_namespaces_scope_install_run_uninstall(cluster: Cluster, tmp_path: Path) -> None:
    release = f"fto-{uid()}"
    system = restricted_namespace(cluster, f"fto-system-{uid()}")
    watched, other = f"fto-watched-{uid()}", f"fto-other-{uid()}"
    for ns in (watched, other):
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    helm_install(
        cluster,
        release,
        system,
        "rbac.scope=namespaces",
        f"watchNamespaces[0]={watched}",
        f"operator.metricsPort={free_port()}",
        f"operator.healthPort={free_port()}",
    )
    try:
        fullname = f"{release}-finetune-operator"
        assert cluster.get_json("deployment", fullname, namespace=system)["status"].get("availableReplicas") == 2
        role = cluster.get_json("role", fullname, namespace=watched)
        binding = cluster.get_json("rolebinding", fullname, namespace=watched)
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert cluster.kubectl_result("get", "clusterrole", fullname).returncode != 0, "a ClusterRole was created"
        assert cluster.kubectl_result("get", "clusterrolebinding", fullname).returncode != 0

        with chart_operator(cluster, system, fullname, tmp_path) as op:
            assert f"--namespace={watched}" in op.args and "--all-namespaces" not in op.args
            subject = op.service_account
            assert can_i(cluster, subject, "create", "jobs.batch", watched)
            assert not can_i(cluster, subject, "create", "jobs.batch", other)
            assert not can_i(cluster, subject, "list", "finetunejobs.finetune.io"), "no cluster-wide access"
            # A job outside the watched namespace is left alone.
            ignored = example_job(other)
            cluster.apply(ignored)
            drive_through_a_whole_life(cluster, op, watched)
            assert cluster.ftj_status(other, ignored["metadata"]["name"]) == {}
            assert not cluster.get_json("jobs", namespace=other)["items"]
    finally:
        uninstall_leaves_only_the_crd(cluster, release, system)
        cluster.kubectl("delete", "namespace", system, watched, other, "--wait=false", check=False)
