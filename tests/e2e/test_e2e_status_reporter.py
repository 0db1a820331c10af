"""The trainer's status reporter against the real API server, authenticated as the trainer pod would be.

A ServiceAccount with a Role that allows get/patch on ``finetunejobs/status`` for one job only
(``resourceNames``) and a TokenRequest token: the reporter, run as a local process with the pod's
environment pointed at the test cluster, fills ``status.progress`` and ``status.checkpoints`` of its
job. Aimed at another job it is refused (403) and carries on; an unreachable API server neither.

Then a real (tiny) training, `finetune run` of an SFT job with ``forgetting.generalEval``, reporting
with the same identity: status.progress gets the general text's perplexity before training
(``generalPerplexityBefore``) and after (``generalPerplexity``), and the ``finetune_general_perplexity``
gauge, scraped from the trainer's /metrics while it runs, holds one of those two values.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polling import free_port
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import tiny  # noqa: E402

CRD_NAME = "finetunejobs.finetune.io"
#: Optimizer steps of the real training: long enough for several scrapes of its /metrics.
TRAINING_STEPS = 40
TRAINING_TIMEOUT_S = 300

# What the trainer's rank 0 does, compressed: progress after every logged step, the committed
# checkpoints after an upload, a final flush at the end. Polls are bounded; nothing sleeps blindly.
REPORTER = textwrap.dedent(
    """
    import logging, time
    from finetune_operator.api.v1alpha1 import Artifact, CheckpointRecord, Provenance
    from finetune_trainer.status import StatusReporter

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reporter = StatusReporter.from_env(min_interval=0.5)
    assert reporter is not None, "status reporting is off"
    for step in range(1, 4):
        reporter.update(step=step, total_steps=20, epoch=step / 20, loss=2.5 - step / 10, learning_rate=2e-4,
                        tokens_per_second=1234.5, eta_seconds=60.0 - step)
    deadline = time.monotonic() + 30
    while reporter.sent + reporter.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    checkpoint = CheckpointRecord(step=4, uri="s3://ckpt/ns/job/checkpoint-4", time="2026-11-01T10:00:00Z")
    reporter.set_checkpoints([checkpoint])
    reporter.update(step=5, loss=1.75, eval_loss=1.9)
    # The outputs at the end, with the trainer's provenance (an image set here is the operator's: not sent).
    digest = "ab" * 32
    artifact = Artifact(kind="adapter", uri="s3://out/ns/job/adapter", sha256=digest, bytes=1234)
    provenance = Provenance.model_validate({
        "image": "not-the-trainers@sha256:" + "00" * 32, "seed": 7, "accelerator": "cpu",
        "model": {"uri": "s3://models/tiny", "sha256": digest}, "tokenizerSha256": digest,
        "data": [{"uri": "s3://data/train.jsonl", "role": "train", "bytes": 10, "etag": "e1"}],
        "libraries": {"torch": "2.13.0", "cuda": "none"},
    })
    reporter.set_outputs([artifact], provenance)
    reporter.close(timeout=10)
    print(f"sent={reporter.sent} failures={reporter.failures} last_status={reporter.last_status}", flush=True)
    """
)


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "data": {"train": {"uri": "s3://data/train.jsonl"}},
            "training": {"maxSteps": 20},
            "runPolicy": {"suspend": True},  # no operator acts on these jobs
        },
    }


def trainer_identity(cluster: Cluster, ns: str, reported: str, tmp_path: Path, others: tuple[str, ...] = ()) -> Path:
    """The CRD served, the FineTuneJobs ``reported`` and ``others`` created, and the trainer pod's
    identity: ServiceAccount ``trainer`` with a Role that allows get/patch on ``finetunejobs/status``
    of ``reported`` only; returns the file of a TokenRequest token of it."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_for(
        f"CRD {CRD_NAME} Established",
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in cluster.get_json("crd", CRD_NAME).get("status", {}).get("conditions", [])
        ),
        timeout=60,
    )
    cluster.wait_for(
        "FineTuneJobs to be served",
        lambda: cluster.kubectl_result("get", "finetunejobs", "-n", ns).returncode == 0,
        timeout=60,
    )
    for name in (reported, *others):
        cluster.apply(job(name), ns)
    cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trainer"}}, ns)
    cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": f"{reported}-status"},
            "rules": [
                {
                    "apiGroups": ["finetune.io"],
                    "resources": ["finetunejobs/status"],
                    "resourceNames": [reported],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        ns,
    )
    cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"trainer-{reported}-status"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{reported}-status"},
            "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": ns}],
        },
        ns,
    )
    user = f"system:serviceaccount:{ns}:trainer"
    cluster.wait_for(
        "the Role to take effect",
        lambda: cluster.kubectl_result(
            "auth", "can-i", "patch", f"finetunejobs.finetune.io/{reported}", "--subresource=status", "-n", ns,
            f"--as={user}",
        ).stdout.strip() == "yes",
        timeout=30,
    )  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text(cluster.kubectl("create", "token", "trainer", "-n", ns, "--duration=10m").strip())
    return token_file


