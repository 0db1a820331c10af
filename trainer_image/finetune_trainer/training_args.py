"""transformers TrainingArguments and the DeepSpeed config, derived from the spec."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from finetune_operator.api.v1alpha1 import DeepSpeedSpec, FineTuneJobSpec
from transformers import TrainingArguments

from . import distributed, storage
from .errors import ConfigError

ArgsT = TypeVar("ArgsT", bound=TrainingArguments)

OPTIMIZERS = {
    # torch's fused AdamW (CUDA and CPU), transformers' own default: one kernel over all parameters
    # instead of foreach's several passes (on the overhead benchmark's LoRA, 0.9 vs 2.9 ms a step).
    "adamw": "adamw_torch_fused",
    "adamw8bit": "adamw_bnb_8bit",
    "pagedAdamw8bit": "paged_adamw_8bit",
    "pagedAdamw32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}
CUDA_ONLY_OPTIMIZERS = ("adamw8bit", "pagedAdamw8bit", "pagedAdamw32bit")
BEST_METRICS = {
    "evalLoss": "eval_loss",
    "perplexity": "eval_perplexity",
    "accuracy": "eval_accuracy",
    "f1": "eval_f1",
    "exactMatch": "eval_exact_match",
    "bleu": "eval_bleu",
    "rouge": "eval_rougeL",  # ROUGE-L F-measure: the headline of the three ROUGE scores
    "agreement": "eval_agreement",
}


def deepspeed_config(ds: DeepSpeedSpec, *, base_dir: str | None = None, optimizer: str = "adamw") -> dict[str, Any]:
    """The generated DeepSpeed config; `auto` values are filled by transformers from the arguments.

    With ``deepspeed.config`` the user's JSON is used instead; ``finetune run`` resolves the ConfigMap
    reference to a file ``<base_dir>/<name>/<key>`` and the operator mounts it at the same place.

    Optimizer offload steps the optimizer on the host with DeepSpeed's own CPU Adam (a C++ op that
    DeepSpeed compiles on first use; the trainer image carries g++ and ninja): DeepSpeed refuses a
    client (torch) optimizer with ZeRO-Offload, so the config names DeepSpeed's AdamW, and the spec's
    other optimizers are refused with offload.
    """
    if ds.config is not None:
        path = storage.local_path(f"{ds.config.name}/{ds.config.key}", base_dir)
        loaded: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
        return loaded
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    extra: dict[str, Any] = {}
    if ds.offload_optimizer == "cpu":
        if optimizer != "adamw":
            raise ConfigError(
                f"spec.distributed.deepspeed.offloadOptimizer cpu needs spec.training.optimizer adamw "
                f"(DeepSpeed steps offloaded optimizer state with its CPU Adam only), not {optimizer}"
            )
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # DeepSpeedCPUAdam in AdamW mode; lr, betas, eps and weight decay are filled from the spec.
        extra["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if ds.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                # transformers sets this to 10 x hidden_size, so even small models are partitioned.
                "stage3_param_persistence_threshold": "auto",
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
        if ds.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        **extra,
    }


def precision_flags(precision: str, *, bf16_accelerator: bool) -> dict[str, bool]:
    """TrainingArguments' mixed-precision flags for spec.training.precision. ``auto`` is bf16 on an
    accelerator that supports it (``bf16_accelerator``), else fp32 (no mixed precision, also on CPU)."""
    if precision == "auto":
        precision = "bf16" if bf16_accelerator else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(
    spec: FineTuneJobSpec,
    *,
    output_dir: str | Path,
    base_dir: str | None,
    has_eval: bool,
    args_class: type[ArgsT] = TrainingArguments,  # type: ignore[assignment]
    task_args: dict[str, Any] | None = None,
) -> ArgsT:
    """TrainingArguments for the spec. Build it before the model: ZeRO-3 partitions at load time.

    ``args_class`` is the recipe's arguments class (a trl trainer's config, a subclass of
    TrainingArguments) and ``task_args`` its task's fields (e.g. DPO's ``beta``), set beside the
    spec's training fields.

    Checkpoints are saved into ``output_dir`` (local staging). The CheckpointCallback alone decides
    when to save and the checkpoint store which checkpoints are kept: transformers deletes none
    (no ``save_total_limit``), and its save schedule — which ``load_best_model_at_end`` requires to
    match the evaluations — is overridden by the callback at every step.
    """
    t = spec.training
    cuda = torch.cuda.is_available()
    if t.optimizer in CUDA_ONLY_OPTIMIZERS and not cuda:
        raise ConfigError(f"spec.training.optimizer {t.optimizer} needs CUDA (bitsandbytes paged/8-bit states)")
    if t.precision == "fp16" and not cuda:
        # accelerate enables fp16 autocast and loss scaling on accelerators only: on CPU it would train in fp32.
        raise ConfigError("spec.training.precision fp16 needs CUDA (on CPU, fp16 mixed precision is not applied)")
    evaluate = has_eval and t.evaluation.every_steps is not None
    scheduler = t.scheduler
    warmup: float = t.warmup_steps if t.warmup_steps is not None else (t.warmup_ratio or 0.0)
    if scheduler == "constant" and warmup:
        scheduler = "constant_with_warmup"  # type: ignore[assignment]
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": scheduler,
        "warmup_steps": warmup,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": OPTIMIZERS[t.optimizer],
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.log_every_steps,
        "logging_first_step": True,
        # A NaN/inf loss must show (and stop the run with exit code 4), not be papered over.
        "logging_nan_inf_filter": False,
        "gradient_checkpointing": t.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None,
        "report_to": "none",
        "remove_unused_columns": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not cuda,
        # The backend of the group distributed.init brought up (spec.distributed.backend); none for a
        # single process, which has no group: given one, accelerate asks that missing group for its size.
        "ddp_backend": distributed.group_backend(),
        "save_strategy": "no",
        "eval_strategy": "steps" if evaluate else "no",
        **precision_flags(t.precision, bf16_accelerator=cuda and torch.cuda.is_bf16_supported()),
    }
    if t.max_steps is not None:
        kwargs["max_steps"] = t.max_steps
    else:
        kwargs["num_train_epochs"] = t.epochs
    if evaluate:
        kwargs["eval_steps"] = t.evaluation.every_steps
    if t.early_stopping is not None and evaluate:
        # The best model is loaded at the end (transformers requires a save schedule matching the
        # evaluations for it; the CheckpointCallback saves at each one that improves).
        kwargs.update(
            save_strategy="steps",
            save_steps=t.evaluation.every_steps,
            load_best_model_at_end=True,
            metric_for_best_model=BEST_METRICS[t.early_stopping.metric],
            greater_is_better=t.early_stopping.greater_is_better,
            save_only_model=False,
        )
    if spec.distributed.deepspeed is not None:
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs["deepspeed"] = deepspeed_config(spec.distributed.deepspeed, base_dir=base_dir, optimizer=t.optimizer)
    overlap = set(task_args or {}) & set(kwargs)
    if overlap:
        raise ValueError(f"task arguments {sorted(overlap)} would override the spec's training fields")
    return args_class(**kwargs, **(task_args or {}))
