"""The FineTuneJob CRD on a real API server: printer columns, explain, CEL validation."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bounds
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
def examples(cluster: Cluster, crd: dict[str, Any]) -> Iterator[dict[str, list[str]]]:
    """`kubectl apply -f examples/`; yields {namespace: [FineTuneJob names]}.

    Afterwards the jobs and the namespaces it created are deleted (and gone), so that a later test
    can follow the README from a cluster without them (`kubectl create namespace ml-team`).
    """
    existing = {n["metadata"]["name"] for n in cluster.get_json("namespaces")["items"]}
    created = sorted(_example_namespaces() - existing)
    for ns in created:
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    out = cluster.kubectl("apply", "-f", str(REPO / "examples"))
    assert "finetunejob.finetune.io/" in out, out
    by_ns: dict[str, list[str]] = {}
    for item in cluster.get_json("ftj", "-A")["items"]:
        by_ns.setdefault(item["metadata"]["namespace"], []).append(item["metadata"]["name"])
    assert by_ns, "examples/ holds no FineTuneJob"
    yield by_ns

    cluster.kubectl("delete", "-f", str(REPO / "examples"), "--ignore-not-found", "--wait=false")
    if created:
        # The namespace controller deletes what is left in them (discovery, then each resource).
        cluster.kubectl("delete", "namespace", *created, "--wait=false")
        cluster.wait_for(
            f"namespaces {created} gone",
            lambda: not cluster.kubectl("get", "namespace", *created, "--ignore-not-found", "-o", "name"),
            timeout=bounds.reactions(3),
        )


def test_examples_apply_and_printer_columns(
    cluster: Cluster, crd: dict[str, Any], examples: dict[str, list[str]]
) -> None:
    cols = [c["name"] for c in crd["spec"]["versions"][0].get("additionalPrinterColumns", [])]
    for want in COLUMNS[1:]:
        assert want.capitalize() in cols, f"printer column {want} missing from the CRD: {cols}"

    n_files = len([f for f in (REPO / "examples").glob("*.y*ml") if "\nkind: FineTuneJob\n" in f.read_text()])
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


def _unit_module(name: str) -> Any:
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    return importlib.import_module(name)


def _invalid_table() -> list[tuple[str, dict[str, Any], str, str]]:
    table: list[tuple[str, dict[str, Any], str, str]] = _unit_module("test_api_validation").INVALID
    return table


def _valid_table() -> list[tuple[str, dict[str, Any]]]:
    table: list[tuple[str, dict[str, Any]]] = _unit_module("test_api_validation").VALID
    return table


_SERVER_FIELD = re.compile(
    r"(?:^|[\s\[,*])((?:metadata|spec|status|apiVersion|kind)(?:[.\[][^\s:]*)?): "
    r"(?:Invalid value|Required value|Unsupported value|Too many|Too long|Forbidden|Duplicate value|Not found)"
)


def server_fields(stderr: str) -> set[str]:
    """The fields an API server (or kubectl) error names, as `finetune validate` names them."""
    fields = set(_SERVER_FIELD.findall(stderr))
    for kind in ("unknown", "duplicate"):
        fields |= set(re.findall(rf'{kind} field "([^"]+)"', stderr))
        # A field name may itself hold a quote (a fuzzed `n"odes`): then it ends at the quote that ends
        # the entry (before ", unknown field", ", duplicate field" or the end of the line).
        fields |= set(re.findall(rf'{kind} field "(.+?)"(?=, (?:unknown|duplicate) field "|\s*$)', stderr, re.M))
    fields |= set(re.findall(r"Go struct field \w+\.([\w.]+) of type", stderr))
    for kind, _version in re.findall(r'no matches for kind "([^"]*)" in version "([^"]*)"', stderr):
        fields.add("apiVersion" if kind == "FineTuneJob" else "kind")
    for missing in re.findall(r"Object '(\w+)' is missing", stderr):
        fields.add("kind" if missing == "Kind" else missing)
    fields |= set(re.findall(r"\b(apiVersion|kind) not set", stderr))
    if re.search(r'namespaces "[^"]*" not found', stderr):
        # The API server does not check a namespace's name, only that it exists; one with an invalid
        # name never can.
        fields.add("metadata.namespace")
    return fields


@dataclass
class Verdict:
    accepted: bool
    fields: set[str]
    text: str


@pytest.fixture(scope="module")
def parity_ns(cluster: Cluster) -> Iterator[str]:
    """A namespace of its own, so that no example's name is taken (the examples live in default)."""
    name = f"parity-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def server_verdict(cluster: Cluster, content: str | bytes, namespace: str) -> Verdict:
    """What `kubectl create --dry-run=server --validate=strict` makes of a manifest (bytes as they are),
    in ``namespace`` unless the manifest names its own."""
    raw = content.encode() if isinstance(content, str) else content
    own = re.search(rb"^\s*namespace\s*:", raw, re.M)  # YAML; JSON callers pass the manifest's own
    cmd = [str(cluster.kubectl_path), f"--kubeconfig={cluster.kubeconfig}", "create", "--dry-run=server"]
    cmd += ["--validate=strict", "-f", "-", *([] if own else ["-n", namespace])]
    result = subprocess.run(cmd, input=raw, capture_output=True, timeout=60, check=False)
    stderr = result.stderr.decode("utf-8", errors="replace")
    return Verdict(result.returncode == 0, server_fields(stderr), stderr + result.stdout.decode(errors="replace"))


