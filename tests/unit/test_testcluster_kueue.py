"""hack/testcluster.py's Kueue: its Configuration and the rewrite of its webhook configurations for loopback
(pure functions; tests/e2e's `kueue` fixture runs the real thing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _testcluster() -> ModuleType:
    name = "finetune_testcluster"  # the name tests/emulators.py loads it under: one module either way
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "hack" / "testcluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tc = _testcluster()


def _webhook(name: str, group: str, resource: str, path: str) -> dict[str, Any]:
    return {
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
        "failurePolicy": "Fail",
        "name": name,
        "rules": [
            {
                "apiGroups": [group],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": [resource],
            }
        ],
        "sideEffects": "None",
    }


# The shape of Kueue's config/components/webhook/manifests.yaml (as kubectl reads it), abridged.
MANIFESTS = [
    {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mutating-webhook-configuration"},
        "webhooks": [
            _webhook("mdeployment.kb.io", "apps", "deployments", "/mutate-apps-v1-deployment"),
            _webhook("mjob.kb.io", "batch", "jobs", "/mutate-batch-v1-job"),
            _webhook("mpod.kb.io", "", "pods", "/mutate--v1-pod"),
            _webhook("mrayjob.kb.io", "ray.io", "rayjobs", "/mutate-ray-io-v1-rayjob"),
            _webhook("mworkload.kb.io", "kueue.x-k8s.io", "workloads", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
        ],
    },
    {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "validating-webhook-configuration"},
        "webhooks": [
            _webhook("vjob.kb.io", "batch", "jobs", "/validate-batch-v1-job"),
            _webhook("vjobset.kb.io", "jobset.x-k8s.io", "jobsets", "/validate-jobset-x-k8s-io-v1alpha2-jobset"),
            _webhook(
                "vclusterqueue.kb.io",
                "kueue.x-k8s.io",
                "clusterqueues",
                "/validate-kueue-x-k8s-io-v1beta2-clusterqueue",
            ),
        ],
    },
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "webhook-service"}},
]


def test_webhooks_keep_only_jobs_and_kueue_kinds_with_prefixed_names() -> None:
    out = tc.kueue_webhook_configurations(MANIFESTS, 40123, "Q0E=")
    assert [(c["kind"], c["metadata"]["name"]) for c in out] == [
        ("MutatingWebhookConfiguration", "kueue-mutating-webhook-configuration"),
        ("ValidatingWebhookConfiguration", "kueue-validating-webhook-configuration"),
    ]
    assert [w["name"] for w in out[0]["webhooks"]] == ["mjob.kb.io", "mworkload.kb.io"]
    assert [w["name"] for w in out[1]["webhooks"]] == ["vjob.kb.io", "vclusterqueue.kb.io"]


def test_webhooks_call_loopback_urls_trusting_the_given_ca() -> None:
    out = tc.kueue_webhook_configurations(MANIFESTS, 40123, "Q0E=")
    by_name = {w["name"]: w for c in out for w in c["webhooks"]}
    assert by_name["mjob.kb.io"]["clientConfig"] == {
        "url": "https://127.0.0.1:40123/mutate-batch-v1-job",
        "caBundle": "Q0E=",
    }
    assert by_name["vclusterqueue.kb.io"]["clientConfig"]["url"] == (
        "https://127.0.0.1:40123/validate-kueue-x-k8s-io-v1beta2-clusterqueue"
    )
    assert all("service" not in w["clientConfig"] for w in by_name.values())


def test_only_labelled_jobs_reach_kueue() -> None:
    out = tc.kueue_webhook_configurations(MANIFESTS, 40123, "Q0E=")
    by_name = {w["name"]: w for c in out for w in c["webhooks"]}
    for name in ("mjob.kb.io", "vjob.kb.io"):
        assert by_name[name]["objectSelector"] == {
            "matchExpressions": [{"key": "kueue.x-k8s.io/queue-name", "operator": "Exists"}]
        }
        exprs = by_name[name]["namespaceSelector"]["matchExpressions"]
        assert exprs == [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "kueue-system"]}
        ]
    # Kueue's own kinds are not filtered: every one of them is Kueue's.
    assert "objectSelector" not in by_name["mworkload.kb.io"]
    assert "namespaceSelector" not in by_name["vclusterqueue.kb.io"]


def test_webhook_rewrite_leaves_its_input_alone() -> None:
    before = repr(MANIFESTS)
    tc.kueue_webhook_configurations(MANIFESTS, 1, "x")
    assert repr(MANIFESTS) == before


def test_config_is_loopback_only_without_leader_election_or_cert_rotation() -> None:
    cfg = tc.kueue_config(41001, 41002, 41003, Path("/d/kueue/certs"))
    assert cfg["apiVersion"] == "config.kueue.x-k8s.io/v1beta2"
    assert cfg["kind"] == "Configuration"
    assert cfg["namespace"] == "kueue-system"
    assert cfg["leaderElection"] == {"leaderElect": False}
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 41001, "certDir": "/d/kueue/certs"}
    assert cfg["health"] == {"healthProbeBindAddress": "127.0.0.1:41002"}
    assert cfg["metrics"] == {"bindAddress": "127.0.0.1:41003"}
    assert cfg["integrations"] == {"frameworks": ["batch/job"]}
    assert cfg["manageJobsWithoutQueueName"] is False
    assert cfg["featureGates"] == {"VisibilityOnDemand": False}


def test_kueue_is_built_last_and_never_by_up() -> None:
    assert list(tc.COMPONENTS)[-1] == "kueue"
    assert "kueue" not in tc.UP_COMPONENTS
    assert set(tc.UP_COMPONENTS) == set(tc.COMPONENTS) - {"kueue"}
    assert "kueue" in tc.STOP_ORDER[0]  # stopped with the other clients, before the API server


def test_json_objects_reads_kubectls_output_for_one_a_list_or_several() -> None:
    a, b = {"kind": "A", "n": 1}, {"kind": "B", "n": 2}
    assert tc.json_objects('{"kind": "A", "n": 1}\n') == [a]
    assert tc.json_objects('{"kind": "List", "items": [{"kind": "A", "n": 1}, {"kind": "B", "n": 2}]}') == [a, b]
    assert tc.json_objects('{\n "kind": "A", "n": 1\n}\n{\n "kind": "B", "n": 2\n}\n') == [a, b]
    assert tc.json_objects("") == []
