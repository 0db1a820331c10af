"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated by importance during training.

Supports the initial and target ranks and the budget schedule: ``tinit`` warm-up steps at the initial
budget, a cubic decrease to the target budget until ``tfinal`` steps before the end, reallocation
every ``deltaT`` steps, the importance EMA factors ``beta1``/``beta2``, and the orthogonality
regularizer weight (the penalty is added to training losses only: evaluation losses, perplexity and
early stopping measure the data). Alpha, dropout, target modules, bias and modules to save come from
``spec.method.lora`` (its rank, rsLoRA and DoRA are refused at admission under adalora). The budget is
updated after every optimizer step, before gradients are cleared. Rows of added tokens are trained.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.v1alpha1 import AdaLoRAParams, LoRAParams
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from ..errors import ConfigError
from . import added_tokens
from .context import MethodContext, base_model
from .lora import target_modules, untargeted


def apply(model: PreTrainedModel, ctx: MethodContext) -> PeftModel:
    params = ctx.spec.method.adalora or AdaLoRAParams()
    lora = ctx.spec.method.lora or LoRAParams()
    if params.tinit + params.tfinal >= ctx.total_steps:
        raise ConfigError(
            f"spec.method.adalora: tinit + tfinal ({params.tinit + params.tfinal}) must be below the "
            f"{ctx.total_steps} training steps"
        )
    config = AdaLoraConfig(
        task_type=ctx.peft_task_type,
        init_r=params.init_r,
        target_r=params.target_r,
        tinit=params.tinit,
        tfinal=params.tfinal,
        deltaT=params.delta_t,
        beta1=params.beta1,
        beta2=params.beta2,
        orth_reg_weight=params.orth_reg_weight,
        total_step=ctx.total_steps,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works (it only divides by it)
        lora_dropout=lora.dropout,
        target_modules=target_modules(lora),
        bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) or None,
        exclude_modules=untargeted(ctx),
    )
    peft_model = get_peft_model(model, config)
    penalize_while_training_only(peft_model.base_model, params.orth_reg_weight)
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model


def penalize_while_training_only(adalora_model: Any, weight: float) -> None:
    """peft's AdaLoRA model (a PeftModel's ``base_model``) adds ``weight`` times the orthogonality
    penalty to every loss it computes, in eval mode too; its forward passes in eval mode now add none
    (the configured weight is restored after each pass, so the saved adapter config keeps it)."""
    config = adalora_model.peft_config[adalora_model.trainable_adapter_name]

    def before(module: nn.Module, args: Any) -> None:
        config.orth_reg_weight = weight if module.training else 0.0

    def after(module: nn.Module, args: Any, output: Any) -> None:
        config.orth_reg_weight = weight

    adalora_model.register_forward_pre_hook(before)
    adalora_model.register_forward_hook(after)


class BudgetSchedule(TrainerCallback):
    """Calls AdaLoRA's update_and_allocate after each optimizer step, while gradients still exist.

    The step it is given counts from 1 (the Trainer's ``global_step`` is still that of the previous
    step here): then ``tinit`` steps train at the initial budget, the final allocation comes after
    step ``total - tfinal`` and ``tfinal`` steps follow it, and with ``tfinal: 0`` the last step
    allocates the target budget (counting from 0, it never would).
    """

    def __init__(self, model: Any):
        self.model = model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.base_model.update_and_allocate(state.global_step + 1)


def callbacks(model: PreTrainedModel, ctx: MethodContext) -> list[TrainerCallback]:
    return [BudgetSchedule(model)]
