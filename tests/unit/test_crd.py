"""The committed CRD is exactly what the models generate, and it is a sound structural schema."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from finetune_operator.api import crd
from finetune_operator.api.validation import validate_object

CRD_FILE = Path("crds/finetunejobs.finetune.io.yaml")
#: The only subtrees that keep unknown fields, and why: `affinity` is the Kubernetes core Affinity
#: type, passed verbatim to the pod template and validated by the API server when the Job is created.
PRESERVE_UNKNOWN = {"spec.resources.affinity"}


def schema() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_matches_the_models(repo: Path) -> None:
    committed = (repo / CRD_FILE).read_text(encoding="utf-8")
    assert committed == crd.render(), (
        f"{CRD_FILE} is stale: run `hack/update-crds.sh` (refreshes the chart's copy too) and commit the result"
    )


def test_every_property_has_a_description() -> None:
    missing = [
        path
        for path, node in walk(schema(), "")
        if path.startswith(("spec", "status")) and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert not missing, f"properties without description: {missing}"


def test_unknown_fields_are_preserved_only_where_documented() -> None:
    preserved = {path for path, node in walk(schema(), "") if node.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == PRESERVE_UNKNOWN


def test_schema_is_structural() -> None:
    for path, node in walk(schema(), ""):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "const", "title"} & set(node), path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        if node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "properties" in node or "additionalProperties" in node or path == "metadata", path


def _resolve(node: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    for part in [p for p in dotted.split(".") if p]:
        props = node.get("properties", {})
        if part not in props:
            return None
        node = props[part]
    return node


def test_cel_rules_refer_to_real_fields() -> None:
    root = schema()
    count = 0
    for path, node in walk(root, ""):
        for rule in node.get("x-kubernetes-validations", []):
            count += 1
            assert rule["message"], rule
            if "fieldPath" in rule:
                assert _resolve(node, rule["fieldPath"]) is not None, (path, rule)
            # Field references, not the method calls on them (self.key.matches(...) refers to .key).
            for ref in re.findall(r"self((?:\.[A-Za-z][A-Za-z0-9]*\b(?!\())+)", rule["rule"]):
                target = node if path != "" else root
                if ref.startswith(".metadata"):
                    continue
                assert _resolve(target, ref) is not None, f"{path}: {rule['rule']} refers to unknown {ref}"
    assert count >= 30


def test_status_has_no_defaults_and_spec_defaults_are_valid() -> None:
    root = schema()
    assert not [p for p, n in walk(root["properties"]["status"], "status") if "default" in n]

    def defaulted(node: dict[str, Any], value: Any) -> Any:
        if isinstance(value, dict) and "properties" in node:
            for name, child in node["properties"].items():
                if name not in value and "default" in child:
                    value[name] = defaulted(child, yaml.safe_load(yaml.safe_dump(child["default"])))
                elif name in value:
                    value[name] = defaulted(child, value[name])
        return value

    manifest = {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "d"},
        "spec": {"model": {"uri": "m"}, "data": {"train": {"uri": "t.jsonl"}}, "training": {"epochs": 1}},
    }
    manifest["spec"] = defaulted(root["properties"]["spec"], manifest["spec"])
    # What the API server stores after defaulting is what the models would have chosen.
    assert manifest["spec"]["method"] == {"type": "lora"}  # spec.method.lora is refused by non-LoRA methods
    assert manifest["spec"]["checkpoint"]["keepLast"] == 3
    job = validate_object(manifest)
    assert _is_subset(manifest["spec"], job.to_manifest()["spec"])


def test_defaults_leave_out_the_fields_rules_test_for_presence() -> None:
    """A CEL `has()` cannot tell a user's value from a default the API server filled in: the fields
    whose presence a rule refuses (method.lora under non-LoRA methods, lora.r under adalora,
    forgetting.ewc/replay) or defers to the task (evaluation.metrics) have no default anywhere in the
    schema, also inside a defaulted parent."""
    spec = schema()["properties"]["spec"]["properties"]
    lora = spec["method"]["properties"]["lora"]
    assert "default" not in lora and "default" not in lora["properties"]["r"]
    assert "lora" not in spec["method"]["default"]
    evaluation = spec["training"]["properties"]["evaluation"]
    assert "default" not in evaluation["properties"]["metrics"] and "metrics" not in evaluation.get("default", {})
    forgetting = spec["training"]["properties"]["forgetting"]
    assert "default" not in forgetting and not any("default" in f for f in forgetting["properties"].values())


def _is_subset(part: Any, whole: Any) -> bool:
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _is_subset(v, whole[k]) for k, v in part.items())
    return bool(part == whole)


def test_names_and_printer_columns() -> None:
    obj = crd.crd()
    names = obj["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("FineTuneJob", "finetunejobs", ["ftj"])
    assert names["categories"]
    version = obj["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Nodes", "Method", "Progress", "Loss", "Age"]
