"""Fixtures for end-to-end tests against a real control plane (hack/testcluster.py).

The `cluster` fixture builds the binaries (or reuses the cache), starts etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok in a temporary directory, and stops them at the
end of the session. When anything cannot be built or started the tests FAIL: they never skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import bounds
import polling
import pytest
from polling import free_port

REPO = Path(__file__).resolve().parents[2]
TESTCLUSTER = REPO / "hack" / "testcluster.py"
E2E_DIR = Path(__file__).resolve().parent

BUILD_TIMEOUT_S = float(os.environ.get("FINETUNE_TESTCLUSTER_BUILD_TIMEOUT", "3600"))
UP_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 120.0
KUEUE_UP_TIMEOUT_S = 420.0  # `kueue` waits up to 120 s for each of its three steps (CRDs, readyz, webhooks)
#: What the `cluster` fixture builds (or waits for): not Kueue, which only the `kueue` fixture's tests need,
#: nor the storage emulators, which the trainer tests start (tests/emulators.py).
CLUSTER_COMPONENTS = ("kubectl-helm", "etcd", "kwok", "kubernetes")

T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is an `e2e` test. The tests that use the `kueue` fixture run after all the
    others: on a cold machine Kueue is still building (last, in hack/test.sh's background build) while the
    others run."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
    with_kueue = [item for item in items if "kueue" in getattr(item, "fixturenames", ())]
    if with_kueue:
        items[:] = [item for item in items if item not in with_kueue] + with_kueue


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed e2e test's report ends with the log of every operator it used (its fixture's, or one it
    started itself): what the operator did, and when, is most of what a failed wait means."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    used = [op for op in Operator.started if op in funcargs.values() or op.started_in == item.nodeid]
    for op in dict.fromkeys(used):
        lines = op.log.read_text(errors="replace").splitlines() if op.log.exists() else []
        report.sections.append((f"operator log {op.log} (last 80 lines)", "\n".join(lines[-80:])))


class KubectlError(AssertionError):
    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"kubectl {' '.join(args)} exited {returncode}\nstderr: {stderr.strip()}\nstdout: {stdout[-2000:]}"
        )


def _run_testcluster(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(TESTCLUSTER), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stderr or b"")[-6000:] if isinstance(e.stderr, bytes) else (e.stderr or "")[-6000:]
        pytest.fail(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s\n{out}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}\n{proc.stdout[-2000:]}",
            pytrace=False,
        )
    return proc


@dataclass
class Cluster:
    dir: Path
    kubeconfig: Path
    kubectl_path: Path
    helm_path: Path
    server: str
    ca_file: Path

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> str:
        """Run kubectl with the admin kubeconfig (or `kubeconfig`); return stdout.

        Raises KubectlError (with stderr) on a non-zero exit when `check`.
        """
        cmd = [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"kubectl {' '.join(args)} did not finish within {timeout:.0f}s") from e
        if check and proc.returncode != 0:
            raise KubectlError(list(args), proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def kubectl_result(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Like kubectl() but never raises on a non-zero exit; returns the CompletedProcess."""
        kubeconfig = kw.pop("kubeconfig", None) or self.kubeconfig
        timeout = kw.pop("timeout", 60.0)
        cmd = [str(self.kubectl_path), f"--kubeconfig={kubeconfig}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    def get_json(self, *args: str, namespace: str | None = None) -> Any:
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl("get", *args, *ns, "-o", "json"))

    def apply(self, manifest: str | dict[str, Any], namespace: str | None = None) -> str:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=text)

    def helm(self, *args: str, timeout: float = 120.0) -> str:
        cmd = [str(self.helm_path), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
        return proc.stdout

    @staticmethod
    def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.25) -> T:
        """Poll fn until it returns a truthy value (returned); fail after `timeout` seconds."""
        return polling.wait_for(what, fn, timeout, interval)

    # -- driving a FineTuneJob ------------------------------------------------------------------------

    def ftj_status(self, ns: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json("ftj", name, namespace=ns).get("status") or {}
        return out

    def wait_phase(self, ns: str, name: str, phase: str, timeout: float = bounds.PHASE_S) -> dict[str, Any]:
        return self.wait_for(
            f"FineTuneJob {ns}/{name} phase {phase}",
            lambda: (s := self.ftj_status(ns, name)).get("phase") == phase and s,
            timeout=timeout,
        )

    def job_pods(self, ns: str, job: str) -> list[dict[str, Any]]:
        """The pods of a Job, by completion index."""
        items: list[dict[str, Any]] = self.get_json("pods", "-l", f"job-name={job}", namespace=ns)["items"]
        return sorted(items, key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])

    def running_pods(self, ns: str, job: str, n: int) -> list[dict[str, Any]]:
        return self.wait_for(
            f"{n} running pods of Job {ns}/{job}",
            lambda: len(ps := [p for p in self.job_pods(ns, job) if p["status"].get("phase") == "Running"]) == n and ps,
            timeout=bounds.PODS_RUNNING_S,
        )

    def write_token_kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig that authenticates with `token` only (no client certificate)."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    t0 = time.monotonic()
    # hack/test.sh starts this build in the background before the unit and trainer tests: this call
    # then waits on the build's lock until it is done, and reuses what it built. Only the cluster's
    # components: Kueue, built last, is waited for by the `kueue` fixture alone.
    _run_testcluster("build", *CLUSTER_COMPONENTS, timeout=BUILD_TIMEOUT_S)
    sys.stderr.write(f"\n[e2e] control plane binaries ready after {time.monotonic() - t0:.1f}s\n")
    paths = json.loads(_run_testcluster("paths", timeout=60).stdout)
    d = tmp_path_factory.mktemp("testcluster")
    nodes = os.environ.get("FINETUNE_TESTCLUSTER_NODES", "3")
    _run_testcluster("up", "--dir", str(d), "--nodes", nodes, timeout=UP_TIMEOUT_S)
    try:
        state = json.loads((d / "testcluster.json").read_text())
        c = Cluster(
            dir=d,
            kubeconfig=d / "kubeconfig",
            kubectl_path=Path(paths["kubectl"]),
            helm_path=Path(paths["helm"]),
            server=state["server"],
            ca_file=d / "pki" / "ca.crt",
        )
        sys.stderr.write(f"\n[e2e] cluster up in {time.monotonic() - t0:.1f}s; logs in {d / 'logs'}\n")
        yield c
    finally:
        _run_testcluster("down", "--dir", str(d), timeout=DOWN_TIMEOUT_S)


