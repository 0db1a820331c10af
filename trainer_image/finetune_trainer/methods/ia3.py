"""(IA)³: trained vectors that rescale attention keys and values and feed-forward activations.

Supports the rescaled modules and which of them are feed-forward layers; by default peft's mapping
for the model family (key, value and down projections). Very few trainable parameters. Rows of added
tokens are trained.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import IA3Params
from peft import IA3Config, PeftModel, get_peft_model
from transformers import PreTrainedModel

from . import added_tokens
from .context import MethodContext, base_model


def apply(model: PreTrainedModel, ctx: MethodContext) -> PeftModel:
    params = ctx.spec.method.ia3 or IA3Params()
    config = IA3Config(
        task_type=ctx.peft_task_type,
        target_modules=list(params.target_modules) if params.target_modules else None,
        feedforward_modules=list(params.feedforward_modules) if params.feedforward_modules else None,
        exclude_modules=ctx.untargeted(params.target_modules, "spec.method.ia3.targetModules"),
    )
    peft_model = get_peft_model(model, config)
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model
