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
        "need spec.task.type sft or pretrain",
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
        "dpo-exo-without-smoothing",
        {"spec.task": {"type": "dpo", "dpo": {"lossType": "exoPair"}}, "spec.data.format": "preference"},
        "spec.task.dpo.labelSmoothing",
        "above 0",
    ),
    (
        "dpo-precomputed-on-two-nodes",
        {
            "spec.task": {"type": "dpo", "dpo": {"precomputeReferenceLogProbs": True}},
            "spec.data.format": "preference",
            "spec.distributed": {"nodes": 2},
        },
        "spec.task.dpo.precomputeReferenceLogProbs",
        "one node only",
    ),
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
        "https://",
    ),
    (
        "credentials-of-two-stores",
        {"spec.checkpoint": {"credentials": {"name": "c", "accessKeyIdKey": "id", "connectionStringKey": "conn"}}},
        "spec.checkpoint.credentials",
        "names the keys of one store",
    ),
    (
        "gcs-credentials-without-their-key",
        {"spec.checkpoint": {"uri": "gs://ckpt", "credentials": {"name": "c"}}},
        "spec.checkpoint.credentials.serviceAccountKeyKey",
        "is required with credentials for a gs:// uri",
    ),
    (
        "azure-credentials-without-their-key",
        {"spec.checkpoint": {"uri": "az://ckpt", "credentials": {"name": "c", "accessKeyIdKey": "id"}}},
        "spec.checkpoint.credentials.connectionStringKey",
        "is required with credentials for an az:// uri",
    ),
    (
        "gcs-key-for-s3",
        {"spec.checkpoint": {"uri": "s3://ckpt", "credentials": {"name": "c", "serviceAccountKeyKey": "key.json"}}},
        "spec.checkpoint.credentials",
        "of an s3:// uri are an access key",
    ),
    (
        "endpoint-for-azure",
        {"spec.checkpoint": {"uri": "az://ckpt", "endpointUrl": "http://azurite:10000/devstoreaccount1"}},
        "spec.checkpoint.endpointUrl",
        "the connection string",
    ),
    (
        "region-for-gcs",
        {"spec.checkpoint": {"uri": "gs://ckpt", "region": "europe-west4"}},
        "spec.checkpoint.region",
        "is for S3 stores",
    ),
    ("malformed-quantity", {"spec.resources.memory": "lots"}, "spec.resources.memory", "quantity"),
    (
        "negative-nodes",
        {"spec.distributed.nodes": -2},
        "spec.distributed.nodes",
        "greater than or equal to 1",
    ),
    ("negative-backoff", {"spec.runPolicy.backoffLimit": -1}, "spec.runPolicy.backoffLimit", "greater"),
    (
        "divergence-rollback-without-checkpoint-uri",
        {"spec.training.onDivergence": "rollback"},
        "spec.training.onDivergence",
        "needs spec.checkpoint.uri",
    ),
    (
        "out-of-range-loss-factor",
        {"spec.training.divergence": {"lossFactor": 1.0}},
        "spec.training.divergence.lossFactor",
        "greater",
    ),
    ("negative-gpus", {"spec.resources.gpusPerNode": -1}, "spec.resources.gpusPerNode", "greater"),
    ("oversized-name", {"metadata.name": "a" * 51}, "metadata.name", "50"),
    ("bad-name", {"metadata.name": "Demo_Job"}, "metadata.name", "DNS label"),
    (
        "oversized-system-prompt",
        {"spec.data.format": "chat", "spec.data.systemPrompt": "x" * 65537},
        "spec.data.systemPrompt",
        "65536",
    ),
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
    (
        "rl-ppo-params-under-grpo",
        {"spec.task": {"type": "rl", "rl": {"rewardModel": "org/rm", "ppo": {"epochs": 2}}}},
        "spec.task.rl.ppo",
        "only used by spec.task.rl.algorithm ppo",
    ),
    (
        "rl-ppo-under-zero3",
        {
            "spec.task": {"type": "rl", "rl": {"algorithm": "ppo", "rewardModel": "org/rm"}},
            "spec.distributed.deepspeed": {"zeroStage": 3},
        },
        "spec.task.rl.algorithm",
        "cannot be combined with spec.distributed.deepspeed.zeroStage 3",
    ),
    (
        "rl-ppo-zero-epochs",
        {"spec.task": {"type": "rl", "rl": {"algorithm": "ppo", "rewardModel": "org/rm", "ppo": {"epochs": 0}}}},
        "spec.task.rl.ppo.epochs",
        "greater than or equal to 1",
    ),
    (
        "rl-without-rewards",
        {"spec.task": {"type": "rl", "rl": {"algorithm": "rloo"}}},
        "spec.task.rl.rewards",
        "needs a rewardModel or at least one of rewards",
    ),
    (
        "rl-batch-not-whole-groups",
        {"spec.task": {"type": "rl", "rl": {"numGenerations": 3, "rewards": [{"type": "contains"}]}}},
        "spec.training.perDeviceBatchSize",
        "multiple of spec.task.rl.numGenerations",
    ),
    (
        "rl-reward-zero-weight",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "exactMatch", "weight": 0}]}}},
        "spec.task.rl.rewards[0].weight",
        "must not be 0",
    ),
    (
        "rl-regex-without-pattern",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "regex"}]}}},
        "spec.task.rl.rewards[0].pattern",
        "required for type regex",
    ),
    (
        "rl-pattern-of-another-type",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "contains", "pattern": "red"}]}}},
        "spec.task.rl.rewards[0].pattern",
        "only used by it",
    ),
    (
        # A back-reference: Python's re reads it, RE2 refuses it.
        "rl-pattern-outside-the-shared-subset",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "regex", "pattern": "(a)\\1"}]}}},
        "spec.task.rl.rewards[0].pattern",
        "subset Python and RE2 read alike",
    ),
    (
        "rl-length-without-bounds",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "length"}]}}},
        "spec.task.rl.rewards[0].type",
        "needs minTokens or maxTokens",
    ),
    (
        "rl-length-bounds-for-another-type",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "jsonValid", "maxTokens": 9}]}}},
        "spec.task.rl.rewards[0].type",
        "which only it uses",
    ),
    (
        "rl-length-bounds-reversed",
        {"spec.task": {"type": "rl", "rl": {"rewards": [{"type": "length", "minTokens": 9, "maxTokens": 3}]}}},
        "spec.task.rl.rewards[0].minTokens",
        "must not exceed maxTokens",
    ),
    ("params-for-other-task", {"spec.task.dpo": {"beta": 0.2}}, "spec.task.dpo", "only allowed"),
    (
        "adalora-target-above-init",
        {"spec.method.type": "adalora", "spec.method.adalora": {"initR": 4, "targetR": 8}},
        "spec.method.adalora.targetR",
        "initR",
    ),
    (
        "adalora-target-equals-init",
        {"spec.method.type": "adalora", "spec.method.adalora": {"initR": 8, "targetR": 8}},
        "spec.method.adalora.targetR",
        "below initR",
    ),
    (
        "ia3-feedforward-outside-targets",
        {
            "spec.method.type": "ia3",
            "spec.method.ia3": {"targetModules": ["q_proj"], "feedforwardModules": ["down_proj"]},
        },
        "spec.method.ia3.feedforwardModules",
        "among spec.method.ia3.targetModules",
    ),
    (
        "ia3-feedforward-without-targets",
        {"spec.method.type": "ia3", "spec.method.ia3": {"feedforwardModules": ["down_proj"]}},
        "spec.method.ia3.feedforwardModules",
        "set both",
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
    (
        "test-hook-env-name",
        {"spec.resources.env": [{"name": "FINETUNE_TEST_NONFINITE_LOSS_AT_STEP", "value": "3"}]},
        "spec.resources.env[0].name",
        "reserved for tests",
    ),
    ("wrong-api-version", {"apiVersion": "finetune.io/v1"}, "apiVersion", "v1alpha1"),
    # Strict types, as the CRD's structural schema: no lax coercion of quoted values.
    ("quoted-int", {"spec.training.maxSteps": "100"}, "spec.training.maxSteps", "without quotes"),
    ("quoted-number", {"spec.training.learningRate": "0.001"}, "spec.training.learningRate", "without quotes"),
    ("quoted-bool", {"spec.data.packing": "true"}, "spec.data.packing", "without quotes"),
    (
        "quoted-bool-in-list-item",
        {"spec.resources.env": [{"name": "A", "value": True}]},
        "spec.resources.env[0].value",
        "quote",
    ),
    ("fraction-for-int", {"spec.training.maxSteps": 100.5}, "spec.training.maxSteps", "integer"),
    (
        "int-beyond-int64",
        {"spec.runPolicy.activeDeadlineSeconds": 2**63},
        "spec.runPolicy.activeDeadlineSeconds",
        "integer",
    ),
    ("status-unknown-field", {"status": {"phase": "Running", "phse": "x"}}, "status.phse", "did you mean phase"),
    ("finalizer-invalid", {"metadata.finalizers": ["not a finalizer!"]}, "metadata.finalizers", "finalizer"),
    ("bool-for-int", {"spec.distributed.nodes": True}, "spec.distributed.nodes", "integer"),
    ("bool-for-number", {"spec.training.learningRate": True}, "spec.training.learningRate", "number"),
    ("number-for-string", {"spec.model.revision": 5}, "spec.model.revision", "quote"),
    ("number-for-enum", {"spec.data.format": 1}, "spec.data.format", "promptCompletion"),
    ("decimal-quantity", {"spec.resources.cpu": 0.5}, "spec.resources.cpu", '"0.5"'),
    ("quoted-procs-per-node", {"spec.distributed.procsPerNode": "2"}, "spec.distributed.procsPerNode", "auto"),
    # camelCase only: the Python names of the fields are not part of the API.
    (
        "snake-case-field",
        {"spec.training.max_steps": 100, "spec.training.maxSteps": _DELETE},
        "spec.training.max_steps",
        "camelCase",
    ),
    ("snake-case-section", {"spec.run_policy": {"backoffLimit": 1}}, "spec.run_policy", "runPolicy"),
    ("misspelt-field", {"spec.training.learningrate": 0.1}, "spec.training.learningrate", "learningRate"),
    # metadata, as the API server checks it.
    ("metadata-unknown-key", {"metadata.lables": {"app": "demo"}}, "metadata.lables", "did you mean labels"),
    ("label-key-invalid", {"metadata.labels": {"my app": "x"}}, "metadata.labels", "'my app' is not a valid label key"),
    ("label-key-prefix-invalid", {"metadata.labels": {"Example.com/app": "x"}}, "metadata.labels", "label key"),
    ("label-key-name-too-long", {"metadata.labels": {"a" * 64: "x"}}, "metadata.labels", "label key"),
    ("label-value-invalid", {"metadata.labels": {"app": "not ok!"}}, "metadata.labels", "label value"),
    ("label-value-too-long", {"metadata.labels": {"app": "a" * 64}}, "metadata.labels", "label value"),
    ("label-value-not-a-string", {"metadata.labels": {"replicas": 3}}, "metadata.labels", "string"),
    ("annotation-key-invalid", {"metadata.annotations": {"-note": "x"}}, "metadata.annotations", "annotation key"),
    ("metadata-name-missing", {"metadata.name": _DELETE}, "metadata.name", "required"),
    ("bad-namespace", {"metadata.namespace": "ML_Team"}, "metadata.namespace", "DNS label"),
    # apiVersion and kind are required, never defaulted.
    ("missing-api-version", {"apiVersion": _DELETE}, "apiVersion", "required"),
    ("missing-kind", {"kind": _DELETE}, "kind", "required"),
    ("near-miss-kind", {"kind": "FinetuneJob"}, "kind", "FineTuneJob"),
    ("plural-kind", {"kind": "FineTuneJobs"}, "kind", "FineTuneJob"),
    # A null field is absent (the API server prunes it): a required one is missing.
    ("null-required-field", {"spec.model": None}, "spec.model", "required"),
    # Pod-level rules the API server applies only when the Job is created: checked at admission.
    ("negative-quantity", {"spec.resources.memory": "-1Gi"}, "spec.resources.memory", "positive"),
    ("zero-quantity", {"spec.resources.cpu": 0}, "spec.resources.cpu", "positive"),
    ("negative-int-quantity", {"spec.resources.cpu": -2}, "spec.resources.cpu", "positive"),
    ("nonsense-quantity", {"spec.resources.sharedMemory": "1.2.3Gi"}, "spec.resources.sharedMemory", "quantity"),
    ("gpu-memory-zero", {"spec.resources.gpuMemory": 0}, "spec.resources.gpuMemory", "positive"),
    ("quantity-unit-typo", {"spec.resources.memory": "16GB"}, "spec.resources.memory", "16Gi"),
    (
        "toleration-exists-with-value",
        {"spec.resources.tolerations": [{"key": "gpu", "operator": "Exists", "value": "true"}]},
        "spec.resources.tolerations[0].value",
        "empty when operator is Exists",
    ),
    (
        "toleration-no-key-equal",
        {"spec.resources.tolerations": [{"value": "x", "effect": "NoSchedule"}]},
        "spec.resources.tolerations[0].operator",
        "Exists",
    ),
    (
        "toleration-seconds-without-noexecute",
        {
            "spec.resources.tolerations": [
                {"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}
            ]
        },
        "spec.resources.tolerations[0].tolerationSeconds",
        "NoExecute",
    ),
    (
        "toleration-bad-key",
        {"spec.resources.tolerations": [{"key": "bad key", "operator": "Exists"}]},
        "spec.resources.tolerations[0].key",
        "taint key",
    ),
    (
        "toleration-bad-value",
        {"spec.resources.tolerations": [{"key": "k", "value": "a b"}]},
        "spec.resources.tolerations[0].value",
        "label value",
    ),
    (
        "node-selector-bad-key",
        {"spec.resources.nodeSelector": {"gpu type": "h100"}},
        "spec.resources.nodeSelector",
        "label keys",
    ),
    (
        "node-selector-bad-value",
        {"spec.resources.nodeSelector": {"gpu": "H100 80GB"}},
        "spec.resources.nodeSelector",
        "label values",
    ),
    (
        "pod-label-bad-value",
        {"spec.resources.podLabels": {"team": "ml team"}},
        "spec.resources.podLabels",
        "label values",
    ),
    ("pod-label-bad-key", {"spec.resources.podLabels": {"-team": "ml"}}, "spec.resources.podLabels", "label keys"),
    (
        "pod-annotation-bad-key",
        {"spec.resources.podAnnotations": {"log shipper": "on"}},
        "spec.resources.podAnnotations",
        "annotation keys",
    ),
    (
        "gpu-resource-without-domain",
        {"spec.resources.gpuResourceName": "gpu"},
        "spec.resources.gpuResourceName",
        "nvidia.com/gpu",
    ),
    # Combinations the trainer or the pods could only refuse later.
    (
        "cuda-optimizer-without-gpus",
        {"spec.resources.gpusPerNode": 0, "spec.training.optimizer": "pagedAdamw8bit"},
        "spec.training.optimizer",
        "CUDA",
    ),
    (
        "more-procs-than-gpus",
        {"spec.resources.gpusPerNode": 2, "spec.distributed.procsPerNode": 4},
        "spec.distributed.procsPerNode",
        "gpusPerNode",
    ),
    (
        "flash-attention-without-gpus",
        {"spec.resources.gpusPerNode": 0, "spec.model.attention": "flash_attention_2"},
        "spec.model.attention",
        "CUDA",
    ),
    (
        "fp16-without-gpus",
        {"spec.resources.gpusPerNode": 0, "spec.training.precision": "fp16"},
        "spec.training.precision",
        "CUDA",
    ),
    (
        "system-prompt-outside-chat",
        {"spec.data.systemPrompt": "Answer briefly."},
        "spec.data.systemPrompt",
        "spec.data.format chat",
    ),
    (
        "completion-only-loss-for-text",
        {"spec.data.format": "text", "spec.data.completionOnlyLoss": False},
        "spec.data.completionOnlyLoss",
        "promptCompletion and chat",
    ),
    (
        "chat-template-outside-chat",
        {"spec.model.chatTemplate": "{{ messages }}"},
        "spec.model.chatTemplate",
        "spec.data.format chat",
    ),
    (
        "revision-of-a-path",
        {"spec.model.uri": "s3://bucket/model", "spec.model.revision": "v2"},
        "spec.model.revision",
        "only used for Hub ids",
    ),
    (
        "metrics-ports-past-65535",
        {"spec.metrics.port": 65535, "spec.resources.gpusPerNode": 2},
        "spec.metrics.port",
        "65535",
    ),
    (
        "adalora-schedule-longer-than-training",
        {"spec.method.type": "adalora", "spec.method.adalora": {"tinit": 60, "tfinal": 40}},
        "spec.method.adalora.tfinal",
        "maxSteps",
    ),
    (
        "empty-prompt-init-text",
        {"spec.method.type": "prompt", "spec.method.prompt": {"initText": ""}},
        "spec.method.prompt.initText",
        "at least 1",
    ),
    (
        "rendezvous-port-is-a-metrics-port",
        {"spec.distributed.rendezvousPort": 9411, "spec.resources.gpusPerNode": 2},
        "spec.distributed.rendezvousPort",
        "metrics ports",
    ),
    # From the task table (api/tasks.py): formats, methods, metrics, and tasks without a recipe yet.
    (
        "sft-with-preference-data",
        {"spec.data.format": "preference"},
        "spec.data.format",
        "promptCompletion, chat or text",
    ),
    ("pretrain-with-chat-data", {"spec.task.type": "pretrain", "spec.data.format": "chat"}, "spec.data.format", "text"),
    (
        "resampling-multi-label",
        {
            "spec.task": {
                "type": "classification",
                "classification": {"numLabels": 3, "multiLabel": True, "resampling": "oversample"},
            },
            "spec.data.format": "classification",
        },
        "spec.task.classification.resampling",
        "single-label",
    ),
    (
        "qa-doc-stride-not-below-window",
        {"spec.task": {"type": "qa", "qa": {"docStride": 64}}, "spec.data.format": "qa", "spec.data.maxSeqLength": 64},
        "spec.task.qa.docStride",
        "must be below spec.data.maxSeqLength",
    ),
    (
        "qa-default-doc-stride-not-below-window",
        {"spec.task.type": "qa", "spec.data.format": "qa", "spec.data.maxSeqLength": 128},
        "spec.task.qa.docStride",
        "must be below spec.data.maxSeqLength",
    ),
    (
        "general-eval-without-lm-head",
        {
            "spec.task.type": "qa",
            "spec.data.format": "qa",
            "spec.training.forgetting": {"generalEval": {"uri": "s3://bucket/general.jsonl"}},
        },
        "spec.training.forgetting.generalEval",
        "only supported for spec.task.type sft, pretrain",
    ),
    (
        "distill-4bit-teacher-zero3",
        {
            "spec.task": {"type": "distill", "distill": {"teacher": "org/teacher", "teacherQuantization": "nf4"}},
            "spec.distributed.deepspeed": {"zeroStage": 3},
        },
        "spec.task.distill.teacherQuantization",
        "cannot be combined with spec.distributed.deepspeed.zeroStage 3",
    ),
    (
        "distill-early-stopping-metric-of-another-task",
        {
            "spec.task": {"type": "distill", "distill": {"teacher": "org/teacher"}},
            "spec.training.evaluation": {"everySteps": 10},
            "spec.training.earlyStopping": {"metric": "accuracy"},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.earlyStopping.metric",
        "distill produces: evalLoss, perplexity or agreement",
    ),
    (
        "eval-metric-the-task-does-not-produce",
        {"spec.training.evaluation": {"everySteps": 10, "metrics": ["loss", "accuracy"]}, "spec.data.evalSplit": 0.1},
        "spec.training.evaluation.metrics",
        "sft produces: loss, perplexity, bleu and rouge",
    ),
    (
        # Once crashed the trainer with a KeyError at its first evaluation (exit 1, retried).
        "early-stopping-metric-the-task-does-not-produce",
        {
            "spec.training.evaluation": {"everySteps": 10},
            "spec.training.earlyStopping": {"metric": "accuracy", "mode": "max"},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.earlyStopping.metric",
        "evalLoss, perplexity, bleu or rouge",
    ),
    (
        "early-stopping-metric-not-evaluated",
        {
            "spec.training.evaluation": {"everySteps": 10, "metrics": ["loss"]},
            "spec.training.earlyStopping": {"metric": "perplexity"},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.earlyStopping.metric",
        "one of spec.training.evaluation.metrics",
    ),
    (
        "bleu-on-text-format",
        {
            "spec.data.format": "text",
            "spec.training.evaluation": {"metrics": ["loss", "bleu"]},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.evaluation.metrics",
        "need spec.data.format promptCompletion or chat",
    ),
    (
        "rouge-without-eval-data",
        {"spec.training.evaluation": {"metrics": ["rouge"]}},
        "spec.training.evaluation.metrics",
        "need eval data to generate for",
    ),
    (
        "generation-without-a-generation-metric",
        {
            "spec.training.evaluation": {"metrics": ["loss"], "generation": {"maxNewTokens": 16}},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.evaluation.generation",
        "must name bleu or rouge",
    ),
    (
        "out-of-range-generation-max-new-tokens",
        {
            "spec.training.evaluation": {"metrics": ["bleu"], "generation": {"maxNewTokens": 0}},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.evaluation.generation.maxNewTokens",
        "1",
    ),
    (
        "early-stopping-on-rouge-not-asked-for",
        {
            "spec.training.evaluation": {"everySteps": 10},
            "spec.training.earlyStopping": {"metric": "rouge"},
            "spec.data.evalSplit": 0.1,
        },
        "spec.training.earlyStopping.metric",
        "must be listed in spec.training.evaluation.metrics",
    ),
    (
        "forgetting-ewc-for-classification",
        {
            "spec.task": {"type": "classification", "classification": {"numLabels": 3}},
            "spec.data.format": "classification",
            "spec.training.forgetting": {"ewc": {"strength": 100}},
        },
        "spec.training.forgetting.ewc",
        "only supported for spec.task.type sft and pretrain",
    ),
    (
        "forgetting-replay-for-dpo",
        {
            "spec.task.type": "dpo",
            "spec.data.format": "preference",
            "spec.training.forgetting": {"replay": {"source": {"uri": "s3://bucket/general.jsonl"}}},
        },
        "spec.training.forgetting.replay",
        "only supported for spec.task.type sft and pretrain",
    ),
    (
        "forgetting-ewc-with-deepspeed",
        {
            "spec.distributed.deepspeed": {"zeroStage": 2},
            "spec.training.forgetting": {"ewc": {"strength": 100}},
        },
        "spec.training.forgetting.ewc",
        "cannot be combined with spec.distributed.deepspeed",
    ),
    (
        "out-of-range-replay-ratio",
        {"spec.training.forgetting": {"replay": {"source": {"uri": "s3://bucket/general.jsonl"}, "ratio": 1.0}}},
        "spec.training.forgetting.replay.ratio",
        "1",
    ),
    (
        "out-of-range-ewc-strength",
        {"spec.training.forgetting": {"ewc": {"strength": 0}}},
        "spec.training.forgetting.ewc.strength",
        "0",
    ),
    (
        "merged-output-for-prefix",
        {"spec.method.type": "prefix", "spec.output.save": "merged"},
        "spec.output.save",
        "prefix and prompt cannot merge",
    ),
    (
        "both-outputs-for-prompt",
        {"spec.method.type": "prompt", "spec.output.save": "both"},
        "spec.output.save",
        "cannot merge",
    ),
    (
        "lora-rank-under-adalora",
        {"spec.method.type": "adalora", "spec.method.lora": {"r": 8}},
        "spec.method.lora.r",
        "spec.method.adalora.initR",
    ),
    (
        "rslora-under-adalora",
        {"spec.method.type": "adalora", "spec.method.lora": {"useRslora": True}},
        "spec.method.lora.useRslora",
        "not supported by adalora",
    ),
    (
        "dora-under-adalora",
        {"spec.method.type": "adalora", "spec.method.lora": {"useDora": True}},
        "spec.method.lora.useDora",
        "not supported by adalora",
    ),
    (
        "lora-params-under-ia3",
        {"spec.method.type": "ia3", "spec.method.lora": {"r": 8}},
        "spec.method.lora",
        "only allowed when spec.method.type is one of: lora, qlora, adalora",
    ),
    ("unknown-enum-preflight-mode", {"spec.preflight": {"mode": "always"}}, "spec.preflight.mode", "skip"),
    (
        "preflight-resources-with-skip",
        {"spec.preflight": {"mode": "skip", "resources": {"cpu": 2}}},
        "spec.preflight.resources",
        "not with spec.preflight.mode skip",
    ),
    (
        "preflight-deadline-with-skip",
        {"spec.preflight": {"mode": "skip", "activeDeadlineSeconds": 600}},
        "spec.preflight.activeDeadlineSeconds",
        "not with spec.preflight.mode skip",
    ),
    (
        "preflight-allow-will-not-fit-with-skip",
        {"spec.preflight": {"mode": "skip", "allowWillNotFit": True}, "spec.resources.gpuMemory": "80Gi"},
        "spec.preflight.allowWillNotFit",
        "not with spec.preflight.mode skip",
    ),
    (
        "preflight-allow-will-not-fit-without-gpu-memory",
        {"spec.preflight": {"allowWillNotFit": True}},
        "spec.preflight.allowWillNotFit",
        "spec.resources.gpuMemory, or an nvidia.com/gpu.memory node selector",
    ),
    ("preflight-cpu-zero", {"spec.preflight": {"resources": {"cpu": 0}}}, "spec.preflight.resources.cpu", "positive"),
    (
        "preflight-deadline-too-short",
        {"spec.preflight": {"activeDeadlineSeconds": 10}},
        "spec.preflight.activeDeadlineSeconds",
        "60",
    ),
    (
        "augmentation-of-qa",
        {"spec.task.type": "qa", "spec.data.format": "qa", "spec.data.augmentation": {"randomSwap": {}}},
        "spec.data.augmentation",
        "spans",
    ),
    (
        "augmentation-of-preference",
        {"spec.task.type": "dpo", "spec.data.format": "preference", "spec.data.augmentation": {"randomSwap": {}}},
        "spec.data.augmentation",
        "preference",
    ),
    ("augmentation-of-nothing", {"spec.data.augmentation": {}}, "spec.data.augmentation", "at least one of"),
    (
        "augmentation-alpha-above-half",
        {"spec.data.augmentation": {"randomDeletion": {"alpha": 0.9}}},
        "spec.data.augmentation.randomDeletion.alpha",
        "0.5",
    ),
    (
        "back-translation-from-a-job",
        {"spec.data.augmentation": {"backTranslation": {"forward": "ftj://other", "backward": "org/back"}}},
        "spec.data.augmentation.backTranslation.forward",
        "ftj://",
    ),
    (
        "mine-tokens-one-piece",
        {"spec.model.mineTokens": {"minPieces": 1}},
        "spec.model.mineTokens.minPieces",
        "2",
    ),
    (
        "mine-tokens-too-many",
        {"spec.model.mineTokens": {"maxTokens": 5000}},
        "spec.model.mineTokens.maxTokens",
        "1024",
    ),
]

#: Manifests both the API server and `finetune validate` accept (edges of the rules above).
VALID: list[tuple[str, dict[str, Any]]] = [
    ("null-is-absent", {"spec.training.learningRate": None, "spec.model.revision": None}),
    ("integer-for-number", {"spec.training.learningRate": 1, "spec.method.lora": {"alpha": 16}}),
    ("integral-float-for-integer", {"spec.training.maxSteps": 100.0, "spec.resources.cpu": 2.0}),
    ("int64-max", {"spec.runPolicy.activeDeadlineSeconds": 2**63 - 1}),
    (
        "divergence-rollback",
        {
            "spec.training.onDivergence": "rollback",
            "spec.training.divergence": {"lossFactor": 4, "consecutiveLogs": 2, "learningRateScale": 1},
            "spec.checkpoint": {"uri": "s3://ckpt"},
        },
    ),
    # The API server drops a created object's status: its values are not checked, only its fields.
    ("status-values-are-not-checked", {"status": {"phase": "Bogus", "restarts": -1}}),
    (
        "metadata-as-kubectl-get-shows-it",
        {
            "metadata.generateName": "demo-",
            "metadata.finalizers": ["example.com/cleanup", "orphan"],
            "metadata.ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "1"}],
        },
    ),
    (
        "quantity-forms",
        {"spec.resources.cpu": "500m", "spec.resources.memory": "1.5Gi", "spec.resources.sharedMemory": "1e9"},
    ),
    ("quantity-integer", {"spec.resources.cpu": 8}),
    ("toleration-exists-without-key", {"spec.resources.tolerations": [{"operator": "Exists"}]}),
    (
        "tolerations-as-kubernetes-allows",
        {
            "spec.resources.tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
                {"key": "empty-value", "operator": "Equal", "value": ""},
            ]
        },
    ),
    (
        "labels-and-annotations",
        {
            "metadata.labels": {"app.kubernetes.io/name": "demo", "empty": "", "A_b.c-D": "x.Y_z-1"},
            "metadata.annotations": {"example.com/note": "any text: at all, {with} [symbols]!"},
        },
    ),
    (
        "pod-maps",
        {
            "spec.resources.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "spec.resources.podLabels": {"team": "ml"},
            "spec.resources.podAnnotations": {"sidecar.istio.io/inject": "false"},
        },
    ),
    (
        "gcs-key-and-endpoint",
        {
            "spec.checkpoint": {
                "uri": "gs://ckpt",
                "endpointUrl": "http://gcs:4443",
                "credentials": {"name": "c", "serviceAccountKeyKey": "key.json"},
            }
        },
    ),
    (
        "azure-connection-string",
        {"spec.checkpoint": {"uri": "az://ckpt", "credentials": {"name": "c", "connectionStringKey": "conn"}}},
    ),
    # Without a checkpoint uri the Secret serves the model, data and output URIs: any one store.
    (
        "azure-credentials-without-checkpoints",
        {"spec.checkpoint": {"credentials": {"name": "c", "connectionStringKey": "conn"}}},
    ),
    (
        "s3-session-token",
        {
            "spec.checkpoint": {
                "uri": "s3://ckpt",
                "region": "eu-west-1",
                "credentials": {"name": "c", "sessionTokenKey": "t"},
            }
        },
    ),
    ("cpu-processes", {"spec.resources.gpusPerNode": 0, "spec.distributed.procsPerNode": 4}),
    ("one-process-per-gpu", {"spec.resources.gpusPerNode": 8, "spec.distributed.procsPerNode": 8}),
    ("cuda-optimizer-with-gpus", {"spec.training.optimizer": "adamw8bit"}),
    ("fp16-with-gpus", {"spec.training.precision": "fp16"}),
    ("system-prompt-for-chat", {"spec.data.format": "chat", "spec.data.systemPrompt": "Answer briefly."}),
    (
        "augmentation-of-chat",
        {
            "spec.data.format": "chat",
            "spec.data.augmentation": {
                "synonymReplacement": {"alpha": 0.1, "copies": 2},
                "backTranslation": {"forward": "Helsinki-NLP/opus-mt-en-de", "backward": "s3://models/de-en"},
            },
        },
    ),
    ("mine-tokens-from-a-corpus", {"spec.model.mineTokens": {"corpus": {"uri": "s3://bucket/corpus.jsonl"}}}),
    ("revision-of-a-hub-id", {"spec.model.revision": "v2"}),
    ("completion-only-loss-for-chat", {"spec.data.format": "chat", "spec.data.completionOnlyLoss": False}),
    ("chat-template-for-chat", {"spec.data.format": "chat", "spec.model.chatTemplate": "{{ messages }}"}),
    ("metrics-ports-up-to-65535", {"spec.metrics.port": 65534, "spec.resources.gpusPerNode": 2}),
    ("rendezvous-port-when-metrics-off", {"spec.distributed.rendezvousPort": 9410, "spec.metrics.enabled": False}),
    # The task table's edges.
    ("pretrain-on-packed-text", {"spec.task.type": "pretrain", "spec.data.format": "text", "spec.data.packing": True}),
    ("sft-on-chat", {"spec.data.format": "chat"}),
    (
        "eval-loss-only-early-stopping-on-loss",
        {
            "spec.training.evaluation": {"everySteps": 10, "metrics": ["loss"]},
            "spec.training.earlyStopping": {"metric": "evalLoss"},
            "spec.data.evalSplit": 0.1,
        },
    ),
    (
        "early-stopping-on-rouge-of-chat-generations",
        {
            "spec.data.format": "chat",
            "spec.training.evaluation": {
                "everySteps": 10,
                "metrics": ["loss", "bleu", "rouge"],
                "generation": {"maxNewTokens": 32, "samples": 64},
            },
            "spec.training.earlyStopping": {"metric": "rouge"},
            "spec.data.evalSplit": 0.1,
        },
    ),
    (
        "early-stopping-on-perplexity",
        {
            "spec.training.evaluation": {"everySteps": 10},
            "spec.training.earlyStopping": {"metric": "perplexity"},
            "spec.data.evalSplit": 0.1,
        },
    ),
    ("forgetting-general-eval", {"spec.training.forgetting": {"generalEval": {"uri": "s3://bucket/general.jsonl"}}}),
    (
        "forgetting-ewc-and-replay",
        {
            "spec.training.forgetting": {
                "ewc": {"strength": 100, "fisherSamples": 64, "fisherData": {"uri": "s3://bucket/fisher.jsonl"}},
                "replay": {"source": {"uri": "s3://bucket/general.jsonl"}, "ratio": 0.25},
                "generalEval": {"uri": "s3://bucket/held-out.jsonl"},
            }
        },
    ),
    (
        "forgetting-replay-with-deepspeed-pretrain",
        {
            "spec.task.type": "pretrain",
            "spec.data.format": "text",
            "spec.distributed.deepspeed": {"zeroStage": 3},
            "spec.training.forgetting": {"replay": {"source": {"uri": "s3://bucket/general.jsonl"}}},
        },
    ),
    ("merged-output-for-lora", {"spec.output.save": "both"}),
    ("merged-output-for-qlora", {"spec.method.type": "qlora", "spec.output.save": "merged"}),
    ("merged-output-for-ia3", {"spec.method.type": "ia3", "spec.output.save": "merged"}),
    (
        "ia3-feedforward-among-targets",
        {
            "spec.method.type": "ia3",
            "spec.method.ia3": {"targetModules": ["q_proj", "up_proj"], "feedforwardModules": ["up_proj"]},
        },
    ),
    ("merged-output-for-full", {"spec.method.type": "full", "spec.output.save": "merged"}),
    ("preflight-skip", {"spec.preflight": {"mode": "skip"}}),
    (
        "preflight-sized",
        {"spec.preflight": {"resources": {"cpu": "500m", "memory": 4000000000}, "activeDeadlineSeconds": 600}},
    ),
    (
        "preflight-will-not-fit-allowed",
        {"spec.preflight": {"allowWillNotFit": True}, "spec.resources.gpuMemory": "80Gi"},
    ),
    (
        "preflight-will-not-fit-allowed-by-gpu-memory-label",
        {
            "spec.preflight": {"allowWillNotFit": True},
            "spec.resources.nodeSelector": {"nvidia.com/gpu.memory": "81559"},
        },
    ),
    ("adapter-output-for-prefix", {"spec.method.type": "prefix", "spec.output.save": "adapter"}),
    ("lora-rank", {"spec.method.lora": {"r": 8, "useRslora": True, "useDora": True}}),
    (
        "lora-fields-adalora-uses",
        {
            "spec.method.type": "adalora",
            "spec.method.adalora": {"initR": 8, "targetR": 4},
            "spec.method.lora": {
                "alpha": 16,
                "dropout": 0.1,
                "targetModules": ["q_proj", "v_proj"],
                "bias": "lora_only",
                "modulesToSave": ["lm_head"],
            },
            "spec.output.save": "merged",
        },
    ),
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


def test_every_class_of_mistake_is_in_the_table() -> None:
    ids = {case[0] for case in INVALID}
    for prefix in (
        "quoted-",
        "snake-case-",
        "metadata-",
        "label-",
        "annotation-",
        "missing-",
        "near-miss-kind",
        "negative-quantity",
        "toleration-",
        "cuda-optimizer-",
        "more-procs-than-gpus",
        "null-",
    ):
        assert any(i.startswith(prefix) for i in ids), prefix


@pytest.mark.parametrize("changes", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_edge_cases_are_accepted(changes: dict[str, Any]) -> None:
    validate_object(mutate(changes))


@pytest.mark.parametrize(("changes", "path", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_one_message_per_problem(changes: dict[str, Any], path: str, text: str) -> None:
    """No field gets two messages (pydantic reports one per union branch), and none shows a regex."""
    with pytest.raises(InvalidSpec) as info:
        validate_object(mutate(changes))
    paths = [e.path for e in info.value.errors]
    assert len(paths) == len(set(paths)), paths
    for error in info.value.errors:
        assert " or Input should" not in error.message and "should match pattern" not in error.message, error
        assert "^" not in error.message and "[a-z" not in error.message, error
        assert "{" not in error.message, error  # an unfilled message template


def test_every_pattern_has_words_for_people() -> None:
    from finetune_operator.api.v1alpha1 import PATTERN_HINTS

    def patterns(node: Any) -> set[str]:
        if isinstance(node, dict):
            found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
            return found.union(*(patterns(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(patterns(v) for v in node))
        return set()

    used = patterns(FineTuneJob.model_json_schema())
    assert len(used) >= 15
    assert not used - set(PATTERN_HINTS), used - set(PATTERN_HINTS)


def test_snake_case_names_still_build_models_in_python() -> None:
    from finetune_operator.api.v1alpha1 import TrainingSpec

    assert TrainingSpec(max_steps=3).max_steps == 3  # code may; manifests may not (snake-case-field)


def test_base_manifest_is_valid_and_gets_defaults() -> None:
    job = validate_object(base_manifest())
    assert isinstance(job, FineTuneJob)
    spec = job.spec
    assert spec.method.type == "lora" and spec.method.lora is None  # LoRAParams() defaults apply: rank 16
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
    changes = {"spec.distributed.procsPerNode": 4, "spec.resources.gpusPerNode": 4, "spec.method.type": "qlora"}
    job = validate_object(mutate(changes))
    again = validate_object(job.to_manifest())
    assert again == job