@dataclass
class Kueue:
    """Kueue (hack/testcluster.py's `kueue` subcommand) running beside the session's cluster."""

    log: Path  #: Kueue's output
    namespace: str = "kueue-system"
    #: The label that hands a batch/v1 Job to Kueue; only Jobs with it reach Kueue's webhooks.
    queue_label: str = "kueue.x-k8s.io/queue-name"


@pytest.fixture(scope="session")
def kueue(cluster: Cluster) -> Kueue:
    """Kueue against the session's cluster: its CRDs, its webhooks for batch/v1 Jobs labelled with a queue
    name and for its own kinds, and its controllers. Stopped with the cluster. Tests using it run last."""
    t0 = time.monotonic()
    # Builds Kueue if it is absent; when hack/test.sh's background build is at it, waits on its lock.
    _run_testcluster("build", "kueue", timeout=BUILD_TIMEOUT_S)
    sys.stderr.write(f"\n[e2e] Kueue built after {time.monotonic() - t0:.1f}s\n")
    _run_testcluster("kueue", "--dir", str(cluster.dir), timeout=KUEUE_UP_TIMEOUT_S)
    log = cluster.dir / "logs" / "kueue.log"
    sys.stderr.write(f"\n[e2e] Kueue up after {time.monotonic() - t0:.1f}s; log {log}\n")
    return Kueue(log=log)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted (without waiting) afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the ServiceAccount controller created the namespace's `default` SA.
    cluster.wait_for(
        f"ServiceAccount {name}/default",
        lambda: cluster.kubectl_result("get", "serviceaccount", "default", "-n", name).returncode == 0,
        timeout=30,
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# -- the operator, run as a local process ----------------------------------------------------------


class Operator:
    #: Every operator started in this session, for the failure reports (pytest_runtest_makereport).
    started: ClassVar[list[Operator]] = []

    def __init__(self, cluster: Cluster, log: Path, *args: str):
        self.cluster = cluster
        #: The test that made this operator (none for a fixture's, which outlives its first test).
        self.started_in = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        self.log = log
        self.args = args  #: more arguments of finetune-operator
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0

    def start(self) -> None:
        Operator.started.append(self)
        self.metrics_port, health = free_port(), free_port()
        exe = Path(sys.executable).with_name("finetune-operator")
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        self.proc = subprocess.Popen(
            [
                str(exe),
                "--all-namespaces",
                "--trainer-image",
                "trainer:e2e",
                "--metrics-port",
                str(self.metrics_port),
                "--health-port",
                str(health),
                *self.args,
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.cluster.wait_for("the operator's /healthz", lambda: self._healthy(health), timeout=60)

    def _healthy(self, port: int) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"operator exited; see {self.log}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def crd_installed(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_for("FineTuneJob CRD served", lambda: cluster.kubectl_result("get", "ftj", "-A").returncode == 0)
    cluster.wait_for("FineTuneSweep CRD served", lambda: cluster.kubectl_result("get", "fts", "-A").returncode == 0)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crd_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = Operator(cluster, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.kill(signal.SIGTERM)


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")
