"""AdaLoRA: LoRA in SVD form whose rank budget is reallocated by importance during training.

Supports the initial and target ranks and the budget schedule: ``tinit`` warm-up steps at the initial
budget, a cubic decrease to the target budget until ``tfinal`` steps before the end, reallocation
every ``deltaT`` steps, the importance EMA factors ``beta1``/``beta2``, and the orthogonality
regularizer weight. Alpha, dropout, target modules, bias and modules to save come from
``spec.method.lora`` (its rank, rsLoRA and DoRA are refused at admission under adalora). The budget is
updated after every optimizer step, before gradients are cleared. Rows of added tokens are trained.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.v1alpha1 import AdaLoRAParams, LoRAParams
from peft import AdaLoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, TrainerCallback

from ..errors import ConfigError
from . import added_tokens
from .context import MethodContext, base_model
from .lora import target_modules


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
    )
    peft_model = get_peft_model(model, config)
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model


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