def pod_env(cluster: Cluster, namespace: str, name: str, token_file: Path, api: str | None = None) -> dict[str, str]:
    """The trainer pod's status-reporting environment, pointed at the test cluster."""
    return {
        "FINETUNE_JOB_NAMESPACE": namespace,
        "FINETUNE_JOB_NAME": name,
        "FINETUNE_KUBE_API": api or cluster.server,
        "FINETUNE_KUBE_TOKEN_FILE": str(token_file),
        "FINETUNE_KUBE_CA_FILE": str(cluster.ca_file),
    }


def run_reporter(cluster: Cluster, namespace: str, name: str, token_file: Path, api: str | None = None) -> str:
    env = {"PATH": os.environ.get("PATH", ""), **pod_env(cluster, namespace, name, token_file, api)}
    proc = subprocess.run(
        [sys.executable, "-c", REPORTER], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"the reporter crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_status_reporter_patches_its_job_only(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ns = namespace
    token_file = trainer_identity(cluster, ns, "reported", tmp_path, others=("other",))

    # What the operator derives from the pods is there already; the trainer's patch must keep it.
    operator_part = {"image": "trainer@sha256:" + "cd" * 32, "nodes": ["node-0"], "operatorVersion": "0.1.0"}
    cluster.kubectl(
        "patch", "finetunejob", "reported", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"provenance": operator_part}}),
    )  # fmt: skip
    out = run_reporter(cluster, ns, "reported", token_file)
    assert "failures=0" in out and "last_status=200" in out, out
    status = cluster.get_json("finetunejob", "reported", namespace=ns)["status"]
    assert status["artifacts"] == [
        {"kind": "adapter", "uri": "s3://out/ns/job/adapter", "sha256": "ab" * 32, "bytes": 1234}
    ]
    assert status["provenance"] == {
        **operator_part,
        "seed": 7,
        "accelerator": "cpu",
        "model": {"uri": "s3://models/tiny", "sha256": "ab" * 32},
        "tokenizerSha256": "ab" * 32,
        "data": [{"uri": "s3://data/train.jsonl", "role": "train", "bytes": 10, "etag": "e1"}],
        "libraries": {"torch": "2.13.0", "cuda": "none"},
    }, status["provenance"]
    progress = status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["summary"]) == (5, 20, "5/20 (25%)"), progress
    assert progress["loss"] == 1.75 and progress["evalLoss"] == 1.9 and progress["learningRate"] == 2e-4
    assert progress["tokensPerSecond"] == 1234.5 and progress["etaSeconds"] == 57.0 and progress["percent"] == 25
    assert progress["lastCheckpointStep"] == 4 and progress["updatedAt"].endswith("Z")
    assert status["checkpoints"] == [
        {"step": 4, "uri": "s3://ckpt/ns/job/checkpoint-4", "time": "2026-11-01T10:00:00Z"}
    ], status

    # Another job's status: denied by RBAC (403); the reporter logs it and keeps going (exit 0).
    out = run_reporter(cluster, ns, "other", token_file)
    assert "last_status=403" in out and "sent=0" in out, out
    assert "HTTP 403 (forbidden" in out, out
    assert "progress" not in cluster.get_json("finetunejob", "other", namespace=ns).get("status", {})

    # No API server at all: connection errors are logged, nothing crashes.
    out = run_reporter(cluster, ns, "reported", token_file, api="https://127.0.0.1:1")
    assert "sent=0" in out and "last_status=None" in out and "Connection refused" in out, out
    assert cluster.get_json("finetunejob", "reported", namespace=ns)["status"]["progress"]["step"] == 5


