"""`finetune validate` and `finetune crd`, driven as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from finetune_operator.cli import main

REQUIRED_EXAMPLES = {
    "quickstart.yaml",
    "lora-sft-2-nodes.yaml",
    "qlora.yaml",
    "deepspeed-zero3-full.yaml",
    "continual-pretraining.yaml",
    "classification.yaml",
    "dpo.yaml",
}


def test_examples_exist_and_validate(repo: Path) -> None:
    examples = {p.name for p in (repo / "examples").glob("*.yaml")}
    assert examples >= REQUIRED_EXAMPLES
    result = CliRunner().invoke(main, ["validate", str(repo / "examples")])
    assert result.exit_code == 0, result.output
    for name in examples:
        assert f"{name}:" in result.output


@pytest.mark.parametrize("name", sorted(REQUIRED_EXAMPLES))
def test_each_example_validates_on_its_own(repo: Path, name: str) -> None:
    result = CliRunner().invoke(main, ["validate", "-q", str(repo / "examples" / name)])
    assert result.exit_code == 0, result.output


BAD = """\
apiVersion: finetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: bad
spec:
  model:
    uri: org/model
  data:
    train:
      uri: train.jsonl
  training:
    epochs: 1
    maxSteps: 10
    learningRate: -3
---
apiVersion: finetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: good
spec:
  model: {uri: org/model}
  data: {train: {uri: train.jsonl}}
  training: {epochs: 1}
"""


def test_validate_prints_file_line_and_field_for_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "jobs.yaml"
    bad.write_text(BAD)
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{bad}:14: spec.training.learningRate: Input should be greater than 0" in lines
    assert f"{bad}:16: FineTuneJob good is valid" in lines
    assert "1 invalid manifest(s)" in lines


def test_validate_reports_rule_errors_at_their_field(tmp_path: Path) -> None:
    bad = tmp_path / "jobs.yaml"
    bad.write_text(BAD.replace("    learningRate: -3\n", ""))
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert (
        f"{bad}:13: spec.training.maxSteps: exactly one of spec.training.epochs or spec.training.maxSteps must be set"
    ) in result.output.splitlines()


def test_validate_reports_yaml_syntax_errors_with_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: finetune.io/v1alpha1\nkind: FineTuneJob\nspec:\n  model: [unclosed\n")
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:5: <document>: invalid YAML" in result.output


def test_validate_fails_when_nothing_to_check(tmp_path: Path) -> None:
    other = tmp_path / "cm.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = CliRunner().invoke(main, ["validate", str(other)])
    assert result.exit_code == 1
    assert "no FineTuneJob manifests found" in result.output


def test_crd_command_prints_the_committed_crd(repo: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["crd"])
    assert result.exit_code == 0
    assert result.output == (repo / "crds" / "finetunejobs.finetune.io.yaml").read_text()
    out = tmp_path / "crd.yaml"
    assert CliRunner().invoke(main, ["crd", "--output", str(out)]).exit_code == 0
    assert out.read_text() == result.output


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("finetune")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "validate" in proc.stdout


def test_import_operator_is_the_standard_library(repo: Path) -> None:
    # From the repository root, where a directory named `operator/` exists, and with our packages
    # importable: Python's own `operator` module must still win.
    code = (
        "import operator, finetune_operator, finetune_trainer, kopf, kubernetes;"
        "assert hasattr(operator, 'itemgetter'), operator;"
        "print(getattr(operator, '__file__', 'builtin'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "/operator/" not in proc.stdout
