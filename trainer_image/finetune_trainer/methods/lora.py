"""LoRA: low-rank update matrices on the chosen linear layers; the base model stays frozen.

Supports rank, alpha, dropout, target modules (names or ``all-linear``), bias training, rank-stabilised
scaling (rsLoRA), DoRA, and ``modulesToSave`` (modules trained in full and saved with the adapter).
Rows of added tokens are trained. A task head other than the LM head (a classification layer) is
trained in full and saved with the adapter (peft's task type, :data:`.context.PEFT_TASK_TYPES`).
Works with DDP, DeepSpeed ZeRO 1-3 and gradient checkpointing.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import LoRAParams
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from . import added_tokens
from .context import MethodContext, base_model


def target_modules(params: LoRAParams) -> list[str] | str:
    modules = list(params.target_modules)
    return "all-linear" if modules == ["all-linear"] else modules


def lora_config(params: LoRAParams, task_type: TaskType, exclude: list[str] | None = None) -> LoraConfig:
    """The peft config of the spec's LoRA parameters (shared by `lora` and `qlora`); ``task_type`` is
    the task head's (a classification head is trained in full and saved with the adapter), ``exclude``
    the modules no adapter goes on (:meth:`~.context.MethodContext.untargeted`)."""
    return LoraConfig(
        task_type=task_type,
        r=params.rank,
        lora_alpha=params.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works (it only divides by it)
        lora_dropout=params.dropout,
        target_modules=target_modules(params),
        bias=params.bias,
        use_rslora=params.use_rslora,
        use_dora=params.use_dora,
        modules_to_save=list(params.modules_to_save) or None,
        exclude_modules=exclude,
    )


def untargeted(ctx: MethodContext) -> list[str] | None:
    """The modules no LoRA adapter (of `lora`, `qlora`, `adalora`) goes on."""
    return ctx.untargeted((ctx.spec.method.lora or LoRAParams()).target_modules, "spec.method.lora.targetModules")


def apply(model: PreTrainedModel, ctx: MethodContext) -> PeftModel:
    config = lora_config(ctx.spec.method.lora or LoRAParams(), ctx.peft_task_type, untargeted(ctx))
    peft_model = get_peft_model(model, config)
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model