def general_perplexity_gauge(port: int) -> float | None:
    """finetune_general_perplexity{rank="0"} scraped from the trainer's /metrics; None while it does not
    answer (not serving yet, or exited) or has no such series yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "finetune_general_perplexity" and sample.labels.get("rank") == "0":
                return float(sample.value)
    return None


def test_a_training_reports_general_perplexity(
    cluster: Cluster, namespace: str, tiny_model: Path, tmp_path: Path
) -> None:
    """forgetting.generalEval in a real training, reporting as its pod would: status.progress has the
    perplexity of general text before training (generalPerplexityBefore) and after, the latest
    evaluation's (generalPerplexity); the finetune_general_perplexity gauge, scraped while the trainer
    runs, only ever holds one of them."""
    ns, name = namespace, "trained"
    token_file = trainer_identity(cluster, ns, name, tmp_path)
    general = tiny.write_jsonl(tmp_path / "general.jsonl", tiny.text_rows(48, seed=21))
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.prompt_completion_rows(400))
    port = free_port()
    manifest = tiny.job_manifest(
        name,
        tiny_model,
        train,
        training__maxSteps=TRAINING_STEPS,
        training__learningRate=5e-3,
        training__forgetting={"generalEval": {"uri": str(general)}},
        metrics={"port": port},
    )
    job_file = tiny.write_manifest(tmp_path / f"{name}.yaml", manifest)
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **pod_env(cluster, ns, name, token_file)}
    env.pop("FINETUNE_METRICS_PORT", None)  # spec.metrics.port is the port
    log = tmp_path / "run.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("finetune")), "run", str(job_file), "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    seen: list[float] = []
    try:
        deadline = started + TRAINING_TIMEOUT_S
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"the training did not end within {TRAINING_TIMEOUT_S}s"
            value = general_perplexity_gauge(port)
            if value is not None:
                seen.append(value)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # the next scrape, or the training's end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, f"finetune run exited {proc.returncode}:\n{output[-5000:]}"
    elapsed = time.monotonic() - started

    summary = json.loads((workdir / "summary.json").read_text())
    before, after = summary["before"]["general_perplexity"], summary["after"]["general_perplexity"]
    evaluations = [r["general_perplexity"] for r in tiny.read_metrics(workdir) if "general_perplexity" in r]
    assert evaluations == [before, after], evaluations  # the general evaluations: before and after training
    progress = cluster.get_json("finetunejob", name, namespace=ns)["status"]["progress"]
    print(
        f"general perplexity {before!r} before, {after!r} after; status.progress generalPerplexityBefore "
        f"{progress.get('generalPerplexityBefore')!r}, generalPerplexity {progress.get('generalPerplexity')!r}; "
        f"gauge scraped {len(seen)} times, values {sorted(set(seen))}; training {elapsed:.1f}s"
    )
    assert (progress["step"], progress["totalSteps"]) == (TRAINING_STEPS, TRAINING_STEPS), progress
    assert progress["generalPerplexityBefore"] == before, progress
    assert progress["generalPerplexity"] == after, progress
    assert seen, f'the trainer\'s /metrics never had finetune_general_perplexity{{rank="0"}}:\n{output[-3000:]}'
    assert set(seen) <= {before, after}, (sorted(set(seen)), before, after)
