"""Hyperparameters reach transformers as the spec says; early stopping keeps and loads the best model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.errors import ConfigError
from finetune_trainer.training_args import deepspeed_config, training_arguments
from runs import RunResult
from tiny import job_manifest, read_metrics


def spec(**training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/m"},
            "data": {"train": {"uri": "t.jsonl"}, "evalSplit": 0.1},
            "training": {"maxSteps": 10, **training},
        }
    )


def test_hyperparameters_map_to_training_arguments(tmp_path: Path) -> None:
    args = training_arguments(
        spec(
            learningRate=1e-4,
            scheduler="linear",
            warmupRatio=0.1,
            perDeviceBatchSize=3,
            gradientAccumulationSteps=4,
            weightDecay=0.01,
            maxGradNorm=0.5,
            seed=5,
            gradientCheckpointing=True,
            evaluation={"everySteps": 5},
            optimizer="adafactor",
        ),
        output_dir=tmp_path,
        base_dir=None,
        has_eval=True,
    )
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (1e-4, "linear", 0.1)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 4)
    assert (args.weight_decay, args.max_grad_norm, args.seed, args.max_steps) == (0.01, 0.5, 5, 10)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert (args.eval_strategy.value, args.eval_steps, args.optim.value) == ("steps", 5, "adafactor")
    constant = training_arguments(
        spec(scheduler="constant", warmupSteps=3), output_dir=tmp_path, base_dir=None, has_eval=False
    )
    assert (constant.lr_scheduler_type.value, constant.warmup_steps, constant.eval_strategy.value) == (
        "constant_with_warmup",
        3,
        "no",
    )


def test_cuda_only_optimizer_is_refused_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pagedAdamw8bit needs CUDA"):
        training_arguments(spec(optimizer="pagedAdamw8bit"), output_dir=tmp_path, base_dir=None, has_eval=False)


def test_deepspeed_config_follows_the_spec() -> None:
    s = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "m"},
            "data": {"train": {"uri": "t"}},
            "training": {"epochs": 1},
            "distributed": {"deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParams": "cpu"}},
        }
    )
    assert s.distributed.deepspeed is not None
    zero = deepspeed_config(s.distributed.deepspeed)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == "auto"
    # DeepSpeed refuses a torch optimizer with ZeRO-Offload: the config names its own AdamW (CPU Adam).
    optimizer = deepspeed_config(s.distributed.deepspeed)["optimizer"]
    assert optimizer == {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    }
    assert "optimizer" not in deepspeed_config(s.distributed.deepspeed.model_copy(update={"offload_optimizer": "none"}))


def test_optimizer_offload_with_another_optimizer_is_refused(tmp_path: Path) -> None:
    s = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "m"},
            "data": {"train": {"uri": "t"}},
            "training": {"epochs": 1},
            "distributed": {"deepspeed": {"zeroStage": 2, "offloadOptimizer": "cpu"}},
        }
    )
    # Admission refuses this combination (a CEL rule, tests/unit/test_api_validation.py); the trainer
    # refuses it too, for an object stored before that rule existed.
    s = s.model_copy(update={"training": s.training.model_copy(update={"optimizer": "sgd"})})
    with pytest.raises(ConfigError, match=r"spec\.distributed\.deepspeed\.offloadOptimizer .*adamw.*not sgd"):
        training_arguments(s, output_dir=tmp_path, base_dir=None, has_eval=False)


def test_early_stopping_loads_the_best_model(
    tiny_model: Path, train_jsonl: Path, finetune_run: Callable[..., RunResult]
) -> None:
    manifest = job_manifest(
        "early-stop",
        tiny_model,
        train_jsonl,
        data__evalSplit=0.1,
        training__evaluation={"everySteps": 2},
        # No later evaluation can beat the first by 10 nats: training stops after `patience` evaluations.
        training__earlyStopping={"metric": "evalLoss", "patience": 1, "threshold": 10.0},
    )
    result = finetune_run(manifest)
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert summary["steps"] <= 4 < 20
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(result.workdir) if "eval_loss" in m and m["step"] > 0}
    best_step = min(evals, key=lambda step: evals[step])
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    # The best model was loaded at the end: evaluating it again gives the best evaluation's loss.
    assert abs(summary["after"]["eval_loss"] - evals[best_step]) < 1e-5
    assert "eval_perplexity" in summary["after"]


@pytest.mark.parametrize(
    ("metrics", "early_stopping"),
    [
        pytest.param(["loss"], None, id="loss-only"),
        pytest.param(["perplexity", "loss"], "perplexity", id="perplexity-early-stopping"),
    ],
)
def test_evaluation_metrics_choose_what_is_reported(
    metrics: list[str],
    early_stopping: str | None,
    tiny_model: Path,
    train_jsonl: Path,
    finetune_run: Callable[..., RunResult],
) -> None:
    """`training.evaluation.metrics` decides what an evaluation reports ([loss] alone: no perplexity),
    and early stopping watches a listed metric (perplexity: stops as it stops improving)."""
    overrides: dict[str, Any] = {"training__evaluation": {"everySteps": 2, "metrics": metrics}}
    if early_stopping is not None:
        overrides["training__earlyStopping"] = {"metric": early_stopping, "patience": 1, "threshold": 1e6}
    else:
        overrides["training__maxSteps"] = 4
    manifest = job_manifest(f"metrics-{len(metrics)}", tiny_model, train_jsonl, data__evalSplit=0.1, **overrides)
    result = finetune_run(manifest)
    assert result.returncode == 0, result.output[-5000:]
    evals = [m for m in read_metrics(result.workdir) if "eval_loss" in m]
    assert evals, "no evaluation was logged"
    summary = result.summary()
    reported = "perplexity" in metrics
    assert all(("eval_perplexity" in m) == reported for m in evals), evals
    assert ("eval_perplexity" in summary["after"]) == reported, summary["after"]
    if early_stopping is not None:
        # No evaluation beats the first by 1e6: training stops after `patience` evaluations.
        assert summary["steps"] <= 4 < 20, summary["steps"]
    else:
        assert summary["steps"] == 4
