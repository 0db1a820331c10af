"""Hyperparameters reach transformers as the spec says; early stopping keeps and loads the best model."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import harness
from finetune_trainer.data.collate import CausalLMCollator
from finetune_trainer.errors import ConfigError
from finetune_trainer.training_args import deepspeed_config, precision_flags, training_arguments
from runs import RunResult
from tiny import job_manifest, read_metrics
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments


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


def test_fp16_is_refused_on_cpu(tmp_path: Path) -> None:
    """On CPU, accelerate leaves fp16 mixed precision off (no autocast, no loss scaling): the step would
    run in fp32 while the spec says fp16. Admission refuses it without GPUs (fp16-without-gpus); the
    trainer refuses it too, for an object stored before that rule existed."""
    with pytest.raises(ConfigError, match=r"spec\.training\.precision fp16 needs CUDA"):
        training_arguments(spec(precision="fp16"), output_dir=tmp_path, base_dir=None, has_eval=False)
    assert precision_flags("fp16", bf16_accelerator=True) == {"bf16": False, "fp16": True}


def test_epochs_set_the_length_of_training(tmp_path: Path) -> None:
    """epochs (instead of maxSteps) reach transformers as num_train_epochs; the planned steps follow
    them (a run that trains by epochs: tests/trainer/test_data_options.py's packing run)."""
    args = training_arguments(spec(maxSteps=None, epochs=2.5), output_dir=tmp_path, base_dir=None, has_eval=False)
    assert (args.num_train_epochs, args.max_steps) == (2.5, -1)
    # 2.5 passes over 100 rows on 2 ranks, in micro-batches of 4 (default), 1 accumulation step
    assert harness.planned_steps(spec(maxSteps=None, epochs=2.5), 100, world_size=2) == math.ceil(2.5 * 13)


def tiny_trainer(model_dir: Path, args: TrainingArguments, rows: int = 4) -> tuple[Trainer, PreTrainedModel]:
    """transformers' Trainer on the tiny model with these arguments and a few short rows."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    row = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [5, 6, 7, 8, 9, 10]}
    trainer = Trainer(model=model, args=args, train_dataset=[row] * rows, data_collator=CausalLMCollator(0))
    return trainer, model


@pytest.mark.parametrize(
    ("precision", "on_cpu", "on_bf16_accelerator"),
    [
        pytest.param("auto", torch.float32, {"bf16": True, "fp16": False}, id="auto"),
        pytest.param("bf16", torch.bfloat16, {"bf16": True, "fp16": False}, id="bf16"),
        pytest.param("fp32", torch.float32, {"bf16": False, "fp16": False}, id="fp32"),
    ],
)
def test_precision_is_the_dtype_training_computes_in(
    precision: str, on_cpu: torch.dtype, on_bf16_accelerator: dict[str, bool], tiny_model: Path, tmp_path: Path
) -> None:
    """A training step's matrix products run in spec.training.precision (torch autocast; bf16 on CPU too);
    `auto` is fp32 on CPU and bf16 on an accelerator that supports it, where fp32 stays fp32. (fp16
    needs CUDA: test_fp16_is_refused_on_cpu.)"""
    args = training_arguments(
        spec(precision=precision, maxSteps=1, perDeviceBatchSize=2), output_dir=tmp_path, base_dir=None, has_eval=False
    )
    trainer, model = tiny_trainer(tiny_model, args)
    computed: list[torch.dtype] = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda _m, _i, out: computed.append(out.dtype))
    trainer.train()
    assert computed == [on_cpu]
    assert precision_flags(precision, bf16_accelerator=True) == on_bf16_accelerator
    assert precision_flags(precision, bf16_accelerator=False)["bf16"] == (precision == "bf16")


def test_optimizer_and_scheduler_reach_the_trainer(tiny_model: Path, tmp_path: Path) -> None:
    """optimizer sgd steps the weights with torch's SGD, and scheduler cosine decays the learning rate
    along a half cosine after the warm-up."""
    args = training_arguments(
        spec(optimizer="sgd", scheduler="cosine", learningRate=0.1, warmupSteps=2, maxSteps=10),
        output_dir=tmp_path,
        base_dir=None,
        has_eval=False,
    )
    trainer, _ = tiny_trainer(tiny_model, args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert type(trainer.optimizer) is torch.optim.SGD
    rates = []
    for _ in range(10):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [0.0, 0.05] + [0.05 * (1 + math.cos(math.pi * (step - 2) / 8)) for step in range(2, 10)]
    assert rates == pytest.approx(expected)


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


@pytest.mark.parametrize(
    ("mode", "threshold"),
    [
        # No later evaluation can beat the first by 10 nats: training stops after `patience` evaluations.
        pytest.param("min", 10.0, id="min"),
        # Higher is better: the loss falls as training goes, so the first evaluation stays the best.
        pytest.param("max", 0.0, id="max"),
    ],
)
def test_early_stopping_loads_the_best_model(
    mode: str, threshold: float, tiny_model: Path, train_jsonl: Path, finetune_run: Callable[..., RunResult]
) -> None:
    manifest = job_manifest(
        f"early-stop-{mode}",
        tiny_model,
        train_jsonl,
        data__evalSplit=0.1,
        training__evaluation={"everySteps": 2},
        training__earlyStopping={"metric": "evalLoss", "mode": mode, "patience": 1, "threshold": threshold},
    )
    result = finetune_run(manifest)
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert summary["steps"] <= 4 < 20
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(result.workdir) if "eval_loss" in m and m["step"] > 0}
    best_step = (min if mode == "min" else max)(evals, key=lambda step: evals[step])
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
