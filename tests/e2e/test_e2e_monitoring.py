"""Monitoring against reality: the chart's scrape configs, dashboards and alerts in a real Prometheus.

The chart is rendered with `helm template` (monitoring on, a 30 s stall window, restarts threshold 1)
and everything is taken from that output: the PrometheusRule's groups become Prometheus's rule file,
the PodMonitor becomes the scrape config the Prometheus Operator would generate (pods listed from the
real API server every second and handed to Prometheus with kubernetes_sd's meta labels through
file_sd, as Debian's Prometheus lacks kubernetes_sd; Prometheus selects them by the PodMonitor's
labels and keeps ports by its relabeling), and the ServiceMonitor's endpoint scrapes the operator.
Liberties of a laptop: the kwok pods' IPs lead nowhere, so a discovered target's address becomes
127.0.0.1:<its container port>, where we run that pod's container command (2 ranks, as in
test_e2e_contract); the operator runs as a local process, so its ServiceMonitor endpoint becomes a
static target.

Then: every query of both dashboards returns finite data (the watched job is a classifier, so that
its evaluation scores are there too; the collapsed online-RL row is checked against a PPO training in
tests/trainer/test_metrics_and_preemption.py); a second job that restarts and then fails
fires FineTuneJobRestartingRepeatedly and FineTuneJobFailed; stopping rank 1 (SIGSTOP: rank 0 waits
in its all-reduce, its metrics server still answers) fires FineTuneJobStalled after the window.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds
import pytest
import test_e2e_operator as operator_tests
import test_e2e_sweep as sweep_tests
from chart_monitoring import (
    RL_ROW,
    Prometheus,
    dashboards,
    one,
    panel_queries,
    pod_sd_targets,
    podmonitor_scrape_configs,
    queries_without_data,
    render,
    rules_file,
    servicemonitor_static_configs,
    write_sd_file,
)
from pod_process import PodProcess
from polling import free_port_pair, wait_for

if TYPE_CHECKING:
    from conftest import Cluster, Operator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import tiny  # noqa: E402

STALL_SECONDS = 30
VALUES = {
    "monitoring": {
        "enabled": True,
        "serviceMonitor": {"interval": "1s"},
        "podMonitor": {"interval": "1s"},
        "rules": {"stallMinutes": STALL_SECONDS / 60, "restartsThreshold": 1},
    }
}
#: An alert on the operator's gauges: one scrape of the operator (1 s) and one rule evaluation (1 s).
SCRAPE_AND_EVALUATE_S = 2.0
#: An alert that follows a phase change: kwok fails the pod, the job controller the Job, the operator
#: writes the phase and its gauges; then a scrape and an evaluation (the alerts tested have no `for`).
ALERT_AFTER_PHASE_S = bounds.PHASE_S + SCRAPE_AND_EVALUATE_S
#: What Grafana substitutes for $__rate_interval at a 15 s scrape interval and a few hours' range.
RATE_INTERVAL = "1m"


@pytest.fixture
def rendered(tmp_path: Path) -> list[dict[str, Any]]:
    return render(VALUES, tmp_path)


@pytest.fixture
def prometheus(
    rendered: list[dict[str, Any]], cluster: Cluster, operator: Operator, tmp_path: Path
) -> Iterator[Prometheus]:
    """Prometheus with the chart's rules, its PodMonitor (pods discovered from the API server every
    second, see chart_monitoring.pod_sd_targets) and its ServiceMonitor endpoint (the operator)."""
    sd_file = tmp_path / "pods.json"
    write_sd_file(sd_file, [])
    stop = threading.Event()

    def discover() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a failed list is retried a second later
                write_sd_file(sd_file, pod_sd_targets(cluster.get_json("pods", "-A")["items"]))
            stop.wait(1)

    discovery = threading.Thread(target=discover, name="pod-discovery", daemon=True)
    discovery.start()
    scrape = podmonitor_scrape_configs(one(rendered, "PodMonitor"), sd_file, host="127.0.0.1")
    scrape += servicemonitor_static_configs(one(rendered, "ServiceMonitor"), f"127.0.0.1:{operator.metrics_port}")
    (tmp_path / "prom").mkdir()
    server = Prometheus(tmp_path / "prom", scrape, [rules_file(rendered, tmp_path / "rules.yaml")])
    yield server
    stop.set()
    discovery.join(timeout=30)
    server.stop()


def test_dashboards_and_alerts_against_a_real_training_and_operator(
    cluster: Cluster,
    operator: Operator,
    ns: str,
    rendered: list[dict[str, Any]],
    prometheus: Prometheus,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    server = prometheus
    boards = dashboards(rendered)
    port = free_port_pair()
    model = tiny_model
    # A classifier: its evaluations report accuracy and F1 too, which the dashboard's scores panel shows.
    train = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.classification_rows(400))
    ftj = tiny.job_manifest(
        "watched",
        model,
        train,
        task={"type": "classification", "classification": {"numLabels": len(tiny.COLORS), "labels": tiny.COLORS}},
        data={"train": {"uri": str(train)}, "format": "classification", "evalSplit": 0.1},
        training__maxSteps=100000,  # runs until the test ends
        training__evaluation={"everySteps": 10},
        checkpoint={"uri": f"file://{tmp_path}/storage", "everySteps": 25, "keepLast": 2},
        distributed={"nodes": 1, "procsPerNode": 2},
        resources={"gpusPerNode": 0, "podAnnotations": {operator_tests.HOLD: "true"}},
        metrics={"port": port},
        preflight={"mode": "skip"},  # the gang's pods are what is watched
    )
    cluster.apply(ftj, namespace=ns)
    # A second job, without metrics, that restarts once (exit 137) and then fails for good (exit 3).
    cluster.apply(operator_tests.manifest("broken", nodes=1, metrics={"enabled": False}), namespace=ns)

    # MFU needs a known peak FLOP/s: on CPU it is given, as the trainer's own metrics test does.
    pod = PodProcess(cluster, ns, "watched-a0", tmp_path, {"FINETUNE_PEAK_FLOPS": "1e12"})
    try:
        [first] = cluster.running_pods(ns, "broken-a0", 1)
        operator_tests.fail(cluster, ns, first["metadata"]["name"], 137, "OOMKilled", "CUDA out of memory")
        restarting = wait_for(
            "FineTuneJobRestartingRepeatedly to fire for broken",
            lambda: [a for a in server.alerts("FineTuneJobRestartingRepeatedly") if a["labels"]["job"] == "broken"],
            timeout=ALERT_AFTER_PHASE_S,
        )
        assert restarting[0]["labels"]["namespace"] == ns and restarting[0]["labels"]["severity"] == "warning"
        assert f"{ns}/broken restarted 1 times" in restarting[0]["annotations"]["summary"]
        [second] = cluster.running_pods(ns, "broken-a1", 1)
        operator_tests.fail(cluster, ns, second["metadata"]["name"], 3, "Error", "train.jsonl:7: missing column")
        failed = wait_for(
            "FineTuneJobFailed to fire for broken",
            lambda: [a for a in server.alerts("FineTuneJobFailed") if a["labels"]["job"] == "broken"],
            timeout=ALERT_AFTER_PHASE_S,
        )
        assert failed[0]["labels"]["severity"] == "critical" and f"{ns}/broken" in failed[0]["annotations"]["summary"]
        wait_for(
            "FineTuneJobRestartingRepeatedly to resolve once broken failed",
            lambda: not [a for a in server.alerts("FineTuneJobRestartingRepeatedly") if a["labels"]["job"] == "broken"],
            timeout=SCRAPE_AND_EVALUATE_S + bounds.REACTION_S,  # the failed phase is already in status
        )

        # A sweep of one trial, which finishes: the operator dashboard's sweep panels.
        cluster.apply(sweep_tests.sweep("tuned", max_trials=1, parallelism=1), namespace=ns)
        cluster.running_pods(ns, "tuned-0-a0", 1)
        sweep_tests.report(cluster, ns, "tuned-0", 100, 0.5)
        operator_tests.release(cluster, ns, "tuned-0-a0")
        cluster.wait_for(
            "sweep tuned Succeeded",
            lambda: sweep_tests.sweep_status(cluster, ns, "tuned").get("phase") == "Succeeded",
            timeout=bounds.operator(4),
        )

        # The dashboards' template variables offer this job, and every panel query has data.
        wait_for(
            "the dashboard variables to list the job",
            lambda: (
                ns in server.api("label/namespace/values", **{"match[]": "finetune_global_step"})
                and "watched"
                in server.api("label/job/values", **{"match[]": f'finetune_global_step{{namespace="{ns}"}}'})
            ),
            timeout=300,
        )
        variables = {"namespace": ns, "job": "watched", "__rate_interval": RATE_INTERVAL}
        for name in ("finetune-job.json", "finetune-operator.json"):
            missing: list[str] = []

            def complete(board: dict[str, Any] = boards[name], missing: list[str] = missing) -> bool:
                # The watched job is a classifier: the online-RL row gets its data in
                # tests/trainer/test_metrics_and_preemption.py.
                queries = panel_queries(board, without_rows=(RL_ROW,))
                missing[:] = queries_without_data(server, queries, variables)
                return not missing

            try:
                wait_for(f"every query of {name} to return finite data", complete, timeout=300, interval=1)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; panels without data: {missing}\n{pod.output[-3000:]}") from None
        assert len(panel_queries(boards["finetune-job.json"])) >= 25
        ranks = {s["metric"]["rank"] for s in server.query(f'finetune_global_step{{namespace="{ns}", job="watched"}}')}
        assert ranks == {"0", "1"}, "the PodMonitor did not keep both ranks' ports (metrics-0, metrics-1)"

        # Stall: rank 1 stops; rank 0 waits in its all-reduce and keeps answering scrapes.
        def stalled() -> list[dict[str, Any]]:
            return [a for a in server.alerts("FineTuneJobStalled") if a["labels"]["job"] == "watched"]

        wait_for(
            f"the step series to be older than the {STALL_SECONDS}s window",
            lambda: server.query(f'finetune_global_step{{namespace="{ns}", job="watched"}} offset {STALL_SECONDS}s'),
            timeout=120,
        )
        assert not stalled() and not server.alerts("FineTuneJobStalled", "pending"), "stall alert before any stall"
        pod.rank(1).suspend()
        stopped_at = time.monotonic()
        [firing] = wait_for("FineTuneJobStalled to fire for watched", stalled, timeout=STALL_SECONDS + 90)
        elapsed = time.monotonic() - stopped_at
        assert elapsed >= STALL_SECONDS - 5, f"fired {elapsed:.1f}s after the stall, before the {STALL_SECONDS}s window"
        assert firing["labels"]["namespace"] == ns and firing["labels"]["severity"] == "critical"
        assert f"{ns}/watched makes no progress" in firing["annotations"]["summary"]
        # Rank 0 still answers scrapes, its step frozen; stopped rank 1 does not answer.
        window = f"{STALL_SECONDS - 5}s"
        [frozen] = server.query(f'changes(finetune_global_step{{namespace="{ns}", job="watched", rank="0"}}[{window}])')
        assert float(frozen["value"][1]) == 0, frozen
        up = {s["metric"]["instance"]: float(s["value"][1]) for s in server.query(f'up{{namespace="{ns}"}}')}
        assert up == {f"127.0.0.1:{port}": 1.0, f"127.0.0.1:{port + 1}": 0.0}, up
        sys.stderr.write(
            f"\n[monitoring] {sum(len(panel_queries(b)) for b in boards.values())} panel queries with data; "
            f"FineTuneJobStalled fired {elapsed:.1f}s after SIGSTOP (window {STALL_SECONDS}s)\n"
        )
    finally:
        pod.kill()
