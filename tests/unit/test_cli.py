"""`finetune validate` and `finetune crd`, driven as a user runs them."""

from __future__ import annotations

import json
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
    assert f"{bad}:5: invalid YAML: expected ',' or ']'" in result.output


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


GOOD = """\
apiVersion: finetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: good
spec:
  model: {uri: org/model}
  data: {train: {uri: train.jsonl}}
  training: {maxSteps: 10}
"""

#: (id, file content, the one line expected on stderr). Every class of mistake with a file as a whole,
#: or with kubectl's reading of it, gives one `FILE:LINE: reason` line: never a traceback.
FILE_PROBLEMS: list[tuple[str, bytes, str]] = [
    ("empty-file", b"", "{f}:1: empty file: no YAML document"),
    ("only-comments", b"# nothing here\n---\n", "{f}:1: empty file: no YAML document"),
    (
        "yaml-list",
        b"- apiVersion: finetune.io/v1alpha1\n- kind: FineTuneJob\n",
        "{f}:1: expected a Kubernetes object (a mapping), found a list",
    ),
    ("scalar", b"just some text\n", "{f}:1: expected a Kubernetes object (a mapping), found a string"),
    (
        "not-utf8",
        GOOD.replace("name: good", "name: caf\xe9").encode("latin-1"),
        "{f}:4: not UTF-8 text: byte 0xe9 at byte offset 72 (column 12)",
    ),
    ("utf16", GOOD.encode("utf-16"), "{f}:1: not UTF-8 text: a UTF-16 file (save it as UTF-8)"),
    ("binary", b"PAR1\x00\x15\x04\x15\x10", "{f}:1: a binary file, not YAML text (NUL byte at byte offset 4)"),
    (
        "helm-template",
        GOOD.replace("name: good", "name: {{ .Release.Name }}").encode(),
        "{f}:4: unrendered template syntax",
    ),
    (
        "quoted-helm-template",
        GOOD.replace("name: good", 'name: "{{ .Values.name }}"').encode(),
        "{f}:4: unrendered template syntax",
    ),
    ("template-control", (GOOD + "{{- if .Values.extra }}\n").encode(), "{f}:9: unrendered template syntax"),
    (
        "unquoted-braces",
        GOOD.replace("maxSteps: 10", "maxSteps: {{ steps }}").encode(),
        "{f}:8: unrendered template syntax",
    ),
    (
        "duplicate-key",
        GOOD.replace("  name: good\n", "  name: good\n  name: other\n").encode(),
        "{f}:5: metadata.name: duplicate key 'name' (first at line 4)",
    ),
    ("duplicate-section", (GOOD + "spec: {}\n").encode(), "{f}:9: spec: duplicate key 'spec' (first at line 5)"),
    (
        "python-tag",
        GOOD.replace("org/model", "!!python/object/apply:os.system [ls]").encode(),
        "{f}:6: invalid YAML: could not determine a constructor",
    ),
    ("bad-int-tag", GOOD.replace("maxSteps: 10", "maxSteps: !!int ten").encode(), "{f}:1: invalid YAML value:"),
    (
        "tab-indent",
        GOOD.replace("  name: good", "\tname: good").encode(),
        "{f}:4: invalid YAML: found character '\\t' that cannot start any token",
    ),
    (
        "near-miss-kind",
        GOOD.replace("kind: FineTuneJob", "kind: FinetuneJob").encode(),
        "{f}:2: kind: 'FinetuneJob' is not a kind: did you mean FineTuneJob (apiVersion finetune.io/v1alpha1)?",
    ),
    (
        "plural-kind",
        GOOD.replace("kind: FineTuneJob", "kind: FineTuneJobs").encode(),
        "{f}:2: kind: 'FineTuneJobs' is not a kind",
    ),
    (
        "other-kind-in-our-group",
        GOOD.replace("kind: FineTuneJob", "kind: Job").encode(),
        "{f}:2: kind: finetune.io has no kind 'Job': the kind is FineTuneJob",
    ),
    (
        "no-kind",
        b"metadata: {name: x}\nspec: {}\n",
        "{f}:1: kind: required: every Kubernetes object names its apiVersion and kind",
    ),
    ("missing-kind", GOOD.replace("kind: FineTuneJob\n", "").encode(), "{f}:1: kind: required"),
    (
        "missing-api-version",
        GOOD.replace("apiVersion: finetune.io/v1alpha1\n", "").encode(),
        "{f}:1: apiVersion: required",
    ),
]


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in FILE_PROBLEMS], ids=[c[0] for c in FILE_PROBLEMS])
def test_file_problems_are_one_line_each(tmp_path: Path, content: bytes, expected: str) -> None:
    f = tmp_path / "job.yaml"
    f.write_bytes(content)
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.splitlines()
    assert lines[0].startswith(expected.format(f=f)), lines
    assert lines[1:] == ["1 invalid manifest(s)"], lines


