"""The Helm chart (charts/finetune-operator): lint, render, names, RBAC, schema, CRD copy.

helm is the binary hack/testcluster.py builds or downloads (`hack/testcluster.py paths`); the e2e test
(tests/e2e/test_e2e_chart.py) installs the chart on a real control plane and runs the operator with
only the chart's ServiceAccount.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_monitoring import helm_path
from finetune_operator.operator_main import parse_args

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
CASES = [None, *CI_VALUES]
CASE_IDS = ["defaults", *(p.stem for p in CI_VALUES)]
#: helm refuses release names over 53 characters; the longest one shows every name still fits.
LONG_RELEASE = "a-release-name-of-fifty-three-characters-for-the-test"
STANDARD_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
#: Verbs that widen what a holder can do beyond its own rules: never granted to the operator.
ESCALATING_VERBS = {"*", "escalate", "bind", "impersonate"}
#: The rule only the cluster-wide ClusterRole has (kopf's CRD observation; a namespaced Role cannot hold it).
KOPF_CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
#: The other: nodes, watched for node loss (handlers.watch_nodes) by an operator watching every namespace.
NODES_RULE = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}
CLUSTER_ONLY_RULES = [KOPF_CRD_RULE, NODES_RULE]
#: The leader election's Role: the replicas' Lease, in the release namespace, in both scopes.
LEASE_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]


def is_leader_role(doc: dict[str, Any]) -> bool:
    return doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"].endswith("-leader")


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_path()


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(
    helm: Path,
    values: Path | None = None,
    *sets: str,
    release: str = "fto",
    namespace: str = "finetune-system",
) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    if values is not None:
        args += ["--values", str(values)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# -- lint and render ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_lint(helm: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["--values", str(values)] if values else [])
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_template_renders_labelled_objects(helm: Path, values: Path | None) -> None:
    docs = render(helm, values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Service"} <= kinds
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        missing = STANDARD_LABELS - set(labels)
        assert not missing, f"{doc['kind']} {doc['metadata']['name']} lacks labels {sorted(missing)}"
        assert labels["app.kubernetes.io/instance"] == "fto"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_chart_versions(repo: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"], (
        f"Chart.yaml appVersion {chart['appVersion']} != pyproject.toml version {project['version']}"
    )
    docs = render(helm_path())
    container = operator_container(docs)
    assert container["image"] == f"ghcr.io/finetune-operator/operator:{project['version']}"


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_names_fit_in_63_characters(helm: Path, values: Path | None) -> None:
    docs = render(helm, values, "nameOverride=finetune-operator-with-a-longer-name", release=LONG_RELEASE)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-"), f"{doc['kind']} name {name!r} ({len(name)} chars)"
        for key, value in (doc["metadata"].get("labels") or {}).items():
            assert len(str(value)) <= 63 and not str(value).endswith("-"), f"label {key}={value!r}"
    (deployment,) = of_kind(docs, "Deployment")
    (service,) = of_kind(docs, "Service")
    assert service["metadata"]["name"] != deployment["metadata"]["name"], "Service and Deployment names collide"


# -- the operator Deployment ------------------------------------------------------------------------------


def test_deployment_defaults(helm: Path) -> None:
    docs = render(helm)
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]
    # Two replicas, one leading: a rolling upgrade hands the Lease over (the old leader releases it).
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": spec["selector"]}
    assert not of_kind(render(helm, None, "operator.replicas=1"), "PodDisruptionBudget")
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == of_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    assert container["args"] == [
        "--all-namespaces",
        "--trainer-image=ghcr.io/finetune-operator/trainer:0.1.0",
        "--metrics-port=8080",
        "--health-port=8081",
        "--leader-elect",
        "--leader-election-namespace=finetune-system",
        "--leader-election-name=fto-finetune-operator",
    ]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"},
        {"name": "health", "port": 8081, "targetPort": "health", "protocol": "TCP"},
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_helm_test_checks_the_operator_through_its_service_under_restricted_pod_security(helm: Path) -> None:
    docs = render(helm)
    (pod,) = [d for d in of_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    (service,) = of_kind(docs, "Service")
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["finetune-operator-check"]
    assert f"--health-url=http://{service['metadata']['name']}.finetune-system.svc:8081/healthz" in container["args"]
    assert container["image"] == operator_container(docs)["image"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    # The check it runs is a console script of the operator image's package.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["finetune-operator-check"] == "finetune_operator.check:main"
    # Without the Service there is nothing to check through.
    assert not of_kind(render(helm, None, "metricsService.enabled=false"), "Pod")


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_rendered_args_are_valid_operator_arguments(helm: Path, values: Path | None) -> None:
    docs = render(helm, values)
    container = operator_container(docs)
    values_data = yaml.safe_load(values.read_text()) if values else {}
    args = parse_args(container["args"])  # the operator's own parser: exits (SystemExit) on a bad flag
    assert args.namespace == values_data.get("watchNamespaces", [])
    assert args.all_namespaces is not bool(args.namespace)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (args.metrics_port, args.health_port) == (ports["metrics"], ports["health"])


def test_placement_and_pod_metadata(helm: Path) -> None:
    values = CHART / "ci" / "monitoring-values.yaml"
    data = yaml.safe_load(values.read_text())["operator"]
    docs = render(helm, values)
    (deployment,) = of_kind(docs, "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert pod["nodeSelector"] == data["nodeSelector"]
    assert pod["tolerations"] == data["tolerations"]
    assert pod["affinity"] == data["affinity"]
    assert pod["priorityClassName"] == data["priorityClassName"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["metadata"]["annotations"] == data["podAnnotations"]
    assert template["metadata"]["labels"]["team"] == "ml-platform"
    assert operator_container(docs)["resources"] == data["resources"]
    assert operator_container(docs)["image"] == f"ghcr.io/finetune-operator/operator@{data['image']['digest']}"


def test_pod_labels_cannot_override_the_selector(helm: Path) -> None:
    docs = render(helm, None, "operator.podLabels.app\\.kubernetes\\.io/component=other")
    (deployment,) = of_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "operator"


# -- RBAC ----------------------------------------------------------------------------------------------------


def rules_of(docs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (d["kind"], d["metadata"].get("namespace", ""), rule)
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
        for rule in d["rules"]
    ]


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_no_wildcard_or_escalating_rbac(helm: Path, values: Path | None) -> None:
    docs = render(helm, values)
    rules = rules_of(docs)
    assert rules, "no RBAC rendered"
    for kind, _, rule in rules:
        assert not ESCALATING_VERBS & set(rule["verbs"]), f"{kind} grants {rule}"
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], f"{kind} grants {rule}"
        assert "secrets" not in rule["resources"], f"{kind} grants {rule}: secrets are passed by reference"
        assert not rule.get("nonResourceURLs"), f"{kind} grants {rule}"


def test_cluster_scope_binds_one_cluster_role(helm: Path) -> None:
    docs = render(helm)
    (role,) = of_kind(docs, "ClusterRole")
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    (sa,) = of_kind(docs, "ServiceAccount")
    # Only the leader election's Role, for the Lease in the release namespace.
    (lease_role,) = of_kind(docs, "Role")
    (lease_binding,) = of_kind(docs, "RoleBinding")
    assert lease_role["metadata"]["namespace"] == "finetune-system" and lease_role["rules"] == LEASE_RULES
    assert lease_binding["roleRef"]["name"] == lease_role["metadata"]["name"]
    assert lease_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "finetune-system"}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "finetune-system"}
    ]
    assert KOPF_CRD_RULE in role["rules"] and NODES_RULE in role["rules"]


def test_namespaces_scope_has_nothing_cluster_wide(helm: Path) -> None:
    values = CHART / "ci" / "namespaced-values.yaml"
    watched = yaml.safe_load(values.read_text())["watchNamespaces"]
    docs = render(helm, values)
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    roles = [d for d in of_kind(docs, "Role") if not is_leader_role(d)]
    bindings = [d for d in of_kind(docs, "RoleBinding") if not is_leader_role(d)]
    assert [d["rules"] for d in of_kind(docs, "Role") if is_leader_role(d)] == [LEASE_RULES]
    assert [r["metadata"]["namespace"] for r in roles] == watched
    assert [b["metadata"]["namespace"] for b in bindings] == watched
    (sa,) = of_kind(docs, "ServiceAccount")
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "finetune-system"}
        ]
    assert [f"--namespace={ns}" for ns in watched] == operator_container(docs)["args"][: len(watched)]
    # The same rules in both scopes, from one definition; only the CRD and node watches are cluster-only.
    (cluster_role,) = of_kind(render(helm), "ClusterRole")
    for role in roles:
        assert role["rules"] == [r for r in cluster_role["rules"] if r not in CLUSTER_ONLY_RULES]


def test_rbac_off_renders_no_rbac(helm: Path) -> None:
    docs = render(helm, None, "rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=existing")
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"} & {
        d["kind"] for d in docs
    }
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


# -- values schema and cross-field checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("rbac.scope=namespace", "at '/rbac/scope': value must be one of 'cluster', 'namespaces'"),
        ("operator.replica=2", "at '/operator': additional properties 'replica' not allowed"),
        ("operator.replicas=-1", "at '/operator/replicas': minimum: got -1, want 0"),
        ("operator.image.pullPolicy=Sometimes", "at '/operator/image/pullPolicy': value must be one of"),
        ("trainer.pullPolicy=always", "at '/trainer/pullPolicy': value must be one of"),
        ("operator.metricsPort=80800", "at '/operator/metricsPort': maximum: got 80,800, want 65,535"),
        ("monitoring.serviceMonitor.interval=30 seconds", "at '/monitoring/serviceMonitor/interval'"),
        ("watchNamespaces[0]=Team_A", "at '/watchNamespaces/0'"),
        (
            "rbac.scope=namespaces",
            "rbac.scope=namespaces needs watchNamespaces: list the namespaces the operator may watch",
        ),
        ("serviceAccount.create=false", "serviceAccount.name: name an existing ServiceAccount"),
    ],
)
def test_bad_values_are_refused_clearly(helm: Path, setting: str, message: str) -> None:
    proc = run_helm(helm, "template", "fto", str(CHART), "--set", setting)
    assert proc.returncode != 0, f"--set {setting} was accepted"
    assert message in proc.stderr, f"--set {setting}: expected {message!r} in:\n{proc.stderr}"


def test_monitoring_contract_keys(helm: Path) -> None:
    """The monitoring and dashboards blocks are shared with the monitoring templates: keep their keys."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    monitoring, dashboards = values["monitoring"], values["dashboards"]
    assert monitoring["enabled"] is False and monitoring["labels"] == {}
    assert monitoring["serviceMonitor"]["interval"] == "30s" and monitoring["podMonitor"]["interval"] == "15s"
    assert {"enabled", "stallMinutes", "checkpointMaxAgeMinutes", "restartsThreshold", "throughputDropRatio"} <= set(
        monitoring["rules"]
    )
    assert dashboards["enabled"] is True and dashboards["labels"] == {"grafana_dashboard": "1"}
    assert dashboards["namespace"] == ""


# -- CRDs ----------------------------------------------------------------------------------------------------


def test_chart_crds_are_the_generated_crds(repo: Path) -> None:
    top = sorted(p.name for p in (repo / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == top, f"charts/finetune-operator/crds holds {chart}, crds/ holds {top}: run hack/update-crds.sh"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (repo / "crds" / name).read_bytes(), (
            f"charts/finetune-operator/crds/{name} differs from crds/{name}: run hack/update-crds.sh "
            "(regenerates crds/ from the typed API and copies it into the chart)"
        )


def test_readme_documents_the_main_values() -> None:
    """The chart's README documents each main value; a renamed key must not leave it stale."""
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("watchNamespaces", "rbac.scope", "operator.image.repository", "trainer.image.repository"):
        node: Any = values
        for part in key.split("."):
            node = node[part]
        assert re.search(rf"`{re.escape(key)}`", readme), f"charts/finetune-operator/README.md does not document {key}"
