"""Operator at scale: N FineTuneJobs on a real control plane with M kwok nodes.

Starts hack/testcluster (built from source, cached), the operator as a local process, then creates N
single-node FineTuneJobs as fast as the API server takes them and measures, from watch events:

- apply → Job created latency, p50 and p99 (goal: p99 ≤ 1 s);
- apply → all of a job's pods Running, p50 and p99, and the time until every job runs;
- the operator's resident memory at the end (goal: ≤ 150 MB at 1,000 jobs);
- API requests per job: the reconciler's own (finetune_operator_api_requests_total), and every
  request the API server served during the run (all clients: operator, kwok, controllers) per job.

    .venv/bin/python bench/operator_scale.py [--jobs 200] [--nodes 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def apiserver_requests(kubectl: list[str]) -> float:
    text = subprocess.run([*kubectl, "get", "--raw", "/metrics"], capture_output=True, text=True, check=True).stdout
    return sum(float(m.group(1)) for m in re.finditer(r"^apiserver_request_total\{[^}]*\} (\S+)$", text, re.M))


def apiserver_latency_buckets(kubectl: list[str], verb: str, resource: str) -> dict[float, float]:
    """The API server's own request-duration histogram (cumulative counts by bucket) for one verb."""
    text = subprocess.run([*kubectl, "get", "--raw", "/metrics"], capture_output=True, text=True, check=True).stdout
    pattern = r"^apiserver_request_duration_seconds_bucket\{([^}]*)\} (\S+)$"
    out: dict[float, float] = {}
    for m in re.finditer(pattern, text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("verb") == verb and labels.get("resource") == resource and labels.get("subresource", "") == "":
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile q of the observations between two scrapes."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = counts[-1][1]
    return next(le for le, count in counts if count >= q * total)


def operator_requests(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(m.group(1)) for m in re.finditer(r"^finetune_operator_api_requests_total\{[^}]*\} (\S+)$", text, re.M)
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reconcile_quantile(port: int, q: float) -> float:
    """A quantile of the operator's reconcile-duration histogram (upper bound of its bucket)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets = [
        (float(m.group(1)), float(m.group(2)))
        for m in re.finditer(r'^finetune_operator_reconcile_duration_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)
    ]
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)


def raw_watch(list_fn: Any, namespace: str, timeout: int) -> Any:
    """Watch events as plain dicts: the client's typed models would cost this process more CPU than
    the operator it measures uses, on the same cores."""
    resp = list_fn(namespace, watch=True, timeout_seconds=timeout, _preload_content=False)
    for line in resp:
        if line.strip():
            yield json.loads(line)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "org/model"},
            "data": {"train": {"uri": "s3://data/train.jsonl"}},
            "training": {"maxSteps": 100},
            "distributed": {"nodes": 1, "procsPerNode": 1},
            "resources": {"gpusPerNode": 0, "podAnnotations": {"testcluster.finetune.io/hold": "true"}},
            "preflight": {"mode": "skip"},  # the gang's path: apply -> Job
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    from kubernetes import client, config
    from urllib3.exceptions import ProtocolError

    work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    testcluster = [sys.executable, str(REPO / "hack" / "testcluster.py")]
    subprocess.run([*testcluster, "build"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*testcluster, "up", "--dir", str(work / "cluster"), "--nodes", str(args.nodes)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    kubeconfig = work / "cluster" / "kubeconfig"
    paths = json.loads(subprocess.run([*testcluster, "paths"], capture_output=True, text=True, check=True).stdout)
    kubectl = [paths["kubectl"], f"--kubeconfig={kubeconfig}"]
    operator = None
    try:
        subprocess.run(
            [*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/finetunejobs.finetune.io"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ns = "scale"
        subprocess.run([*kubectl, "create", "namespace", ns], check=True, stdout=subprocess.DEVNULL)
        metrics_port, health_port = 18080, 18081
        operator = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("finetune-operator")),
                "--all-namespaces",
                "--metrics-port",
                str(metrics_port),
                "--health-port",
                str(health_port),
            ],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=(work / "operator.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the operator did not become healthy in 60 s") from None
                time.sleep(0.2)

        config.load_kube_config(config_file=str(kubeconfig))
        batch, core, custom = client.BatchV1Api(), client.CoreV1Api(), client.CustomObjectsApi()
        applied: dict[str, float] = {}
        job_seen: dict[str, float] = {}
        running: dict[str, float] = {}
        stop = threading.Event()

        def watch_jobs() -> None:
            with contextlib.suppress(ProtocolError):  # the stream ends when the cluster goes down
                _watch_jobs()

        def watch_pods() -> None:
            with contextlib.suppress(ProtocolError):
                _watch_pods()

        def _watch_jobs() -> None:
            for event in raw_watch(batch.list_namespaced_job, ns, int(args.timeout)):
                owner = event["object"]["metadata"].get("labels", {}).get("finetune.io/job")
                if owner and owner not in job_seen:
                    job_seen[owner] = time.monotonic()
                if stop.is_set():
                    return

        def _watch_pods() -> None:
            for event in raw_watch(core.list_namespaced_pod, ns, int(args.timeout)):
                pod = event["object"]
                owner = pod["metadata"].get("labels", {}).get("finetune.io/job")
                if owner and pod.get("status", {}).get("phase") == "Running" and owner not in running:
                    running[owner] = time.monotonic()
                if stop.is_set():
                    return

        for target in (watch_jobs, watch_pods):
            threading.Thread(target=target, daemon=True).start()
        time.sleep(1.0)  # let both watches establish before the first create
        api_before, op_before = apiserver_requests(kubectl), operator_requests(metrics_port)
        cpu_before = cpu_seconds(operator.pid)
        post_jobs_before = apiserver_latency_buckets(kubectl, "POST", "jobs")
        started = time.monotonic()
        for i in range(args.jobs):
            name = f"job-{i:04d}"
            custom.create_namespaced_custom_object("finetune.io", "v1alpha1", ns, "finetunejobs", manifest(name))
            applied[name] = time.monotonic()
        create_seconds = time.monotonic() - started
        deadline = time.monotonic() + args.timeout
        while len(running) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        all_running = max(running.values(), default=float("nan")) - started
        api_after, op_after = apiserver_requests(kubectl), operator_requests(metrics_port)
        cpu_used = cpu_seconds(operator.pid) - cpu_before
        post_jobs_after = apiserver_latency_buckets(kubectl, "POST", "jobs")
        created = [job_seen[n] - applied[n] for n in applied if n in job_seen]
        to_running = [running[n] - applied[n] for n in applied if n in running]
        print(f"{args.jobs} FineTuneJobs on {args.nodes} kwok nodes (created in {create_seconds:.1f} s)")
        print(
            f"apply -> Job created: p50 {statistics.median(created):.3f} s, p99 {quantile(created, 0.99):.3f} s "
            f"({len(created)}/{args.jobs}; goal p99 <= 1 s)"
        )
        print(
            f"apply -> pods Running: p50 {statistics.median(to_running):.3f} s, p99 {quantile(to_running, 0.99):.3f}"
            f" s; all {len(to_running)} running after {all_running:.1f} s"
        )
        print(f"operator RSS: {rss_mb(operator.pid):.0f} MB (goal <= 150 MB at 1,000 jobs)")
        print(
            f"operator CPU: {cpu_used:.1f} s ({1000 * cpu_used / args.jobs:.1f} ms per job); one reconcile:"
            f" p50 <= {reconcile_quantile(metrics_port, 0.5)} s, p99 <= {reconcile_quantile(metrics_port, 0.99)} s"
        )
        print(
            "API server, POST jobs (the operator's create): p50 <= "
            f"{bucket_quantile(post_jobs_before, post_jobs_after, 0.5)} s, "
            f"p99 <= {bucket_quantile(post_jobs_before, post_jobs_after, 0.99)} s"
        )
        print(
            f"API requests per job: reconciler {(op_after - op_before) / args.jobs:.1f}; "
            f"API server total, all clients {(api_after - api_before) / args.jobs:.1f}"
        )
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        subprocess.run([*testcluster, "down", "--dir", str(work / "cluster")], check=False, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
