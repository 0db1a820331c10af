"""ServiceAccount tokens (TokenRequest) authenticate; RBAC denies what a Role does not grant."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Cluster


def test_token_request_authenticates_and_rbac_denies(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ns = namespace
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", ns)
    cluster.kubectl("create", "role", "pod-reader", "-n", ns, "--verb=get,list,watch", "--resource=pods")
    cluster.kubectl(
        "create", "rolebinding", "trainer-reads-pods", "-n", ns, "--role=pod-reader", f"--serviceaccount={ns}:trainer"
    )
    user = f"system:serviceaccount:{ns}:trainer"

    # Authorization as seen by the API server (SubjectAccessReview through impersonation).
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", ns, f"--as={user}").strip() == "yes"
    denied = cluster.kubectl_result("auth", "can-i", "delete", "pods", "-n", ns, f"--as={user}")
    assert denied.returncode != 0 and denied.stdout.strip() == "no", denied
    denied = cluster.kubectl_result("auth", "can-i", "list", "secrets", "-n", ns, f"--as={user}")
    assert denied.stdout.strip() == "no", denied

    # A real token from the TokenRequest API, used on its own (no client certificate).
    token = cluster.kubectl("create", "token", "trainer", "-n", ns, "--duration=10m").strip()
    assert token.count(".") == 2, "not a JWT"
    kcfg = cluster.write_token_kubeconfig(tmp_path / "trainer.kubeconfig", token)

    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kcfg))
    assert whoami["status"]["userInfo"]["username"] == user
    assert f"system:serviceaccounts:{ns}" in whoami["status"]["userInfo"]["groups"]

    # Granted: list pods in its namespace.
    cluster.kubectl("get", "pods", "-n", ns, kubeconfig=kcfg)
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", ns, kubeconfig=kcfg).strip() == "yes"

    # Denied by RBAC: secrets in its namespace, pods elsewhere, and any write.
    for args in (
        ("get", "secrets", "-n", ns),
        ("get", "pods", "-n", "kube-system"),
        ("delete", "pod", "nonexistent", "-n", ns),
    ):
        res = cluster.kubectl_result(*args, kubeconfig=kcfg)
        assert res.returncode != 0, f"kubectl {' '.join(args)} should be forbidden: {res.stdout}"
        assert "forbidden" in res.stderr.lower() and user in res.stderr, res.stderr

    # A forged token is not authenticated at all.
    forged = token[:-8] + ("A" * 8 if not token.endswith("A" * 8) else "B" * 8)
    bad = cluster.write_token_kubeconfig(tmp_path / "forged.kubeconfig", forged)
    res = cluster.kubectl_result("get", "pods", "-n", ns, kubeconfig=bad)
    assert res.returncode != 0 and "unauthorized" in res.stderr.lower(), res.stderr


def test_service_account_token_audience_is_enforced(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    cluster.kubectl("create", "serviceaccount", "other", "-n", namespace)
    token = cluster.kubectl("create", "token", "other", "-n", namespace, "--audience=not-the-apiserver").strip()
    kcfg = cluster.write_token_kubeconfig(tmp_path / "aud.kubeconfig", token)
    res = cluster.kubectl_result("auth", "whoami", kubeconfig=kcfg)
    assert res.returncode != 0 and "unauthorized" in res.stderr.lower(), res.stderr


def test_controller_manager_signs_legacy_tokens_and_publishes_root_ca(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # The token controller (--service-account-private-key-file) fills service-account-token Secrets.
    cluster.kubectl("create", "serviceaccount", "legacy", "-n", namespace)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": {"name": "legacy-token", "annotations": {"kubernetes.io/service-account.name": "legacy"}},
        },
        namespace,
    )

    def filled() -> dict | None:
        secret: dict = cluster.get_json("secret", "legacy-token", namespace=namespace)
        return secret if secret.get("data", {}).get("token") else None

    secret = cluster.wait_for("the token controller to fill legacy-token", filled, timeout=30)
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert base64.b64decode(secret["data"]["ca.crt"]) == cluster.ca_file.read_bytes()
    kcfg = cluster.write_token_kubeconfig(tmp_path / "legacy.kubeconfig", token)
    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kcfg))
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:legacy"

    # The root CA publisher (--root-ca-file) puts the cluster CA into every namespace.
    cm = cluster.wait_for(
        "ConfigMap kube-root-ca.crt",
        lambda: cluster.get_json("configmap", "kube-root-ca.crt", namespace=namespace),
        timeout=30,
    )
    assert cm["data"]["ca.crt"] == cluster.ca_file.read_text()
