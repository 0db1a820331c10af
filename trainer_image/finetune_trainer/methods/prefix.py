"""Prefix tuning: trained key/value prefixes prepended in every attention layer.

Supports the prefix length and the MLP reparameterization (``projection``). Causal-LM tasks only
(refused by the spec otherwise). Packing is not supported: the prefix is a cache that every sample of
a packed row would share. Rows of added tokens are trained.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import PrefixParams
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from transformers import PreTrainedModel

from . import added_tokens
from .context import MethodContext, base_model


def apply(model: PreTrainedModel, ctx: MethodContext) -> PeftModel:
    params = ctx.spec.method.prefix or PrefixParams()
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=params.num_virtual_tokens,
        prefix_projection=params.projection,
        encoder_hidden_size=model.config.hidden_size,
    )
    peft_model = get_peft_model(model, config)
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model
