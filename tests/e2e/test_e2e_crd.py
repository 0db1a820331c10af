"""The FineTuneJob CRD on a real API server: printer columns, explain, CEL validation."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "finetunejobs.finetune.io.yaml"
CRD_NAME = "finetunejobs.finetune.io"
COLUMNS = ["NAME", "PHASE", "NODES", "METHOD", "PROGRESS", "LOSS", "AGE"]


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> dict[str, Any]:
    assert CRD_FILE.is_file(), f"{CRD_FILE} is missing"
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_for(
        f"CRD {CRD_NAME} Established",
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in cluster.get_json("crd", CRD_NAME).get("status", {}).get("conditions", [])
        ),
        timeout=60,
    )
    # Discovery can lag the Established condition by a moment; `kubectl get ftj` needs it.
    cluster.wait_for(
        "the ftj short name in discovery",
        lambda: cluster.kubectl_result("get", "ftj", "-A").returncode == 0,
        timeout=60,
    )
    obj: dict[str, Any] = cluster.get_json("crd", CRD_NAME)
    return obj


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    served = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert served, "no v1alpha1 version in the CRD"
    schema: dict[str, Any] = served[0]["schema"]["openAPIV3Schema"]
    return schema


def _example_namespaces() -> set[str]:
    """Namespaces the examples name in their metadata (they must exist before `apply`)."""
    found = set()
    for f in sorted((REPO / "examples").glob("*.y*ml")):
        found |= set(re.findall(r"^  namespace:\s*['\"]?([a-z0-9-]+)", f.read_text(), re.M))
    return found


@pytest.fixture(scope="module")
def examples(cluster: Cluster, crd: dict[str, Any]) -> dict[str, list[str]]:
    """`kubectl apply -f examples/`; returns {namespace: [FineTuneJob names]}."""
    for ns in sorted(_example_namespaces()):
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    out = cluster.kubectl("apply", "-f", str(REPO / "examples"))
    assert "finetunejob.finetune.io/" in out, out
    by_ns: dict[str, list[str]] = {}
    for item in cluster.get_json("ftj", "-A")["items"]:
        by_ns.setdefault(item["metadata"]["namespace"], []).append(item["metadata"]["name"])
    assert by_ns, "examples/ holds no FineTuneJob"
    return by_ns


def test_examples_apply_and_printer_columns(
    cluster: Cluster, crd: dict[str, Any], examples: dict[str, list[str]]
) -> None:
    cols = [c["name"] for c in crd["spec"]["versions"][0].get("additionalPrinterColumns", [])]
    for want in COLUMNS[1:]:
        assert want.capitalize() in cols, f"printer column {want} missing from the CRD: {cols}"

    n_files = len(list((REPO / "examples").glob("*.y*ml")))
    assert sum(len(v) for v in examples.values()) >= n_files

    # `kubectl get ftj` in the default namespace shows exactly the columns, then every namespace.
    assert "default" in examples, examples
    table = cluster.kubectl("get", "ftj")
    assert table.splitlines()[0].split() == COLUMNS, table
    assert {line.split()[0] for line in table.splitlines()[1:]} == set(examples["default"]), table
    wide = cluster.kubectl("get", "ftj", "-A")
    assert wide.splitlines()[0].split() == ["NAMESPACE", *COLUMNS], wide
    rows = {tuple(line.split()[:2]) for line in wide.splitlines()[1:]}
    assert rows == {(ns, n) for ns, names in examples.items() for n in names}, wide
    # The spec-derived columns are filled in (status ones stay empty until the operator runs).
    quick = cluster.get_json("ftj", "quickstart", namespace="default") if "quickstart" in examples["default"] else None
    if quick:
        row = next(line.split() for line in table.splitlines()[1:] if line.split()[0] == "quickstart")
        assert str(quick["spec"]["distributed"]["nodes"]) in row and quick["spec"]["method"]["type"] in row, row


def test_explain_prints_field_descriptions(cluster: Cluster, crd: dict[str, Any]) -> None:
    method = _schema(crd)["properties"]["spec"]["properties"]["method"]
    description = method.get("description", "")
    assert description, "spec.method has no description in the CRD"
    out = cluster.kubectl("explain", "finetunejob.spec.method")
    assert "FIELD:" in out and "method" in out, out
    # kubectl wraps long descriptions; compare the words.
    assert " ".join(description.split()[:12]) in " ".join(out.split()), out
    # And the fields under spec.method are listed, each with its description.
    for name, prop in method.get("properties", {}).items():
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), f"{name} missing from explain output"
        assert prop.get("description"), f"spec.method.{name} has no description"
        first_words = " ".join(prop["description"].split()[:5])
        assert first_words in " ".join(out.split()), f"description of {name} not shown: {first_words!r}"


def _rule_message(crd: dict[str, Any]) -> str:
    training = _schema(crd)["properties"]["spec"]["properties"]["training"]
    for rule in training.get("x-kubernetes-validations", []):
        msg = rule.get("message", "")
        if "epochs" in msg and "maxSteps" in msg:
            return str(msg)
    raise AssertionError("no CEL rule on spec.training mentions epochs and maxSteps")


def test_cel_rule_epochs_xor_max_steps_is_enforced(
    cluster: Cluster, crd: dict[str, Any], examples: dict[str, list[str]], namespace: str
) -> None:
    ns0, names = next(iter(sorted(examples.items())))
    base = cluster.get_json("ftj", names[0], namespace=ns0)
    bad: dict[str, Any] = {
        "apiVersion": base["apiVersion"],
        "kind": base["kind"],
        "metadata": {"name": "both-epochs-and-max-steps", "namespace": namespace},
        "spec": copy.deepcopy(base["spec"]),
    }
    training = bad["spec"].setdefault("training", {})
    training.pop("epochs", None)
    training.pop("maxSteps", None)
    training["epochs"] = 1
    training["maxSteps"] = 100
    res = cluster.kubectl_result("create", "-f", "-", input=json.dumps(bad))
    assert res.returncode != 0, f"the API server accepted a FineTuneJob with both epochs and maxSteps: {res.stdout}"
    assert "epochs" in res.stderr and "maxSteps" in res.stderr, res.stderr
    assert _rule_message(crd) in res.stderr, res.stderr
    assert "is invalid" in res.stderr, res.stderr

    # Neither is refused by the same rule; exactly one is accepted (so the rule, not something else, refused it).
    del training["epochs"], training["maxSteps"]
    res = cluster.kubectl_result("create", "--dry-run=server", "-f", "-", input=json.dumps(bad))
    assert res.returncode != 0 and _rule_message(crd) in res.stderr, res.stderr
    for only in ({"epochs": 1}, {"maxSteps": 100}):
        training.update(only)
        cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(bad))
        for key in only:
            del training[key]


def _invalid_table() -> list[tuple[str, dict[str, Any], str, str]]:
    import sys

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_api_validation import INVALID

    return INVALID


@pytest.mark.parametrize(
    ("case", "changes", "path"), [c[:3] for c in _invalid_table()], ids=[c[0] for c in _invalid_table()]
)
def test_api_server_refuses_what_python_refuses(
    cluster: Cluster, crd: dict[str, Any], case: str, changes: dict[str, Any], path: str
) -> None:
    """Parity of the two enforcements: every manifest `finetune validate` refuses, the API server
    refuses too (schema bounds or CEL), and its error names the same field."""
    from test_api_validation import mutate

    manifest = mutate(changes)
    result = cluster.kubectl_result(
        "apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", "-", input=json.dumps(manifest)
    )
    assert result.returncode != 0, f"{case}: the API server accepted a manifest Python refuses"
    if case == "wrong-api-version":
        assert "no matches for kind" in result.stderr, result.stderr
        return
    assert path in result.stderr, f"{case}: the API server's error does not name {path}:\n{result.stderr}"