def python_verdict(content: bytes, tmp_path: Path) -> Verdict:
    """What `finetune validate` makes of the same bytes."""
    from finetune_operator.api.validation import check_file

    path = tmp_path / "manifest.yaml"
    path.write_bytes(content)
    result = check_file(path)
    errors = result.all_errors
    jobs = [d for d in result.documents if d.job is not None]
    accepted = not errors and bool(jobs) and not any(d.skipped for d in result.documents)
    return Verdict(accepted, {e.path for e in errors if e.path}, "\n".join(map(str, errors)))


@pytest.mark.parametrize(
    ("case", "changes", "path"), [c[:3] for c in _invalid_table()], ids=[c[0] for c in _invalid_table()]
)
def test_api_server_refuses_what_python_refuses(
    cluster: Cluster, crd: dict[str, Any], parity_ns: str, case: str, changes: dict[str, Any], path: str
) -> None:
    """Parity of the two enforcements: every manifest `finetune validate` refuses, the API server
    refuses too (schema bounds, CEL, metadata rules, kubectl's decoding), naming the same field."""
    from finetune_operator.api.validation import InvalidSpec, validate_object
    from test_api_validation import mutate

    manifest = mutate(changes)
    with pytest.raises(InvalidSpec) as info:
        validate_object(manifest)
    assert path in {e.path for e in info.value.errors}
    verdict = server_verdict(cluster, json.dumps(manifest), manifest["metadata"].get("namespace", parity_ns))
    assert not verdict.accepted, f"{case}: the API server accepted a manifest Python refuses"
    assert path in verdict.fields, (
        f"{case}: the API server's error does not name {path} (it names {sorted(verdict.fields)}):\n{verdict.text}"
    )


@pytest.mark.parametrize("changes", [c[1] for c in _valid_table()], ids=[c[0] for c in _valid_table()])
def test_api_server_accepts_what_python_accepts(
    cluster: Cluster, crd: dict[str, Any], parity_ns: str, changes: dict[str, Any]
) -> None:
    from finetune_operator.api.validation import validate_object
    from test_api_validation import mutate

    manifest = mutate(changes)
    validate_object(manifest)
    verdict = server_verdict(cluster, json.dumps(manifest), parity_ns)
    assert verdict.accepted, verdict.text


#: Where `finetune validate` is deliberately stricter than kubectl, which reads these files without a
#: word: duplicate keys (kubectl keeps the last value), bytes that are not UTF-8 (kubectl turns them into
#: U+FFFD in the value), Helm template syntax left in a value.
DELIBERATE = ("duplicate key", "not UTF-8 text", "unrendered template syntax", "a binary file")


