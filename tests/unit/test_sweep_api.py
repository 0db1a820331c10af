"""The FineTuneSweep API: its committed CRD is what the models generate, and `finetune validate` refuses
a bad sweep naming the field (FILE:LINE: FIELD: MESSAGE), including what only Python can check."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from finetune_operator.api import sweep_crd
from finetune_operator.api.sweep import FineTuneSweepSpec, trial_spec
from finetune_operator.api.validation import InvalidSpec, validate_sweep_object
from finetune_operator.cli import main

CRD_FILE = Path("crds/finetunesweeps.finetune.io.yaml")
CHART_CRD_FILE = Path("charts/finetune-operator/crds/finetunesweeps.finetune.io.yaml")
EXAMPLE = Path("examples/sweep-lora-lr.yaml")

SWEEP: dict[str, Any] = {
    "apiVersion": "finetune.io/v1alpha1",
    "kind": "FineTuneSweep",
    "metadata": {"name": "lr"},
    "spec": {
        "template": {
            "model": {"uri": "org/model"},
            "data": {"train": {"uri": "train.jsonl"}, "evalSplit": 0.1},
            "training": {"maxSteps": 10, "evaluation": {"everySteps": 5}},
        },
        "searchSpace": [
            {"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-2, "log": True},
            {"path": "method.lora.r", "type": "categorical", "choices": [4, 8]},
        ],
        "objective": {"metric": "loss", "direction": "minimize"},
        "maxTrials": 4,
        "parallelism": 2,
        "pruning": {"type": "median"},
    },
}


def with_changes(**changes: Any) -> dict[str, Any]:
    """SWEEP with dotted paths under spec set (``searchSpace__0__low``), None deleting."""
    manifest = copy.deepcopy(SWEEP)
    for dotted, value in changes.items():
        node: Any = manifest["spec"]
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        key: Any = int(leaf) if leaf.isdigit() else leaf
        if value is None:
            del node[key]
        else:
            node[key] = value
    return manifest


def errors(manifest: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as exc:
        validate_sweep_object(manifest)
    return {e.path: e.message for e in exc.value.errors}


def test_committed_crd_matches_the_models(repo: Path) -> None:
    rendered = sweep_crd.render()
    assert (repo / CRD_FILE).read_text(encoding="utf-8") == rendered, f"{CRD_FILE} is stale: run hack/update-crds.sh"
    assert (repo / CHART_CRD_FILE).read_text(encoding="utf-8") == rendered, f"{CHART_CRD_FILE}: run hack/update-crds.sh"


def _walk(node: dict[str, Any], path: str) -> Any:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_crd_is_structural_described_and_named() -> None:
    obj = sweep_crd.crd()
    assert obj["metadata"]["name"] == "finetunesweeps.finetune.io"
    names = obj["spec"]["names"]
    assert (names["kind"], names["shortNames"]) == ("FineTuneSweep", ["fts"])
    version = obj["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Done", "Running", "Best", "Best-Trial", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    preserved = set()
    for path, node in _walk(schema, ""):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "const", "title"} & set(node), path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.add(path)
        else:
            assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if path.startswith(("spec", "status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"
    # Scalars of any type (categorical choices, parameter values) and the job's affinity only.
    assert preserved == {
        "spec.template.resources.affinity",
        "spec.searchSpace[].choices[]",
        "status.trials[].params{}",
        "status.bestParams{}",
    }
    # The template is immutable as a whole; a job's own transition rules are not repeated inside it.
    template = schema["properties"]["spec"]["properties"]["template"]
    text = yaml.safe_dump(template)
    assert text.count("oldSelf") == 1 and "spec.template cannot change" in text


def test_the_example_validates(repo: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(repo / EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "FineTuneSweep sweep-lora-lr is valid" in result.output


def test_a_valid_sweep_and_its_trial_specs() -> None:
    sweep = validate_sweep_object(copy.deepcopy(SWEEP))
    spec = trial_spec(sweep.spec.template, {"training.learningRate": 0.001, "method.lora.r": 4})
    assert spec.training.learning_rate == 0.001
    assert spec.method.lora is not None and spec.method.lora.r == 4  # the object is created on the way
    assert sweep.spec.template.method.lora is None  # the template is left as it was


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"searchSpace__0__path": "training.learningRat"}, "spec.searchSpace[0].path", "did you mean learningRate?"),
        ({"searchSpace__0__path": "training"}, "spec.searchSpace[0].path", "is an object"),
        ({"searchSpace__0__path": "training.maxSteps.x"}, "spec.searchSpace[0].path", "is not an object with fields"),
        ({"searchSpace__0__path": "task.type"}, "spec.searchSpace[0].path", "takes strings, not a float parameter"),
        ({"searchSpace__1__path": "training.learningRate"}, "spec.searchSpace[1].path", "searched twice"),
        ({"searchSpace__0__high": 2.0}, "spec.searchSpace[0].high", "spec.training.learningRate"),
        ({"searchSpace__1__choices": [4, 0]}, "spec.searchSpace[1].choices", "spec.method.lora.r"),
        ({"searchSpace__1__choices": [4, "x"]}, "spec.searchSpace[1].choices", "makes the template invalid"),
        ({"searchSpace__0__low": None}, "spec.searchSpace[0].high", "low and high are required"),
        ({"searchSpace__0__low": 0.1}, "spec.searchSpace[0].high", "low <= high"),
        ({"searchSpace__0__low": 0.0}, "spec.searchSpace[0].log", "log needs low above 0"),
        ({"searchSpace__1__low": 1}, "spec.searchSpace[1].choices", "categorical takes choices only"),
        ({"searchSpace__0__choices": [1e-3]}, "spec.searchSpace[0].choices", "for type categorical"),
        ({"searchSpace__1__choices": None}, "spec.searchSpace[1].choices", "categorical needs choices"),
        (
            {"searchSpace__1": {"path": "method.lora.r", "type": "int", "low": 2, "high": 8.5}},
            "spec.searchSpace[1].low",
            "whole numbers",
        ),
        ({"objective__metric": "accuracy", "objective__direction": "maximize"}, "spec.objective.metric", "sft reports"),
        ({"objective__metric": "bleu", "objective__direction": "maximize"}, "spec.objective.metric", "evaluations"),
        ({"objective__direction": "maximize"}, "spec.objective.direction", "minimize for loss"),
        (
            {"template__data__evalSplit": None, "template__training__evaluation": None, "pruning": None},
            "spec.template.data.eval",
            "needs eval or evalSplit",
        ),
        ({"template__training__evaluation": None}, "spec.pruning", "everySteps"),
        ({"sampler": {"type": "grid"}}, "spec.sampler.type", "grid needs a step"),
        ({"sampler": {"type": "random", "startupTrials": 3}}, "spec.sampler.startupTrials", "tpe"),
        ({"pruning": {"type": "median", "minResource": 3}}, "spec.pruning.minResource", "successiveHalving"),
        ({"maxTrials": 0}, "spec.maxTrials", "greater than or equal to 1"),
        ({"template__training__maxSteps": None}, "spec.template.training.maxSteps", "exactly one of"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_field(changes: dict[str, Any], field: str, message: str) -> None:
    found = errors(with_changes(**changes))
    assert field in found, found
    assert message in found[field], found


def test_a_grid_smaller_than_max_trials_is_refused() -> None:
    grid = [
        {"path": "training.learningRate", "type": "float", "low": 0.001, "high": 0.003, "step": 0.001},
        {"path": "method.lora.r", "type": "categorical", "choices": [4, 8]},
    ]
    ok = validate_sweep_object(with_changes(searchSpace=grid, sampler={"type": "grid"}, maxTrials=6))
    assert [len(p.grid() or ()) for p in ok.spec.search_space] == [3, 2]
    found = errors(with_changes(searchSpace=grid, sampler={"type": "grid"}, maxTrials=7))
    assert "6 combinations" in found["spec.maxTrials"]


def test_a_long_name_is_refused() -> None:
    found = errors(with_changes() | {"metadata": {"name": "s" * 47}})
    assert "at most 46 characters" in found["metadata.name"]


def test_validate_prints_file_line_field_message(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(with_changes(searchSpace__0__path="training.learningRat"), sort_keys=False))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "learningRat\n" in text + "\n")
    assert re.search(rf"^{re.escape(str(path))}:{line}: spec\.searchSpace\[0\]\.path: ", result.output, re.M), (
        result.output
    )


def test_problems_are_empty_for_the_example(repo: Path) -> None:
    (doc,) = [d for d in yaml.safe_load_all((repo / EXAMPLE).read_text()) if d]
    spec = FineTuneSweepSpec.parse_manifest(doc["spec"])
    assert spec.problems() == []


@pytest.mark.parametrize(
    "changes",
    [
        {
            "template__data__format": "promptCompletion",
            "template__training__evaluation__metrics": ["loss", "bleu"],
            "objective": {"metric": "bleu", "direction": "maximize"},
        },
        {
            "template__data__format": "chat",
            "template__training__evaluation__metrics": ["rouge"],
            "objective": {"metric": "rouge", "direction": "maximize"},
        },
        {
            "template__task": {"type": "distill", "distill": {"teacher": "org/teacher"}},
            "objective": {"metric": "agreement", "direction": "maximize"},
        },
        {
            "template__task": {"type": "distill", "distill": {"teacher": "org/teacher"}},
            "objective": {"metric": "perplexity", "direction": "minimize"},
        },
    ],
    ids=["bleu", "rouge", "agreement", "distill-perplexity"],
)
def test_a_sweep_on_a_generation_or_distill_metric_is_valid(changes: dict[str, Any]) -> None:
    """The objectives a trial's status.progress now carries (evalBleu, evalRougeL, evalAgreement,
    evalPerplexity) are admitted where the template's evaluations report them."""
    sweep = validate_sweep_object(with_changes(**changes))
    assert sweep.spec.objective.metric in sweep.spec.template.eval_metrics()
    assert sweep.spec.problems() == []
