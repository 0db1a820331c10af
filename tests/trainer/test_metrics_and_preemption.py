"""A real Prometheus scrapes a running 2-rank training; then SIGTERM preempts it.

Prometheus (Debian's package; hack/test.sh installs it) scrapes both ranks every second on loopback.
Its HTTP API must return every training metric for the job. Then the launcher gets SIGTERM, as a pod's
first process does: the ranks agree on a step, commit a checkpoint within the grace period and exit
with 85; keepLast kept the newest checkpoints and the best one. With metrics off, a rank serves nothing.
The job dashboard's online-RL row (collapsed; the monitoring e2e watches a classifier) is queried here
against a PPO training: every one of its queries must return finite data.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import live
import pytest
import test_ppo as ppo_tests
import tiny
from chart_monitoring import RL_ROW, dashboards, queries_without_data, render, row_queries
from finetune_trainer import telemetry
from polling import free_port, free_port_pair
from tiny import job_manifest

GRACE = 30
EXPECTED = {
    "finetune_train_loss",
    "finetune_eval_loss",
    "finetune_learning_rate",
    "finetune_global_step",
    "finetune_total_steps",
    "finetune_epoch",
    "finetune_tokens_per_second",
    "finetune_samples_per_second",
    "finetune_step_duration_seconds_bucket",
    "finetune_step_duration_seconds_count",
    "finetune_accelerator_memory_allocated_bytes",
    "finetune_accelerator_memory_peak_bytes",
    "finetune_checkpoint_save_duration_seconds_bucket",
    "finetune_checkpoint_upload_duration_seconds_bucket",
    "finetune_checkpoint_size_bytes",
    "finetune_checkpoint_uploaded_bytes_total",
    "finetune_checkpoint_upload_failures_total",
    "finetune_last_checkpoint_step",
    "finetune_last_checkpoint_timestamp_seconds",
    "finetune_preemptions_total",
    "finetune_model_flops_utilization_ratio",
}


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """A Prometheus on loopback scraping two metrics ports (returned), every second, honoring our labels."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: hack/test.sh installs Debian's package (apt-get install prometheus)"
    targets = free_port_pair()
    web = free_port_pair()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "trainer",
                        "honor_labels": True,
                        "static_configs": [{"targets": [f"127.0.0.1:{targets}", f"127.0.0.1:{targets + 1}"]}],
                    }
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{web}")
    try:
        live.wait_for("Prometheus to be ready", lambda: server.query("up") is not None, timeout=60, interval=0.2)
        yield server, targets
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_prometheus_scrapes_every_metric_then_sigterm_commits_and_exits_85(
    prometheus: tuple[Prometheus, int],
    s3_endpoint: str,
    s3_env: dict[str, str],
    tiny_model: Path,
    train_jsonl: Path,
    tmp_path: Path,
) -> None:
    server, port = prometheus
    s3 = live.s3_client(s3_endpoint)
    bucket = f"metrics-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    job = job_manifest(
        "scraped",
        tiny_model,
        train_jsonl,
        data__evalSplit=0.1,
        training__maxSteps=100000,  # runs until preempted
        training__evaluation={"everySteps": 3},
        checkpoint={
            "uri": f"s3://{bucket}/ckpt",
            "everySteps": 4,
            "keepLast": 2,
            "keepBest": True,
            "gracePeriodSeconds": GRACE,
        },
    )
    env = {**s3_env, "FINETUNE_METRICS_PORT": str(port), "FINETUNE_PEAK_FLOPS": "1e12"}
    run = live.start(tmp_path, job, "--nproc", "2", env=env)
    try:
        selector = '{job="scraped", namespace="local", __name__=~"finetune_.+"}'

        def names() -> set[str] | None:
            # Every metric, and both ranks scraped: Prometheus scrapes the two targets independently (some
            # metrics, the checkpoint uploads' and the evaluation's, are rank 0's alone).
            series = server.query(selector)
            found = {s["metric"]["__name__"] for s in series}
            steps = {s["metric"].get("rank") for s in series if s["metric"]["__name__"] == "finetune_global_step"}
            return found if found >= EXPECTED and steps == {"0", "1"} else None

        live.wait_for(
            f"Prometheus to have every metric {sorted(EXPECTED)}, both ranks'", names, timeout=240, interval=0.5
        )
        ranks = {s["metric"]["rank"] for s in server.query('finetune_global_step{job="scraped"}')}
        assert ranks == {"0", "1"}
        [total] = server.query('finetune_total_steps{job="scraped", rank="0"}')
        assert float(total["value"][1]) == 100000
        [mfu] = server.query('finetune_model_flops_utilization_ratio{job="scraped", rank="0"}')
        assert 0 < float(mfu["value"][1]) < 1

        signalled_at, signalled_step = time.time(), run.logged_step()
        run.launcher().send_signal(signal.SIGTERM)
        code = run.wait(timeout=GRACE + 60)
        exited_at = time.time()
    finally:
        run.kill()
    assert code == 85, f"exit {code}\n{run.output[-4000:]}"
    assert exited_at - signalled_at < GRACE, f"exit took {exited_at - signalled_at:.1f}s"
    prefix = "ckpt/local/scraped"
    committed = live.committed_steps(s3, bucket, prefix)
    newest = live.manifest(s3, bucket, prefix, committed[-1])
    commit_time = datetime.fromisoformat(newest["time"]).timestamp()
    assert newest["step"] >= signalled_step, (newest, signalled_step)
    assert signalled_at - 1 <= commit_time <= exited_at + 1, (newest["time"], signalled_at, exited_at)
    assert f"preempted at step {newest['step']}: checkpoint-{newest['step']} committed" in run.output

    # keepLast 2 plus the best: the best evaluation's step was made durable and survived rotation.
    evals = {m["step"]: m["eval_loss"] for m in tiny.read_metrics(run.workdir) if "eval_loss" in m and m["step"] > 0}
    best_step = min(evals, key=lambda s: evals[s])
    assert best_step in committed and set(committed[-2:]) | {best_step} == set(committed), (committed, evals)


