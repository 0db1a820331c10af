"""The preflight on the real control plane: no GPU pod before the data is checked and the job fits.

The operator runs as a local process (conftest's ``operator``) and kwok plays the kubelets. kwok runs no
container, so the preflight pod's container runs here, for real: the preflight Job's pod template and
the job's ConfigMap, as the operator rendered them, become one local process (the way
tests/e2e/test_e2e_contract.py runs the gang's pods), reading its data from the S3 server on loopback.
Its exit code and the termination message it wrote are then given to the kwok pod (the
``testcluster.finetune.io/exit-code`` and ``message`` annotations: hack/testcluster/README.md), so the
operator reads them from the pod's status as it would from a kubelet's. A watch of pods, started before
each job is applied, shows every pod that ever existed in the namespace: a refused job never had a GPU
pod, a good one had none until the preflight's result was in its status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import bounds
from finetune_operator.api.v1alpha1 import PreflightMemory, PreflightResult
from test_e2e_contract import Mounts

if TYPE_CHECKING:
    from conftest import Cluster, Operator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import tiny  # noqa: E402

A = "testcluster.finetune.io/"
HOLD = f"{A}hold"
GPU = "nvidia.com/gpu"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
#: The preflight of a tiny model on a few hundred records: tokenizer, checks, estimate (2 busy cores).
PREFLIGHT_RUN_S = 300


class PodWatch:
    """``kubectl get pods --watch`` of one namespace, from before anything is applied: every pod that
    ever exists there, in the order its states were seen."""

    SENTINEL = "watch-sentinel"

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [
                str(cluster.kubectl_path),
                f"--kubeconfig={cluster.kubeconfig}",
                "get",
                "pods",
                "-n",
                ns,
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        # A pod created after the watch started and seen by it: from here on the watch misses nothing.
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": self.SENTINEL},
                "spec": {"containers": [{"name": "pause", "image": "pause:3"}]},
            },
            namespace=ns,
        )
        cluster.wait_for("the pod watch to see its sentinel", lambda: self.SENTINEL in self.names(), timeout=60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buffer += line
            while buffer.strip():
                try:
                    event, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break  # an object not complete yet
                buffer = buffer.lstrip()[end:]
                with self.lock:
                    self.events.append((event["type"], event["object"]))

    def seen(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [(t, p) for t, p in self.events if p["metadata"]["name"] != self.SENTINEL]

    def names(self) -> set[str]:
        with self.lock:
            return {p["metadata"]["name"] for _, p in self.events}

    def gpu_pods(self) -> set[str]:
        """Pods that asked for a GPU (a training gang's), in any state the watch saw."""
        return {
            p["metadata"]["name"]
            for _, p in self.seen()
            for c in p["spec"]["containers"]
            if GPU in ((c.get("resources") or {}).get("limits") or {})
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def dataset(endpoint: str, ns: str, tmp_path: Path, *, defect_line: int | None = None) -> str:
    """300 promptCompletion records in ``s3://<ns>-data/train.jsonl``; a record without its completion at
    ``defect_line`` (1-based) when asked."""
    rows: list[dict[str, Any]] = list(tiny.prompt_completion_rows(300))
    if defect_line is not None:
        rows[defect_line - 1] = {"prompt": "what color is the lime?"}
    local = tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    s3 = s3_client(endpoint)
    for bucket in (f"{ns}-data", f"{ns}-ckpt"):
        s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(local), f"{ns}-data", "train.jsonl")
    return f"s3://{ns}-data/train.jsonl"


def manifest(name: str, model: Path, train: str, ns: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    """A 2-node gang of 1 GPU each, data and checkpoints on the loopback S3, every pod held until released."""
    ftj = tiny.job_manifest(
        name,
        model,
        Path("unused"),
        data={"train": {"uri": train}, "format": "promptCompletion", "maxSeqLength": 64},
        distributed={"nodes": 2, "procsPerNode": 1},
        resources={"gpusPerNode": 1, "gpuMemory": "80Gi", "podAnnotations": {HOLD: "true"}},
        checkpoint={"uri": f"s3://{ns}-ckpt", "endpointUrl": endpoint, "credentials": {"name": "s3-creds"}},
        metrics={"enabled": False},
    )
    del ftj["spec"]["preflight"]  # what is tested here: the default, mode auto
    for key, value in spec.items():
        ftj["spec"][key] = {**ftj["spec"].get(key, {}), **value}
    return ftj


def credentials_secret(cluster: Cluster, ns: str) -> None:
    cluster.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"}, "stringData": CREDENTIALS},
        namespace=ns,
    )


def preflight_pod(cluster: Cluster, ns: str, job: str) -> dict[str, Any]:
    """The running pod of preflight Job ``job``."""
    return cluster.wait_for(
        f"the running pod of preflight Job {ns}/{job}",
        lambda: next(
            (
                p
                for p in cluster.get_json("pods", "-l", f"job-name={job}", namespace=ns)["items"]
                if p["status"].get("phase") == "Running"
            ),
            None,
        ),
        timeout=bounds.PODS_RUNNING_S,
    )


def run_rendered_preflight(cluster: Cluster, ns: str, job_name: str, tmp_path: Path) -> tuple[int, str, str]:
    """Run preflight Job ``job_name``'s container as a local process, exactly as rendered (its command,
    env, ConfigMap), with its volume mounts as local directories and the credentials Secret's values.
    Returns (exit code, the termination message it wrote, its output)."""
    job = cluster.get_json("job", job_name, namespace=ns)
    owner = job["metadata"]["labels"]["finetune.io/job"]
    config_map = cluster.get_json("configmap", f"{owner}-config", namespace=ns)
    [container] = job["spec"]["template"]["spec"]["containers"]
    mounts = Mounts(
        tmp_path / "volumes", [m for m in container["volumeMounts"] if m["mountPath"] not in ("/tmp", "/dev/shm")]
    )
    for key, text in config_map["data"].items():
        Path(mounts("/etc/finetune"), key).write_text(json.dumps(mounts(json.loads(text))))
    env = {"PATH": os.environ["PATH"]}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = mounts(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "s3-creds", var
            env[var["name"]] = CREDENTIALS[ref["key"]]
    # The container's termination-message file, here a local one.
    assert env["FINETUNE_TERMINATION_LOG"] == container["terminationMessagePath"]
    termination = tmp_path / "termination-log"
    env["FINETUNE_TERMINATION_LOG"] = str(termination)
    argv = [mounts(a) for a in container["command"]]
    assert argv[:4] == ["python", "-m", "finetune_trainer", "preflight"], argv
    argv[0] = sys.executable
    proc = subprocess.run(
        argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=PREFLIGHT_RUN_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert termination.is_file(), f"the preflight wrote no termination message (exit {proc.returncode}):\n{output}"
    return proc.returncode, termination.read_text(encoding="utf-8"), output


def finish_pod(cluster: Cluster, ns: str, pod: str, code: int, message: str, reason: str = "Error") -> None:
    """End the kwok pod as the container ended: its exit code and its termination message."""
    pairs = [f"{A}message={message}", f"{HOLD}-"]
    if code != 0:
        pairs = [f"{A}fail=true", f"{A}exit-code={code}", f"{A}reason={reason}", *pairs]
    cluster.kubectl("annotate", "--overwrite", "-n", ns, "pod", pod, *pairs)


def release(cluster: Cluster, ns: str, job: str) -> None:
    for p in cluster.job_pods(ns, job):
        cluster.kubectl("annotate", "-n", ns, "pod", p["metadata"]["name"], f"{HOLD}-")


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def no_gang(cluster: Cluster, ns: str, watch: PodWatch, name: str, preflight_pod_name: str) -> None:
    assert watch.gpu_pods() == set(), watch.gpu_pods()
    assert {p["metadata"]["name"] for _, p in watch.seen()} == {preflight_pod_name}
    assert cluster.kubectl_result("get", "job", f"{name}-a0", "-n", ns).returncode != 0, "a gang Job exists"
    assert "Created" not in {c["type"] for c in cluster.ftj_status(ns, name)["conditions"]}


def test_bad_data_fails_invalid_data_naming_file_and_line_and_no_gpu_pod_ever_exists(
    cluster: Cluster, operator: Operator, namespace: str, tiny_model: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    ns = namespace
    train = dataset(s3_endpoint, ns, tmp_path, defect_line=7)
    credentials_secret(cluster, ns)
    watch = PodWatch(cluster, ns)
    try:
        cluster.apply(manifest("bad", tiny_model, train, ns, s3_endpoint), namespace=ns)
        pod = preflight_pod(cluster, ns, "bad-pf0")
        # CPU only: its own small resources, no accelerator, none of the GPU nodes' scheduling.
        [container] = pod["spec"]["containers"]
        assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
        template = cluster.get_json("job", "bad-pf0", namespace=ns)["spec"]["template"]["spec"]
        assert not {"nodeSelector", "tolerations", "affinity"} & set(template) and GPU not in json.dumps(template)
        running = cluster.ftj_status(ns, "bad")
        assert running["phase"] == "Pending" and condition(running, "DataValid")["reason"] == "PreflightRunning"

        code, message, output = run_rendered_preflight(cluster, ns, "bad-pf0", tmp_path)
        assert code == 3, output[-3000:]
        assert "train.jsonl:7" in message, message
        finish_pod(cluster, ns, pod["metadata"]["name"], code, message)

        s = cluster.wait_phase(ns, "bad", "Failed")
        failed = condition(s, "Failed")
        assert failed["reason"] == "InvalidData" and "train.jsonl:7" in failed["message"], failed
        data = condition(s, "DataValid")
        assert (data["status"], data["reason"]) == ("False", "InvalidData") and "train.jsonl:7" in data["message"]
        assert s["preflight"]["badRecords"] >= 1 and any("train.jsonl:7" in p for p in s["preflight"]["problems"])
        assert s["lastFailure"]["exitCode"] == 3
        # Nor after the verdict: a few of the operator's reactions to its own status write and Event.
        time.sleep(3)
        no_gang(cluster, ns, watch, "bad", pod["metadata"]["name"])
    finally:
        watch.stop()


def test_a_good_job_shows_its_preflight_then_its_gang_runs(
    cluster: Cluster, operator: Operator, namespace: str, tiny_model: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    ns = namespace
    train = dataset(s3_endpoint, ns, tmp_path)
    credentials_secret(cluster, ns)
    watch = PodWatch(cluster, ns)
    try:
        cluster.apply(manifest("good", tiny_model, train, ns, s3_endpoint), namespace=ns)
        pod = preflight_pod(cluster, ns, "good-pf0")
        code, message, output = run_rendered_preflight(cluster, ns, "good-pf0", tmp_path)
        assert code == 0, output[-3000:]
        finish_pod(cluster, ns, pod["metadata"]["name"], code, message)

        gang = cluster.running_pods(ns, "good-a0", 2)
        s = cluster.wait_phase(ns, "good", "Running")
        pf = s["preflight"]
        assert pf["trainRecords"] + pf.get("evalRecords", 0) == 300 and pf["badRecords"] == 0
        assert pf["tokenLengthMax"] >= pf["tokenLengthP95"] >= pf["tokenLengthP50"] > 0
        assert pf["stepsPerEpoch"] > 0 and pf["tokensPerEpoch"] > 0
        assert pf["memory"]["total"] > 0 and pf["gpuMemory"] == 80 * 1024**3 and pf["fits"] is True
        assert any(uri.startswith(f"s3://{ns}-ckpt/{ns}/good") for uri in pf["writeAccess"]), pf["writeAccess"]
        assert condition(s, "DataValid")["status"] == "True" and condition(s, "FitsInMemory")["reason"] == "Fits"
        # The gang's pods came after the preflight's pod had finished, never beside it.
        events = watch.seen()
        done = min(
            i
            for i, (_, p) in enumerate(events)
            if p["metadata"]["name"] == pod["metadata"]["name"] and p["status"].get("phase") == "Succeeded"
        )
        first_gpu = min(i for i, (_, p) in enumerate(events) if p["metadata"]["name"] in watch.gpu_pods())
        assert done < first_gpu, [(t, p["metadata"]["name"], p["status"].get("phase")) for t, p in events]
        assert {p["metadata"]["name"] for p in gang} <= watch.gpu_pods()
        release(cluster, ns, "good-a0")
        s = cluster.wait_phase(ns, "good", "Succeeded")
        assert s["preflight"] == pf
    finally:
        watch.stop()


def test_a_job_that_cannot_fit_ends_will_not_fit_before_any_gpu_pod(
    cluster: Cluster, operator: Operator, namespace: str, tiny_model: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    ns = namespace
    train = dataset(s3_endpoint, ns, tmp_path)
    credentials_secret(cluster, ns)
    watch = PodWatch(cluster, ns)
    try:
        # Even the tiny model needs a CUDA context's worth of memory: 1 GiB GPUs cannot hold it.
        small = manifest("big", tiny_model, train, ns, s3_endpoint, resources={"gpuMemory": "1Gi"})
        cluster.apply(small, namespace=ns)
        pod = preflight_pod(cluster, ns, "big-pf0")
        code, message, output = run_rendered_preflight(cluster, ns, "big-pf0", tmp_path)
        assert code == 0, output[-3000:]  # the data is good: the fit is the operator's to judge
        finish_pod(cluster, ns, pod["metadata"]["name"], code, message)
        s = cluster.wait_phase(ns, "big", "Failed")
        failed, fits = condition(s, "Failed"), condition(s, "FitsInMemory")
        assert failed["reason"] == "WillNotFit" and (fits["status"], fits["reason"]) == ("False", "WillNotFit")
        for text in (failed["message"], fits["message"]):
            assert "per GPU" in text and "weights" in text and "does not fit in 1.00 GiB" in text, text
        assert s["preflight"]["fits"] is False and condition(s, "DataValid")["status"] == "True"
        no_gang(cluster, ns, watch, "big", pod["metadata"]["name"])
    finally:
        watch.stop()


def result_message(total: int = 2 * 1024**3) -> str:
    """A preflight result as a pod writes it, for the tests of the operator's own decisions."""
    memory = PreflightMemory(
        weights=total // 2, gradients=0, optimizer=0, activations=total // 4, overhead=total // 4, total=total
    )
    result = PreflightResult(train_records=300, eval_records=0, bad_records=0, memory=memory)
    return json.dumps(result.model_dump(by_alias=True, exclude_none=True, mode="json"), separators=(",", ":"))


def test_a_crashed_preflight_is_retried_and_a_restarted_operator_neither_repeats_nor_skips_it(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    ns = namespace
    job = manifest("retry", Path("/models/tiny"), "s3://data/train.jsonl", ns, "http://s3.invalid:9000")
    cluster.apply(job, namespace=ns)
    first = preflight_pod(cluster, ns, "retry-pf0")
    # OOMKilled: retriable. A second preflight Job follows after the backoff; never a gang.
    finish_pod(cluster, ns, first["metadata"]["name"], 137, "Killed", reason="OOMKilled")
    second = preflight_pod(cluster, ns, "retry-pf1")
    s = cluster.ftj_status(ns, "retry")
    assert s["phase"] == "Pending" and s["lastFailure"]["exitCode"] == 137
    assert cluster.kubectl_result("get", "job", "retry-a0", "-n", ns).returncode != 0
    # The operator dies while the second preflight runs, and comes back.
    operator.kill(signal.SIGKILL)
    operator.start()
    try:
        finish_pod(cluster, ns, second["metadata"]["name"], 0, result_message())
        cluster.running_pods(ns, "retry-a0", 2)
        s = cluster.wait_phase(ns, "retry", "Running")
        assert s["preflight"]["trainRecords"] == 300 and condition(s, "DataValid")["status"] == "True"
        preflights = cluster.get_json("jobs", "-l", "finetune.io/preflight-attempt", namespace=ns)["items"]
        assert sorted(j["metadata"]["name"] for j in preflights) == ["retry-pf0", "retry-pf1"]
    finally:
        assert operator.proc is not None and operator.proc.poll() is None, "the restarted operator died"