def test_jinja_chat_templates_are_not_template_syntax(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    f.write_text(
        GOOD.replace("model: {uri: org/model}", f"model: {{uri: org/model, chatTemplate: {template!r}}}").replace(
            "data: {train: {uri: train.jsonl}}", "data: {train: {uri: train.jsonl}, format: chat}"
        )
    )
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 0, result.output


def test_scalars_are_read_as_kubectl_reads_them(tmp_path: Path) -> None:
    """1e-4 and 1.0e5 are numbers (PyYAML alone reads strings), a date, 1:30 and = stay strings (PyYAML
    alone reads a date, 90 and a value tag), y is a boolean."""
    f = tmp_path / "job.yaml"
    env = "resources: {env: [{name: A, value: 1:30}, {name: B, value: =}, {name: C, value: 1_000}]}"
    f.write_text(
        GOOD.replace("model: {uri: org/model}", "model: {uri: org/model, revision: 2024-01-01}")
        .replace("training: {maxSteps: 10}", f"training: {{maxSteps: 10, learningRate: 1e-4, epochs: 1.0e3}}\n  {env}")
        .replace("data: {train: {uri: train.jsonl}}", "data: {train: {uri: train.jsonl}, packing: y}")
    )
    from finetune_operator.api.validation import InvalidSpec, load_jobs

    with pytest.raises(InvalidSpec) as info:  # epochs a number (set with maxSteps), 1_000 an integer
        load_jobs(f)
    assert sorted(e.path for e in info.value.errors) == ["spec.resources.env[2].value", "spec.training.maxSteps"]
    f.write_text(f.read_text().replace(", epochs: 1.0e3", "").replace(", {name: C, value: 1_000}", ""))
    [job] = load_jobs(f)
    assert job.spec.training.learning_rate == 1e-4
    assert job.spec.model.revision == "2024-01-01"
    assert job.spec.data.packing is True
    assert [e.value for e in job.spec.resources.env] == ["1:30", "="]


def test_numbers_must_be_finite(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(GOOD.replace("maxSteps: 10}", "maxSteps: 10, maxGradNorm: .inf}"))
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 1
    assert f"{f}:8: spec.training.maxGradNorm: Input should be a finite number" in result.output.splitlines()


def test_template_syntax_in_a_comment_is_not_refused(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("# rendered from {{ .Values.job }} by helm template\n" + GOOD)
    assert CliRunner().invoke(main, ["validate", str(f)]).exit_code == 0


def test_other_kinds_are_named_as_skipped_and_lists_are_expanded(tmp_path: Path) -> None:
    f = tmp_path / "all.yaml"
    items = GOOD.replace("name: good", "name: in-list")
    f.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n---\n"
        + GOOD
        + "---\napiVersion: v1\nkind: List\nitems:\n"
        + "".join(f"  {line}\n" if i else f"- {line}\n" for i, line in enumerate(items.splitlines()))
    )
    result = CliRunner().invoke(main, ["validate", str(f)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{f}:1: skipped ConfigMap settings: not a FineTuneJob",
        f"{f}:5: FineTuneJob good is valid",
        f"{f}:17: FineTuneJob in-list is valid",
    ]
    bad = tmp_path / "bad-list.yaml"
    head, _, tail = f.read_text().rpartition("maxSteps: 10")
    bad.write_text(f"{head}maxSteps: -1{tail}")
    result = CliRunner().invoke(main, ["validate", "-q", str(bad)])
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith(f"{bad}:24: spec.training.maxSteps: Input should be greater")


@pytest.mark.parametrize("bad_first", [True, False])
def test_several_files_fail_if_any_fails_whatever_the_order(tmp_path: Path, bad_first: bool) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_bytes(b"\xff\xfe\x00")
    files = [bad, good] if bad_first else [good, bad]
    result = CliRunner().invoke(main, ["validate", *map(str, files)])
    assert result.exit_code == 1, result.output
    assert f"{good}:1: FineTuneJob good is valid" in result.output
    assert f"{bad}:1: not UTF-8 text" in result.output


def test_a_directory_with_one_broken_file_fails(tmp_path: Path, repo: Path) -> None:
    for example in (repo / "examples").glob("*.yaml"):
        (tmp_path / example.name).write_bytes(example.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "zz-broken.yml").write_text(GOOD.replace("maxSteps: 10", "maxSteps: [10"))
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "zz-broken.yml:" in result.output and "1 invalid manifest(s)" in result.output


def test_finetune_run_refuses_what_validate_refuses(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(GOOD.replace("maxSteps: 10", 'maxSteps: "10"'))
    result = CliRunner().invoke(main, ["run", str(f)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"{f}:8: spec.training.maxSteps: must be an integer, not a string: write 10 without quotes"
    ]


def test_finetune_run_starts_the_trainer_as_a_pod_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same argv builder as the pods (tests/unit/test_builders.py), standalone; and the same storage
    # environment: data, model and output URIs on spec.checkpoint's store reach its endpoint and region,
    # over whatever the caller's environment says.
    from finetune_operator import local_run
    from finetune_operator.api.trainer_config import TrainerConfig, storage_environment, trainer_command

    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(argv: list[str], *, env: dict[str, str], check: bool) -> subprocess.CompletedProcess[str]:
        calls.append((argv, env))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(local_run.subprocess, "run", fake_run)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-caller")
    f = tmp_path / "job.yaml"
    f.write_text(
        GOOD.replace("{uri: train.jsonl}", "{uri: s3://data/train.jsonl}")
        + "  checkpoint: {uri: s3://ckpt, everySteps: 5, endpointUrl: 'http://minio:9000', region: eu-west-1}\n"
        + "  preflight: {mode: skip}\n"  # the preflight would read the data; test_finetune_plan_* run it
    )
    workdir = tmp_path / "work"
    result = CliRunner().invoke(main, ["run", str(f), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    [(argv, env)] = calls
    config_file = workdir / "trainer-config.json"
    assert argv == trainer_command(config_file, nproc_per_node=1, python=sys.executable)
    config = TrainerConfig.model_validate_json(config_file.read_text())
    assert storage_environment(config.spec) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"] == "from-the-caller"


# --------------------------------------------------------------------------------------------------
# finetune plan, and the preflight of finetune run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's config and tokenizer without weights: all a preflight reads."""
    import tiny

    model = tmp_path_factory.mktemp("config-only-model")
    tokenizer = tiny.build_tokenizer()
    tokenizer.save_pretrained(model)
    tiny.llama_config(tokenizer).save_pretrained(model)
    return model


def _plan_job(tmp_path: Path, model: Path, *, rows: list[dict[str, str]] | None = None, **overrides: object) -> Path:
    import tiny

    train = tiny.write_jsonl(tmp_path / "train.jsonl", rows or tiny.prompt_completion_rows(16))
    manifest = tiny.job_manifest("planned", model, train, **{"resources": {"gpusPerNode": 1}, **overrides})
    if "preflight" not in overrides:
        del manifest["spec"]["preflight"]  # the preflight is what is tested: the default, mode auto
    return tiny.write_manifest(tmp_path / "job.yaml", manifest)


def test_finetune_plan_prints_the_preflight_and_the_memory_per_rank(tmp_path: Path, config_only_model: Path) -> None:
    from finetune_operator.api.memory import GIB, estimate
    from finetune_operator.api.validation import load_jobs
    from transformers import AutoTokenizer

    job_file = _plan_job(tmp_path, config_only_model, resources={"gpusPerNode": 1, "gpuMemory": "80Gi"})
    workdir = tmp_path / "work"
    result = CliRunner().invoke(main, ["plan", str(job_file), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "FineTuneJob planned: ready to train"
    assert "  data: 16 training records, 0 evaluation records, 0 bad" in lines
    for part in ("weights", "gradients", "optimizer", "activations", "overhead", "total"):
        assert any(line.startswith(f"    {part} ") and line.endswith(" GiB") for line in lines), part
    [verdict] = [line for line in lines if "fits in" in line]
    assert verdict.startswith("    fits in 80.00 GiB (headroom ")

    as_json = CliRunner().invoke(main, ["plan", str(job_file), "--workdir", str(workdir), "--output", "json"])
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.output)
    assert body["trainRecords"] == 16 and body["badRecords"] == 0 and body["stepsPerEpoch"] == 2
    assert body["fits"] is True and body["gpuMemory"] == 80 * GIB
    [job] = load_jobs(job_file)
    cfg = json.loads((config_only_model / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(config_only_model)
    assert body["memory"]["total"] == estimate(cfg, job.spec, tokenizer_length=len(tokenizer)).total
    # Nothing but the config and the tokenizer was read: the model directory has no weights at all.
    assert not list(config_only_model.glob("*.safetensors"))


def test_finetune_plan_exits_5_when_the_job_cannot_fit(tmp_path: Path, config_only_model: Path) -> None:
    job_file = _plan_job(tmp_path, config_only_model, resources={"gpusPerNode": 1, "gpuMemory": "1Gi"})
    result = CliRunner().invoke(main, ["plan", str(job_file), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 5, result.output
    assert result.output.splitlines()[0] == "FineTuneJob planned: will not fit in GPU memory"
    assert "    does NOT fit in 1.00 GiB (" in result.output

    # finetune run refuses it before training: no torchrun, no metrics.
    run = CliRunner().invoke(main, ["run", str(job_file), "--workdir", str(tmp_path / "run")])
    assert run.exit_code == 5, run.output
    assert "does NOT fit in 1.00 GiB" in run.output and "spec.preflight.allowWillNotFit" in run.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # The user's override: planned as ready (the estimate still shown as not fitting).
    allowed = _plan_job(
        tmp_path,
        config_only_model,
        resources={"gpusPerNode": 1, "gpuMemory": "1Gi"},
        preflight={"allowWillNotFit": True},
    )
    result = CliRunner().invoke(main, ["plan", str(allowed), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "FineTuneJob planned: ready to train (spec.preflight.allowWillNotFit)"
    assert "    does NOT fit in 1.00 GiB (" in result.output


def test_finetune_plan_exits_3_on_bad_data_naming_file_and_line(tmp_path: Path, config_only_model: Path) -> None:
    import tiny

    rows = tiny.prompt_completion_rows(6)
    rows[1] = {"prompt": "what color is the pear?"}
    job_file = _plan_job(tmp_path, config_only_model, rows=rows)
    result = CliRunner().invoke(main, ["plan", str(job_file), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 3, result.output
    lines = result.output.splitlines()
    assert lines[0] == "FineTuneJob planned: bad data"
    assert f"    {tmp_path / 'train.jsonl'}:2: missing column 'completion'" in lines
    as_json = CliRunner().invoke(main, ["plan", str(job_file), "--workdir", str(tmp_path / "work"), "-o", "json"])
    assert as_json.exit_code == 3
    assert json.loads(as_json.output)["problems"] == [f"{tmp_path / 'train.jsonl'}:2: missing column 'completion'"]
