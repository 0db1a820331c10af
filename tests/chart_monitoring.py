"""The chart's monitoring objects as users get them, and a real Prometheus to run them in.

``render`` runs ``helm template`` on charts/finetune-operator; the rules file, the dashboards and the
scrape configs are taken from that rendered output (never from the chart's source files), so the tests
check what a user installs. ``Prometheus`` is Debian's ``prometheus`` binary on loopback.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import yaml
from polling import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "finetune-operator"


@functools.cache
def helm_path() -> Path:
    """helm from hack/testcluster.py's cache: fetched now if missing (or waited for, when hack/test.sh's
    background build is fetching it)."""
    testcluster = [sys.executable, str(REPO / "hack" / "testcluster.py")]
    fetched = subprocess.run([*testcluster, "build", "kubectl-helm"], capture_output=True, text=True, timeout=600)
    assert fetched.returncode == 0, f"fetching kubectl and helm failed:\n{fetched.stderr[-4000:]}"
    out = subprocess.run([*testcluster, "paths"], capture_output=True, text=True, timeout=60, check=True).stdout
    path = Path(json.loads(out)["helm"])
    assert path.is_file(), f"helm not found at {path}: run `.venv/bin/python hack/testcluster.py build`"
    return path


def render(values: dict[str, Any], workdir: Path, *, namespace: str = "monitoring") -> list[dict[str, Any]]:
    """`helm template` of the chart with these values (written to a file, as a user's -f values.yaml)."""
    values_file = workdir / "values.yaml"
    values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    proc = subprocess.run(
        [str(helm_path()), "template", "ft", str(CHART), "--namespace", namespace, "-f", str(values_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def rules_file(docs: list[dict[str, Any]], path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    path.write_text(yaml.safe_dump({"groups": one(docs, "PrometheusRule")["spec"]["groups"]}), encoding="utf-8")
    return path


def dashboards(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Dashboard file name -> the dashboard JSON, from the ConfigMaps labelled for Grafana's sidecar."""
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for key, text in d["data"].items():
                out[key] = json.loads(text)
    return out


#: The job dashboard's collapsed row of online RL's panels: data only for jobs of task.type rl.
RL_ROW = "Online RL (task.type rl)"


def panel_queries(dashboard: dict[str, Any], *, without_rows: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel (rows included), but those of the collapsed
    rows titled in `without_rows` (a collapsed row holds its panels; an open row's follow it)."""
    out = []
    for panel in dashboard["panels"]:
        if panel["title"] in without_rows:
            assert panel["type"] == "row" and panel["collapsed"], f"{panel['title']!r} is not a collapsed row"
            continue
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                out.append((f"{p['title']} [{target['refId']}]", target["expr"]))
    return out


def row_queries(dashboard: dict[str, Any], title: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the panels of the collapsed row `title`."""
    [row] = [p for p in dashboard["panels"] if p["title"] == title]
    assert row["type"] == "row" and row["collapsed"], f"{title!r} is not a collapsed row"
    return panel_queries({"panels": row["panels"]})


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable interpolation: $name and ${name}."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"no value for ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


class Queryable(Protocol):
    def query(self, promql: str) -> list[dict[str, Any]]: ...


def finite(result: list[dict[str, Any]]) -> list[float]:
    """The finite values of an instant query's result."""
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


def queries_without_data(server: Queryable, queries: list[tuple[str, str]], variables: dict[str, str]) -> list[str]:
    """The panel titles among `queries` (see panel_queries) whose query, with Grafana's variables
    substituted, returns no finite value from `server` now."""
    return [title for title, expr in queries if not finite(server.query(substitute(expr, variables)))]


def _relabelings(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus Operator RelabelConfig (camelCase) -> Prometheus relabel_config."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k): (v.lower() if k == "action" else v) for k, v in r.items()} for r in items]


def _label_name(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def pod_sd_targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Prometheus's kubernetes_sd (role pod) discovers from these pods: one target per declared
    container port, with its ``__meta_kubernetes_*`` labels.

    Debian's prometheus is built without kubernetes_sd; the tests read the pods from the real API
    server and hand Prometheus the same targets and meta labels through file_sd, so the PodMonitor's
    selection and relabeling are still evaluated by Prometheus itself.
    """
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status", {})
        base = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": status.get("podIP", ""),
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
        }
        for key, value in (meta.get("labels") or {}).items():
            base[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = value
            base[f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}"] = "true"
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                labels = {
                    **base,
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
                }
                address = f"{status.get('podIP', '')}:{port['containerPort']}"
                groups.append({"targets": [address], "labels": labels})
    return groups


def podmonitor_scrape_configs(podmonitor: dict[str, Any], sd_file: Path, *, host: str) -> list[dict[str, Any]]:
    """The scrape configs the Prometheus Operator generates for a PodMonitor, fed by ``sd_file``
    (targets from :func:`pod_sd_targets`) instead of kubernetes_sd.

    One liberty: pod IPs of the test cluster's (kwok) pods lead nowhere, so the target address becomes
    ``host:<container port>``, where the pod's processes run in the test.
    """
    spec = podmonitor["spec"]
    selector = spec["selector"]
    keep: list[dict[str, Any]] = [
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"}
    ]
    names = spec.get("namespaceSelector", {}).get("matchNames")
    if names:
        keep.append({"source_labels": ["__meta_kubernetes_namespace"], "regex": "|".join(names), "action": "keep"})
    for label, value in selector.get("matchLabels", {}).items():
        keep.append(
            {"source_labels": [f"__meta_kubernetes_pod_label_{_label_name(label)}"], "regex": value, "action": "keep"}
        )
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "Exists", f"translate {expr} too"
        keep.append(
            {
                "source_labels": [f"__meta_kubernetes_pod_labelpresent_{_label_name(expr['key'])}"],
                "regex": "true",
                "action": "keep",
            }
        )
    configs = []
    for i, ep in enumerate(spec["podMetricsEndpoints"]):
        relabel = [*keep]
        if "port" in ep:
            relabel.append(
                {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"], "action": "keep"}
            )
        relabel += _relabelings(ep.get("relabelings", []))
        relabel += [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_port_number"],
                "target_label": "__address__",
                "replacement": f"{host}:$1",
            },
        ]
        configs.append(
            {
                "job_name": f"podMonitor/{podmonitor['metadata']['namespace']}/{podmonitor['metadata']['name']}/{i}",
                "honor_labels": bool(ep.get("honorLabels", False)),
                "scrape_interval": ep["interval"],
                "scrape_timeout": ep["interval"],
                "metrics_path": ep.get("path", "/metrics"),
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
                "relabel_configs": relabel,
            }
        )
    return configs


def write_sd_file(path: Path, groups: list[dict[str, Any]]) -> None:
    """Replace the file_sd file atomically (Prometheus watches it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups), encoding="utf-8")
    tmp.replace(path)


def servicemonitor_static_configs(servicemonitor: dict[str, Any], target: str) -> list[dict[str, Any]]:
    """A ServiceMonitor's endpoints as static scrape configs of one target (the operator process)."""
    return [
        {
            "job_name": f"serviceMonitor/{servicemonitor['metadata']['name']}/{i}",
            "honor_labels": bool(ep.get("honorLabels", False)),
            "scrape_interval": ep["interval"],
            "scrape_timeout": ep["interval"],
            "metrics_path": ep.get("path", "/metrics"),
            "static_configs": [{"targets": [target]}],
        }
        for i, ep in enumerate(servicemonitor["spec"]["endpoints"])
    ]


class Prometheus:
    """Debian's prometheus on loopback with the given scrape configs and rule files."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], rule_files: list[Path]):
        binary = shutil.which("prometheus")
        assert binary, (
            "prometheus is not installed: hack/test.sh installs Debian's package (apt-get install prometheus)"
        )
        self.workdir = workdir
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(p) for p in rule_files],
                    "scrape_configs": scrape_configs,
                }
            ),
            encoding="utf-8",
        )
        check = subprocess.run(
            [str(Path(binary).with_name("promtool")), "check", "config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for("Prometheus to answer queries", lambda: self._alive() and self.query("up") is not None, timeout=60)

    def _alive(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()[-3000:]}"
        return True

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()
