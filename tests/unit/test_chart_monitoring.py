"""The chart's monitoring objects, rendered by `helm template` as users get them.

The PrometheusRule's groups pass `promtool check rules`, and `promtool test rules` evaluates every
alert on synthetic series (fires when it should, stays quiet on a healthy, a finished and a just-started
job). The ServiceMonitor and PodMonitor select what the chart and the operator really create. Every
dashboard query parses as PromQL and names only metrics the trainer or the operator export.
tests/e2e/test_e2e_monitoring.py runs the same objects against a real training and operator.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_monitoring import REPO, dashboards, one, panel_queries, render, rules_file, substitute
from finetune_operator import builders, metrics
from finetune_operator.api.validation import validate_object
from prometheus_client.metrics import MetricWrapperBase

ON = {"monitoring": {"enabled": True}}
GRAFANA_VARS = {
    "namespace": "ml",
    "job": "llm",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "6h",
    "datasource": "prom",
}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed: hack/test.sh installs Debian's prometheus package (it ships promtool)"
    return path


def run_promtool(*args: str, cwd: Path) -> str:
    proc = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def trainer_metric_names() -> set[str]:
    """Names in the trainer's metrics table (telemetry.py's docstring), plus histogram series."""
    text = (REPO / "trainer_image" / "finetune_trainer" / "telemetry.py").read_text()
    names = set()
    for name, kind in re.findall(r"^(finetune_\w+)\s+(gauge|counter|histogram)\b", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert len(names) > 20, names
    return names


def operator_metric_names() -> set[str]:
    names = set()
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        for family in collector.describe():
            names |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count"}
    return names


def test_monitoring_objects_only_when_enabled(tmp_path: Path) -> None:
    kinds = {d["kind"] for d in render({}, tmp_path)}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    docs = render(
        {"monitoring": {"enabled": True, "rules": {"enabled": False}}, "dashboards": {"enabled": False}}, tmp_path
    )
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PodMonitor"} <= kinds and "PrometheusRule" not in kinds
    assert dashboards(docs) == {}


def test_monitoring_labels_intervals_and_dashboard_namespace(tmp_path: Path) -> None:
    docs = render(
        {
            "monitoring": {
                "enabled": True,
                "labels": {"release": "kube-prometheus-stack"},
                "serviceMonitor": {"interval": "20s"},
                "podMonitor": {"interval": "5s"},
            },
            "dashboards": {"namespace": "grafana", "labels": {"grafana_dashboard": "1", "team": "ml"}},
        },
        tmp_path,
        namespace="ops",
    )
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        obj = one(docs, kind)
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
        assert obj["metadata"]["namespace"] == "ops"
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["interval"] == "20s"
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["interval"] == "5s"
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "team" in d["metadata"].get("labels", {})]
    assert len(maps) == 2 and {m["metadata"]["namespace"] for m in maps} == {"grafana"}
    assert sorted(dashboards(docs)) == ["finetune-job.json", "finetune-operator.json"]


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    for values in (ON, yaml.safe_load((REPO / "charts/finetune-operator/ci/monitoring-values.yaml").read_text())):
        path = rules_file(render(values, tmp_path), tmp_path / "rules.yaml")
        out = run_promtool("check", "rules", str(path), cwd=tmp_path)
        assert "SUCCESS: 7 rules found" in out, out


def test_fractional_minutes_become_seconds(tmp_path: Path) -> None:
    docs = render(
        {"monitoring": {"enabled": True, "rules": {"stallMinutes": 0.5, "checkpointMaxAgeMinutes": 1.5}}}, tmp_path
    )
    rules = {r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert "changes(finetune_global_step[30s])" in rules["FineTuneJobStalled"]["expr"]
    assert "offset 30s" in rules["FineTuneJobStalled"]["expr"]
    assert rules["FineTuneJobCheckpointTooOld"]["expr"].rstrip().endswith("> 90")


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in {"namespace": "ml", **labels}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def go_template(text: str, labels: dict[str, str], value: float) -> str:
    """The few Prometheus alert-template forms the rules use, for the expected annotations."""

    def humanize_duration(v: float) -> str:
        s = int(v)
        d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
        parts = [f"{d}d"] if d else []
        parts += [f"{h}h"] if h or parts else []
        parts += [f"{m}m"] if m or parts else []
        return " ".join([*parts, f"{s % 60}s"])

    forms = {
        r"\$labels\.(\w+)": lambda m: labels[m.group(1)],
        r"\$value \| printf \"(%[.0-9]*[gf])\"": lambda m: m.group(1) % value,
        r"\$value \| humanizeDuration": lambda m: humanize_duration(value),
        r"\$value": lambda m: format(value, "g"),
    }

    def expand(m: re.Match[str]) -> str:
        inner = m.group(1).strip()
        for pattern, fn in forms.items():
            if found := re.fullmatch(pattern, inner):
                return str(fn(found))
        raise AssertionError(f"template form {inner!r} not known to the test")

    return re.sub(r"\{\{(.*?)\}\}", expand, text)


def alert(name: str, at: str, *jobs: str, value: float = 0, **extra: str) -> dict[str, Any]:
    """Expect alert `name` at `at` for these jobs (none: quiet), annotations expanded for `value`."""
    exp = []
    for j in jobs:
        labels = {"namespace": "ml", "job": j, **extra}
        annotations = {k: go_template(v, labels, value) for k, v in RULES[name]["annotations"].items()}
        exp.append({"exp_labels": labels, "exp_annotations": annotations})
    return {"eval_time": at, "alertname": name, "exp_alerts": exp}


RULES: dict[str, dict[str, Any]] = {}


def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool's rule unit tests (Prometheus's own evaluator) with the default thresholds."""
    rules = rules_file(render(ON, tmp_path), tmp_path / "rules.yaml")
    RULES.update({r["alert"]: r for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]})
    phases = ["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]

    def phase_series(job: str, timeline: list[tuple[str, int]]) -> list[dict[str, str]]:
        """timeline: (phase, minutes in it) in order."""
        out = []
        for ph in phases:
            vals = " ".join(" ".join(["1" if p == ph else "0"] * n) for p, n in timeline)
            out.append(series("finetune_operator_job_phase", vals, job=job, phase=ph))
        return out

    def run(input_series: list[dict[str, str]], alerts: list[dict[str, Any]]) -> None:
        tests = {
            "rule_files": [str(rules)],
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": alerts}],
        }
        spec = tmp_path / "test.yaml"
        spec.write_text(yaml.safe_dump(tests), encoding="utf-8")
        proc = subprocess.run(
            [promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    # Failed, and restarting: "broken" restarts three times while running, then fails.
    run(
        [
            *phase_series("broken", [("Running", 10), ("Restarting", 2), ("Running", 10), ("Failed", 10)]),
            series("finetune_operator_job_restarts", "0x4 1x4 2x4 3x9 3x10", job="broken"),
            *phase_series("fine", [("Running", 32)]),
            series("finetune_operator_job_restarts", "0x31", job="fine"),
        ],
        [
            alert("FineTuneJobFailed", "10m"),
            alert("FineTuneJobFailed", "23m", "broken", value=1, severity="critical"),
            alert("FineTuneJobRestartingRepeatedly", "11m"),
            alert("FineTuneJobRestartingRepeatedly", "16m", "broken", value=3, severity="warning"),
            alert("FineTuneJobRestartingRepeatedly", "25m"),  # failed: the Failed alert says it
        ],
    )
    # Stalled: "stuck" steps for 20 minutes and then no more; "done" reached its last step; "fresh"
    # appeared at minute 25 and has not stepped yet; "steady" keeps stepping.
    run(
        [
            series("finetune_global_step", "0+1x20 20x30", job="stuck", rank="0"),
            series("finetune_global_step", "0+1x20 20x30", job="stuck", rank="1"),
            series("finetune_total_steps", "100x50", job="stuck", rank="0"),
            series("finetune_global_step", "0+5x20 100x30", job="done", rank="0"),
            series("finetune_total_steps", "100x50", job="done", rank="0"),
            series("finetune_global_step", "_x25 0x25", job="fresh", rank="0"),
            series("finetune_total_steps", "_x25 100x25", job="fresh", rank="0"),
            series("finetune_global_step", "0+1x50", job="steady", rank="0"),
            series("finetune_total_steps", "100x50", job="steady", rank="0"),
        ],
        [
            alert("FineTuneJobStalled", "29m"),
            alert("FineTuneJobStalled", "30m", "stuck", severity="critical"),
            alert("FineTuneJobStalled", "34m", "stuck", severity="critical"),
            alert("FineTuneJobStalled", "36m", "fresh", "stuck", severity="critical"),
        ],
    )
    # Loss: NaN / Inf; "diverging" triples after 40 minutes (alert after 5 more); "noisy" wiggles.
    run(
        [
            series("finetune_train_loss", "2 1.5 1 NaN", job="nan", rank="0"),
            series("finetune_train_loss", "2 1.5 1 1 Inf", job="inf", rank="0"),
            series("finetune_train_loss", "2-0.025x40 3x20", job="diverging", rank="0"),
            series("finetune_train_loss", "1 1.2 0.9 1.1 0.8 1.0 0.9 1.05 0.85 1x51", job="noisy", rank="0"),
        ],
        [
            alert("FineTuneJobLossNotFinite", "2m"),
            alert("FineTuneJobLossNotFinite", "3m", "nan", value=1, severity="critical"),
            alert("FineTuneJobLossNotFinite", "4m", "inf", "nan", value=1, severity="critical"),
            alert("FineTuneJobLossDiverging", "44m"),
            alert("FineTuneJobLossDiverging", "46m", "diverging", value=3, severity="warning"),
        ],
    )
    # Throughput: "slowed" (two ranks) drops to a third after 40 minutes; "steady" does not.
    run(
        [
            series("finetune_tokens_per_second", "1000x40 300x20", job="slowed", rank="0"),
            series("finetune_tokens_per_second", "1000x40 300x20", job="slowed", rank="1"),
            series("finetune_tokens_per_second", "900 1100 1000 950x57", job="steady", rank="0"),
        ],
        [
            alert("FineTuneJobThroughputDropped", "44m"),
            alert("FineTuneJobThroughputDropped", "46m", "slowed", value=600, severity="warning"),
        ],
    )
    # Checkpoint age: committed at time 0 (promtool's clock starts at the Unix epoch), default 60 min.
    run(
        [series("finetune_last_checkpoint_timestamp_seconds", "0x70", job="old", rank="0")],
        [
            alert("FineTuneJobCheckpointTooOld", "59m"),
            alert("FineTuneJobCheckpointTooOld", "61m", "old", value=3660, severity="warning"),
        ],
    )


def test_servicemonitor_selects_the_metrics_service(tmp_path: Path) -> None:
    docs = render(ON, tmp_path, namespace="ops")
    sm = one(docs, "ServiceMonitor")["spec"]
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")]
    assert sm["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["namespaceSelector"] == {"matchNames": ["ops"]}
    [endpoint] = sm["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["honorLabels"] is True
    # Nothing else the chart renders matches (the Deployment's pods are not a Service).
    others = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d is not service
        and sm["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert others == []


@pytest.mark.parametrize("procs", [1, 3])
def test_podmonitor_selects_trainer_pods_and_every_rank_port(tmp_path: Path, procs: int) -> None:
    """The pods the operator creates (builders.job) match the PodMonitor; each rank's port is kept."""
    pm = one(render(ON, tmp_path), "PodMonitor")["spec"]
    ftj = validate_object(
        {
            "apiVersion": "finetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "llm"},
            "spec": {
                "model": {"uri": "org/model"},
                "data": {"train": {"uri": "s3://b/train.jsonl"}},
                "training": {"maxSteps": 10},
                "distributed": {"nodes": 2, "procsPerNode": procs},
                "resources": {"gpusPerNode": procs},
            },
        }
    )
    job = builders.job(ftj, "ml", "0f7c6a4e-1111-2222-3333-444455556666", 0, builders.OperatorSettings())
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pm["selector"]["matchLabels"].items() <= pod_labels.items()
    for expr in pm["selector"]["matchExpressions"]:
        assert expr["operator"] == "Exists" and expr["key"] in pod_labels
    assert pm["namespaceSelector"] == {"any": True}
    [endpoint] = pm["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True and "port" not in endpoint
    [keep] = [r for r in endpoint["relabelings"] if r["action"] == "keep"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    ports = [p for c in job["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
    kept = sorted(p["containerPort"] for p in ports if re.fullmatch(keep["regex"], p["name"]))
    base = ftj.spec.metrics.port
    assert kept == list(range(base, base + procs)), ports


def test_podmonitor_namespaces_follow_watch_namespaces(tmp_path: Path) -> None:
    docs = render({**ON, "watchNamespaces": ["a", "b"], "rbac": {"scope": "namespaces"}}, tmp_path)
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}


def test_dashboards_parse_and_name_real_metrics(tmp_path: Path) -> None:
    boards = dashboards(render(ON, tmp_path))
    known = trainer_metric_names() | operator_metric_names()
    recording = []
    for file, board in boards.items():
        assert board["uid"] and board["title"], file
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        queries = panel_queries(board)
        assert queries, file
        for title, expr in queries:
            promql = substitute(expr, GRAFANA_VARS)
            recording.append({"record": f"dashboard:query_{len(recording)}", "expr": promql})
            for name in re.findall(r"\b(finetune_\w+)", promql):
                assert name in known, f"{file}: panel {title!r} queries {name}, which nothing exports"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{file}: duplicate panel ids"
    job = boards["finetune-job.json"]
    variables = {v["name"]: v for v in job["templating"]["list"]}
    assert {"namespace", "job"} <= variables.keys()
    for title, expr in panel_queries(job):
        assert 'namespace="$namespace"' in expr and 'job="$job"' in expr, f"panel {title!r} ignores the variables"
    # Every query parses: promtool checks them as recording rules.
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": recording}]}), encoding="utf-8")
    out = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(recording)} rules found" in out, out
    json.dumps(boards)  # plain JSON all through