def _file_cases() -> list[tuple[str, bytes, bool, bool]]:
    """Whole files: (id, content, accepted by finetune validate, accepted by kubectl)."""
    good = (
        "apiVersion: finetune.io/v1alpha1\nkind: FineTuneJob\nmetadata:\n  name: file-case\nspec:\n"
        "  model: {uri: org/model}\n  data: {train: {uri: train.jsonl}}\n  training: {maxSteps: 10}\n"
    )
    return [
        ("plain", good.encode(), True, True),
        (
            "scalars-as-kubectl-reads-them",
            good.replace("maxSteps: 10}", "maxSteps: 10, learningRate: 1e-4, warmupRatio: 1.0e-2}")
            .replace("training:", "resources: {env: [{name: A, value: 1:30}, {name: B, value: =}]}\n  training:")
            .replace("{uri: org/model}", "{uri: org/model, revision: 2024-01-01}")
            .replace("{train: {uri: train.jsonl}}", "{train: {uri: train.jsonl}, packing: y}")
            .encode(),
            True,
            True,
        ),
        (
            "underscored-int-for-string",
            good.replace("training:", "resources: {env: [{name: A, value: 1_000}]}\n  training:").encode(),
            False,
            False,
        ),
        ("near-miss-kind", good.replace("kind: FineTuneJob", "kind: FinetuneJob").encode(), False, False),
        ("missing-kind", good.replace("kind: FineTuneJob\n", "").encode(), False, False),
        ("missing-api-version", good.replace("apiVersion: finetune.io/v1alpha1\n", "").encode(), False, False),
        ("not-a-number", good.replace("maxSteps: 10}", "maxSteps: 10, learningRate: .nan}").encode(), False, False),
        (
            "infinite",
            good.replace("maxSteps: 10}", "maxSteps: 10, earlyStopping: {threshold: .inf}}").encode(),
            False,
            False,
        ),
        ("yaml-list", b"- a\n- b\n", False, False),
        ("empty", b"", False, False),
        ("broken-yaml", good.replace("maxSteps: 10}", "maxSteps: [10}").encode(), False, False),
        # Deliberately stricter than kubectl (see DELIBERATE).
        (
            "duplicate-key",
            good.replace("  name: file-case\n", "  name: file-case\n  name: other\n").encode(),
            False,
            True,
        ),
        ("not-utf8", good.replace("org/model", "org/mod\xe9l").encode("latin-1"), False, True),
    ]


@pytest.mark.parametrize(
    ("content", "validate_accepts", "kubectl_accepts"),
    [c[1:] for c in _file_cases()],
    ids=[c[0] for c in _file_cases()],
)
def test_kubectl_and_finetune_validate_read_files_alike(
    cluster: Cluster,
    crd: dict[str, Any],
    parity_ns: str,
    tmp_path: Path,
    content: bytes,
    validate_accepts: bool,
    kubectl_accepts: bool,
) -> None:
    mine = python_verdict(content, tmp_path)
    theirs = server_verdict(cluster, content, parity_ns)
    assert mine.accepted is validate_accepts, mine.text
    assert theirs.accepted is kubectl_accepts, theirs.text
    if validate_accepts != kubectl_accepts:
        assert any(reason in mine.text for reason in DELIBERATE), mine.text


def _related(a: str, b: str) -> bool:
    """The same field, or one inside the other (spec.data vs spec.data[0].train)."""
    return a == b or b.startswith((a + ".", a + "[")) or a.startswith((b + ".", b + "["))


#: Fuzzed manifests sent to the API server (of the unit test's several hundred).
FUZZ_SAMPLE = int(os.environ.get("FINETUNE_FUZZ_SAMPLE", "80"))


def test_api_server_agrees_with_validate_on_fuzzed_examples(
    cluster: Cluster, crd: dict[str, Any], parity_ns: str, tmp_path: Path
) -> None:
    """A seeded sample of the unit fuzz test's mutations: both refuse or both accept (but for the
    deliberate differences), and when both refuse a field, they name the same one (or one inside it:
    a mapping given as a list is "spec.data" here and its entries "spec.data[0].train" there)."""
    fuzz = _unit_module("test_validate_fuzz")
    disagreements, deliberate = [], 0
    for mutation in fuzz.mutations(FUZZ_SAMPLE, seed=7):
        mine = python_verdict(mutation.content, tmp_path)
        theirs = server_verdict(cluster, mutation.content, parity_ns)
        where = f"{mutation.what} (seed {mutation.seed})"
        report = f"\n  validate: {mine.text}\n  server: {theirs.text.strip()}"
        if not mine.accepted and any(reason in mine.text for reason in DELIBERATE):
            deliberate += 1
        elif mine.accepted != theirs.accepted:
            disagreements.append(f"{where}: validate {'accepts' if mine.accepted else 'refuses'}{report}")
        elif mine.fields and theirs.fields and not any(_related(a, b) for a in mine.fields for b in theirs.fields):
            disagreements.append(f"{where}: fields {sorted(mine.fields)} vs {sorted(theirs.fields)}{report}")
    assert not disagreements, "\n".join(disagreements)
    assert deliberate < FUZZ_SAMPLE / 4