def test_the_job_dashboards_online_rl_row_has_data_from_a_ppo_training(
    prometheus: tuple[Prometheus, int], tiny_model: Path, tmp_path: Path
) -> None:
    server, port = prometheus
    # The dashboard as a user installs it (helm template, the default values).
    board = dashboards(render({}, tmp_path))["finetune-job.json"]
    queries = row_queries(board, RL_ROW)
    gauges = {name for name, _ in telemetry.RL_LOGGED.values()} | {"finetune_eval_reward"}
    shown = {name for _, expr in queries for name in re.findall(r"\b(finetune_\w+)", expr)}
    assert gauges <= shown, f"the {RL_ROW!r} row shows no panel of {sorted(gauges - shown)}"
    prompts = tiny.write_jsonl(tmp_path / "prompts.jsonl", tiny.prompt_completion_rows(48))
    evals = tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.prompt_completion_rows(8, seed=9))
    job = ppo_tests.ppo_manifest("rl-watched", tiny_model, prompts)
    job["spec"]["data"]["eval"] = {"uri": str(evals)}
    job["spec"]["training"].update(maxSteps=100000, perDeviceBatchSize=8, evaluation={"everySteps": 4})  # until killed
    run = live.start(tmp_path, job, env={"FINETUNE_METRICS_PORT": str(port)})
    variables = {"namespace": "local", "job": "rl-watched", "__rate_interval": "1m"}
    missing: list[str] = []

    def complete() -> bool:
        missing[:] = queries_without_data(server, queries, variables)
        return not missing

    try:
        try:
            live.wait_for(f"every query of the {RL_ROW!r} row to return finite data", complete, timeout=240, interval=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; panels without data: {missing}\n{run.output[-3000:]}") from None
        [reward] = server.query('finetune_rl_reward{job="rl-watched", rank="0"}')
        assert 0.0 <= float(reward["value"][1]) <= 1.0  # a regex reward scores 0 or 1
        [clipped] = server.query('finetune_ppo_clip_fraction{job="rl-watched", rank="0"}')
        assert 0.0 <= float(clipped["value"][1]) <= 1.0
    finally:
        run.kill()


def test_metrics_disabled_start_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pods list no metrics port then (tests/unit/test_builders.py); the rank must not listen either.
    from finetune_operator.api.trainer_config import TrainerConfig, build_trainer_config
    from finetune_operator.api.validation import validate_object
    from finetune_trainer.distributed import World
    from finetune_trainer.harness import start_metrics

    port = free_port()
    monkeypatch.setenv("FINETUNE_METRICS_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("FINETUNE_METRICS_PORT", str(port))
    world = World(rank=0, local_rank=0, world_size=1, local_world_size=1)

    def config(enabled: bool) -> TrainerConfig:
        spec = {"model": {"uri": "org/m"}, "data": {"train": {"uri": "t.jsonl"}}, "training": {"maxSteps": 1}}
        spec["metrics"] = {"enabled": enabled}
        manifest = {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "m"}}
        return build_trainer_config(validate_object({**manifest, "spec": spec}), namespace="ns")

    assert start_metrics(config(False), world) is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # Enabled, the same call serves this rank's series there (the server lives until the process ends).
    assert start_metrics(config(True), world) is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert 'finetune_preemptions_total{job="m",namespace="ns",rank="0"} 0.0' in response.read().decode()
