"""The typed FineTuneJob API refuses bad manifests, naming the offending field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from finetune_operator.api.v1alpha1 import FineTuneJob
from finetune_operator.api.validation import InvalidSpec, validate_object

_DELETE = object()


def base_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"uri": "org/model"},
            "data": {"train": {"uri": "s3://bucket/train.jsonl"}},
            "training": {"maxSteps": 100},
        },
    }


def mutate(changes: dict[str, Any]) -> dict[str, Any]:
    manifest = base_manifest()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = manifest
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return manifest


# (id, changes, field path the error must name, text the message must contain)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("wrong-type-int", {"spec.training.maxSteps": "many"}, "spec.training.maxSteps", "integer"),
    ("wrong-type-bool", {"spec.data.packing": "sometimes"}, "spec.data.packing", "boolean"),
    ("wrong-type-object", {"spec.method": "lora"}, "spec.method", ""),
    ("wrong-type-list", {"spec.model.addTokens": "<tool>"}, "spec.model.addTokens", "list"),
    ("out-of-range-lr", {"spec.training.learningRate": 5}, "spec.training.learningRate", "1"),
    (
        "out-of-range-zero-stage",
        {"spec.distributed.deepspeed": {"zeroStage": 4}},
        "spec.distributed.deepspeed.zeroStage",
        "3",
    ),
    ("out-of-range-eval-split", {"spec.data.evalSplit": 0.9}, "spec.data.evalSplit", "0.5"),
    ("out-of-range-dropout", {"spec.method.lora": {"dropout": 1.0}}, "spec.method.lora.dropout", "1"),
    ("unknown-enum-method", {"spec.method.type": "bitfit"}, "spec.method.type", "lora"),
    ("unknown-enum-task", {"spec.task.type": "summarize"}, "spec.task.type", "sft"),
    (
        "unknown-enum-quant",
        {"spec.method.type": "qlora", "spec.method.quantization": {"quantType": "int3"}},
        "spec.method.quantization.quantType",
        "nf4",
    ),
    ("unknown-field", {"spec.training.learningrate": 0.1}, "spec.training.learningrate", "unknown field"),
    ("conflict-epochs-maxsteps", {"spec.training.epochs": 1}, "spec.training.maxSteps", "exactly one"),
    (
        "missing-epochs-and-maxsteps",
        {"spec.training.maxSteps": _DELETE},
        "spec.training.maxSteps",
        "exactly one",
    ),
    (
        "conflict-warmup",
        {"spec.training.warmupSteps": 10, "spec.training.warmupRatio": 0.1},
        "spec.training.warmupRatio",
        "mutually exclusive",
    ),
    (
        "prefix-for-classification",
        {
            "spec.method.type": "prefix",
            "spec.task": {"type": "classification", "classification": {"numLabels": 3}},
            "spec.data.format": "classification",
        },
        "spec.method.type",
        "causal-LM",
    ),
    ("qlora-fp32", {"spec.method.type": "qlora", "spec.model.dtype": "fp32"}, "spec.model.dtype", "qlora"),
    (
        "qlora-zero3",
        {"spec.method.type": "qlora", "spec.distributed.deepspeed": {"zeroStage": 3}},
        "spec.distributed.deepspeed.zeroStage",
        "zeroStage 3",
    ),
    (
        "offload-without-adamw",
        {"spec.training.optimizer": "sgd", "spec.distributed.deepspeed": {"zeroStage": 2, "offloadOptimizer": "cpu"}},
        "spec.distributed.deepspeed.offloadOptimizer",
        "adamw",
    ),
    ("dpo-without-preference", {"spec.task.type": "dpo"}, "spec.data.format", "preference"),
    (
        "reward-without-preference",
        {"spec.task.type": "reward", "spec.data.format": "chat"},
        "spec.data.format",
        "preference",
    ),
    (
        "classification-without-numlabels",
        {"spec.task.type": "classification", "spec.data.format": "classification"},
        "spec.task.type",
        "spec.task.classification is required",
    ),
    (
        "classification-numlabels-missing",
        {"spec.task": {"type": "classification", "classification": {}}, "spec.data.format": "classification"},
        "spec.task.classification.numLabels",
        "required",
    ),
    (
        "class-weights-length",
        {
            "spec.task": {
                "type": "classification",
                "classification": {"numLabels": 3, "classWeights": [1, 2]},
            },
            "spec.data.format": "classification",
        },
        "spec.task.classification.classWeights",
        "numLabels",
    ),
    ("missing-required-model", {"spec.model": _DELETE}, "spec.model", "required"),
    ("missing-required-train", {"spec.data.train": _DELETE}, "spec.data.train", "required"),
    ("malformed-model-uri", {"spec.model.uri": "s3:/bucket/model"}, "spec.model.uri", "s3://"),
    (
        "malformed-checkpoint-uri",
        {"spec.checkpoint.uri": "bucket/checkpoints"},
        "spec.checkpoint.uri",
        "s3://",
    ),
    (
        "malformed-endpoint",
        {"spec.checkpoint.endpointUrl": "minio:9000"},
        "spec.checkpoint.endpointUrl",
        "pattern",
    ),
    ("malformed-quantity", {"spec.resources.memory": "lots"}, "spec.resources.memory", "quantity"),
    (
        "negative-nodes",
        {"spec.distributed.nodes": -2},
        "spec.distributed.nodes",
        "greater than or equal to 1",
    ),
    ("negative-backoff", {"spec.runPolicy.backoffLimit": -1}, "spec.runPolicy.backoffLimit", "greater"),
    ("negative-gpus", {"spec.resources.gpusPerNode": -1}, "spec.resources.gpusPerNode", "greater"),
    ("oversized-name", {"metadata.name": "a" * 51}, "metadata.name", "50"),
    ("bad-name", {"metadata.name": "Demo_Job"}, "metadata.name", "DNS label"),
    ("oversized-system-prompt", {"spec.data.systemPrompt": "x" * 65537}, "spec.data.systemPrompt", "65536"),
    (
        "too-many-added-tokens",
        {"spec.model.addTokens": [f"<t{i}>" for i in range(1025)]},
        "spec.model.addTokens",
        "1024",
    ),
    (
        "procs-per-node-word",
        {"spec.distributed.procsPerNode": "many"},
        "spec.distributed.procsPerNode",
        "auto",
    ),
    ("procs-per-node-zero", {"spec.distributed.procsPerNode": 0}, "spec.distributed.procsPerNode", "auto"),
    (
        "offload-params-needs-zero3",
        {"spec.distributed.deepspeed": {"zeroStage": 2, "offloadParams": "cpu"}},
        "spec.distributed.deepspeed.offloadParams",
        "zeroStage 3",
    ),
    ("freeze-with-lora", {"spec.method.freeze": {"headOnly": True}}, "spec.method.freeze", "full"),
    (
        "freeze-conflict",
        {"spec.method.type": "full", "spec.method.freeze": {"headOnly": True, "lastLayers": 2}},
        "spec.method.freeze.lastLayers",
        "mutually exclusive",
    ),
    (
        "eval-and-split",
        {"spec.data.eval": {"uri": "eval.jsonl"}, "spec.data.evalSplit": 0.1},
        "spec.data.evalSplit",
        "mutually exclusive",
    ),
    (
        "early-stopping-without-eval-steps",
        {"spec.training.earlyStopping": {"patience": 2}},
        "spec.training.earlyStopping",
        "everySteps",
    ),
    (
        "evaluation-without-eval-data",
        {"spec.training.evaluation": {"everySteps": 10}},
        "spec.data.eval",
        "evalSplit",
    ),
    (
        "adapter-output-for-full",
        {"spec.method.type": "full", "spec.output.save": "adapter"},
        "spec.output.save",
        "PEFT",
    ),
    (
        "nccl-without-gpus",
        {"spec.resources.gpusPerNode": 0, "spec.distributed.backend": "nccl"},
        "spec.distributed.backend",
        "gpusPerNode",
    ),
    ("rl-without-params", {"spec.task.type": "rl"}, "spec.task.type", "spec.task.rl is required"),
    (
        "grpo-single-generation",
        {"spec.task": {"type": "rl", "rl": {"rewardModel": "org/rm", "numGenerations": 1}}},
        "spec.task.rl.numGenerations",
        "at least 2",
    ),
    ("params-for-other-task", {"spec.task.dpo": {"beta": 0.2}}, "spec.task.dpo", "only allowed"),
    (
        "adalora-target-above-init",
        {"spec.method.type": "adalora", "spec.method.adalora": {"initR": 4, "targetR": 8}},
        "spec.method.adalora.targetR",
        "initR",
    ),
    (
        "packing-for-dpo",
        {"spec.task.type": "dpo", "spec.data.format": "preference", "spec.data.packing": True},
        "spec.data.packing",
        "packing",
    ),
    (
        "env-value-and-valuefrom",
        {"spec.resources.env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        "spec.resources.env[0].valueFrom",
        "mutually exclusive",
    ),
    (
        "bad-env-name",
        {"spec.resources.env": [{"name": "1 A", "value": "x"}]},
        "spec.resources.env[0].name",
        "environment variable",
    ),
    ("wrong-api-version", {"apiVersion": "finetune.io/v1"}, "apiVersion", "v1alpha1"),
]


def test_table_is_large_and_distinct() -> None:
    assert len(INVALID) >= 25
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("changes", "path", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(changes: dict[str, Any], path: str, text: str) -> None:
    manifest = mutate(changes)
    with pytest.raises(InvalidSpec) as info:
        validate_object(manifest)
    errors = info.value.errors
    named = [e for e in errors if e.path == path]
    assert named, f"no error names {path}; got {[str(e) for e in errors]}"
    assert any(text in e.message for e in named), [str(e) for e in named]


def test_base_manifest_is_valid_and_gets_defaults() -> None:
    job = validate_object(base_manifest())
    assert isinstance(job, FineTuneJob)
    spec = job.spec
    assert spec.method.type == "lora" and spec.method.lora.r == 16
    assert spec.task.type == "sft"
    assert spec.distributed.nodes == 1 and spec.distributed.procs_per_node == "auto"
    assert spec.checkpoint.save_on_preemption is True
    assert spec.model.trust_remote_code is False
    assert spec.resources.shared_memory == "2Gi"


def test_quantity_accepts_numbers_and_strings() -> None:
    job = validate_object(mutate({"spec.resources.cpu": 8, "spec.resources.memory": "64Gi"}))
    assert job.spec.resources.cpu == "8" and job.spec.resources.memory == "64Gi"


def test_every_error_of_a_manifest_is_reported() -> None:
    manifest = mutate({"spec.training.learningRate": -1, "spec.distributed.nodes": 0, "spec.model.dtype": "int4"})
    with pytest.raises(InvalidSpec) as info:
        validate_object(manifest)
    paths = {e.path for e in info.value.errors}
    assert {"spec.training.learningRate", "spec.distributed.nodes", "spec.model.dtype"} <= paths


def test_manifest_round_trips() -> None:
    job = validate_object(mutate({"spec.distributed.procsPerNode": 4, "spec.method.type": "qlora"}))
    again = validate_object(job.to_manifest())
    assert again == job
