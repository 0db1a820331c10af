"""Every task type and every example: `finetune validate` accepts it if and only if the trainer runs it.

The task table (finetune_operator.api.tasks) says which tasks have a recipe. For each `task.type`,
a job in a format the task reads is either refused by `finetune validate` naming `spec.task.type`
(no recipe yet; the API server refuses it too, tests/e2e parity rows), or accepted and trained to
the end by `finetune run` with the recipe the table names.

Each example of examples/ must validate, and runs through `finetune run` with only what this machine
cannot provide replaced: the model (a tiny one built from a config), the data (local files of the
example's format, with the example's column names; a classifier's classes become the test data's),
accelerators (GPUs, bf16, CUDA-only optimizers), the size of the gang, remote storage, and the
number of steps. Every other field — task, method and its parameters, format, packing, evaluation,
early stopping, DeepSpeed, outputs — is the example's own. An example of several FineTuneJobs (a
pipeline) runs them in file order, each where `finetune run` would put it, so that a later job's
`ftj://NAME` model, kept as written, resolves to the earlier run's merged output. The quickstart runs
as written, unchanged, in test_quickstart.py; hack/examples.sh runs every laptop example as written
(not in CI).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
import tiny
import yaml
from finetune_operator.api.tasks import TASKS, TaskType, task_row
from finetune_operator.api.trainer_config import load_trainer_config
from finetune_operator.api.v1alpha1 import MODEL_ARTIFACT_KINDS
from runs import RunResult
from test_rl import build_reward_model

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.name != "quickstart.yaml")
FINETUNE = Path(sys.executable).with_name("finetune")


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FINETUNE), "validate", str(path)], capture_output=True, text=True, timeout=120)


def rows_for(fmt: str, columns: dict[str, str], n: int = 64) -> list[dict[str, Any]]:
    """Records of ``fmt`` under the job's column names."""
    if fmt == "promptCompletion":
        rows = tiny.prompt_completion_rows(n)
        defaults = {"prompt": "prompt", "completion": "completion"}
    elif fmt == "chat":
        rows, defaults = tiny.chat_rows(n), {"messages": "messages"}
    elif fmt == "text":
        rows, defaults = tiny.text_rows(n), {"text": "text"}
    elif fmt == "classification":
        rows, defaults = tiny.classification_rows(n), {"text": "text", "label": "label"}
    elif fmt == "qa":
        rows = tiny.qa_rows(n, unanswerable=0.2)
        defaults = {"question": "question", "context": "context", "answers": "answers"}
    elif fmt == "preference":
        rows, defaults = tiny.preference_rows(n), {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    else:
        raise AssertionError(f"no test data for format {fmt}: add it with the task's recipe")
    names = {key: columns.get(key, key) for key in defaults}
    return [{names[k]: v for k, v in row.items()} for row in rows]


def test_every_task_type_has_a_row() -> None:
    assert [row.type for row in TASKS] == list(get_args(TaskType))


@pytest.mark.parametrize("task", get_args(TaskType))
def test_validate_accepts_a_task_iff_the_trainer_trains_it(
    task: str, tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    row = task_row(task)
    fmt = row.formats[0]
    data = tiny.write_jsonl(tmp_path / "train.jsonl", rows_for(fmt, {}) if row.implemented else [{"x": 1}])
    params = {
        "classification": {"numLabels": len(tiny.COLORS), "labels": tiny.COLORS},
        "qa": {"docStride": 16},  # windows of 64 tokens (maxSeqLength) overlap by less than that
        "rl": {"rewards": [{"type": "contains"}], "maxNewTokens": 8},
        "distill": {"teacher": str(tiny_model)},  # the model its own teacher: the same vocabulary
    }
    manifest = tiny.job_manifest(
        f"task-{task}", tiny_model, data, task={"type": task, **({task: params[task]} if task in params else {})}
    )
    manifest["spec"]["data"]["format"] = fmt
    manifest["spec"]["training"]["maxSteps"] = 3
    manifest["spec"]["preflight"] = {"mode": "auto"}  # every task through finetune run's preflight too
    path = tiny.write_manifest(tmp_path / "job.yaml", manifest)
    checked = validate(path)
    if not row.implemented:
        assert checked.returncode == 1, checked.stdout + checked.stderr
        assert f"spec.task.type: spec.task.type {task} is not supported yet" in checked.stdout + checked.stderr
        return
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = finetune_run(manifest)
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert (summary["task"], summary["steps"]) == (task, 3)


def cpu_sized(
    example: dict[str, Any], model: Path, data_dir: Path, earlier: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The example with what this machine cannot provide replaced (see the module docstring).
    ``earlier``: the jobs of the same file run before this one; an ``ftj://`` model naming one of
    them stays as written (that run's merged model, trained from the tiny one)."""
    job = copy.deepcopy(example)
    spec = job["spec"]
    uri = spec["model"]["uri"]
    if not (uri.startswith("ftj://") and uri.removeprefix("ftj://") in earlier):
        uri = str(model)
    # 16-bit weights are what QLoRA keeps unquantized (the API requires them); elsewhere fp32 on CPU.
    spec["model"] = {"uri": uri, "dtype": "bf16" if spec["method"]["type"] == "qlora" else "fp32"}
    if "quantization" in spec["method"]:
        spec["method"]["quantization"]["computeDtype"] = "fp32"
    rl = spec["task"].get("rl")
    if rl is not None:  # a tiny reward model for the example's (another job's output), short rollouts
        if "rewardModel" in rl:
            rl["rewardModel"] = str(build_reward_model(data_dir / "reward-model"))
        rl.update(numGenerations=2, maxNewTokens=8)
    distill = spec["task"].get("distill")
    if distill is not None:  # the tiny model teaches itself (the example's teacher is another job's output)
        distill["teacher"] = str(model)
    classification = spec["task"].get("classification")
    if classification is not None:  # the test data's classes replace the example's
        classification.update(numLabels=len(tiny.COLORS), labels=list(tiny.COLORS))
        classification.pop("classWeights", None)
    data = spec["data"]
    columns = data.get("columns", {})
    for source in ("train", "eval"):
        if source in data:
            path = tiny.write_jsonl(
                data_dir / f"{source}.jsonl", rows_for(data.get("format", "promptCompletion"), columns)
            )
            data[source] = {"uri": str(path)}
    forgetting = spec.get("training", {}).get("forgetting", {})
    if "generalEval" in forgetting:
        forgetting["generalEval"] = {"uri": str(tiny.write_jsonl(data_dir / "general.jsonl", tiny.text_rows(16)))}
    if "replay" in forgetting:
        forgetting["replay"]["source"] = {
            "uri": str(tiny.write_jsonl(data_dir / "replay.jsonl", tiny.text_rows(16, 1)))
        }
    if "fisherData" in forgetting.get("ewc", {}):
        forgetting["ewc"]["fisherData"] = {
            "uri": str(tiny.write_jsonl(data_dir / "fisher.jsonl", tiny.text_rows(8, 2)))
        }
    data["maxSeqLength"] = 64
    training = spec["training"]
    training.pop("epochs", None)
    training["maxSteps"] = 4
    training["perDeviceBatchSize"] = 2
    training["gradientAccumulationSteps"] = 1
    training["precision"] = "fp32"
    training["logEverySteps"] = 1
    if training.get("optimizer") in ("adamw8bit", "pagedAdamw8bit", "pagedAdamw32bit"):
        training["optimizer"] = "adamw"
    if "evaluation" in training and "everySteps" in training["evaluation"]:
        training["evaluation"]["everySteps"] = 2
    if data.get("evalSplit"):
        data["evalSplit"] = 0.25
    spec["distributed"] = {**spec.get("distributed", {}), "nodes": 1, "procsPerNode": 1}
    spec["resources"] = {"gpusPerNode": 0}
    spec.pop("checkpoint", None)  # finetune run's local store
    spec.get("output", {}).pop("uri", None)
    spec.pop("runPolicy", None)
    job["metadata"].pop("namespace", None)
    return job


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_validates_and_trains(
    example: Path, tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    checked = validate(example)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    manifests = [d for d in yaml.safe_load_all(example.read_text()) if d]
    runs: dict[str, RunResult] = {}
    for manifest in manifests:  # in file order: a pipeline's later jobs take the earlier ones' models
        if manifest["kind"] == "FineTuneSweep":
            # Its template trains here as a FineTuneJob (the sweep itself runs in test_sweep.py).
            manifest = {**manifest, "kind": "FineTuneJob", "spec": manifest["spec"]["template"]}
        name = manifest["metadata"]["name"]
        job = cpu_sized(manifest, tiny_model, tmp_path / "data" / name, earlier=frozenset(runs))
        resized = tiny.write_manifest(tmp_path / f"resized-{name}.yaml", job)
        checked = validate(resized)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        result = finetune_run(job)
        assert result.returncode == 0, result.output[-5000:]
        summary = result.summary()
        spec = manifest["spec"]
        assert (summary["task"], summary["method"], summary["steps"]) == (
            spec["task"]["type"],
            spec["method"]["type"],
            4,
        ), json.dumps(summary)[:2000]
        assert summary["artifacts"], summary
        if len(manifests) > 1:
            # Where `finetune run` would have put it (runs/<name>, beside the later runs): the fixture's
            # work directories are run-<name>, and ftj://NAME looks for <workdir>/../NAME.
            (tmp_path / name).symlink_to(result.workdir, target_is_directory=True)
        runs[name] = result
    takers = {
        d["metadata"]["name"]: d["spec"]["model"]["uri"].removeprefix("ftj://")
        for d in manifests
        if d["spec"].get("model", {}).get("uri", "").startswith("ftj://")
    }
    assert len(manifests) == 1 or takers, "a pipeline example whose jobs take no model from each other"
    for name, earlier in takers.items():
        result = runs[name]
        # Trained from the earlier run's merged model, as the operator resolves ftj:// (URI and sha256).
        artifacts = runs[earlier].summary()["artifacts"]
        merged = next(a for a in artifacts if a["kind"] in MODEL_ARTIFACT_KINDS)
        config = load_trainer_config(result.workdir / "trainer-config.json")
        assert config.spec.model.uri == merged["uri"], config.spec.model
        assert config.model_digests == {merged["uri"]: merged["sha256"]}, config.model_digests
        assert result.summary()["provenance"]["model"]["uri"] == merged["uri"], result.summary()["provenance"]
