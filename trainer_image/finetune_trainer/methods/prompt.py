"""Prompt tuning: trained soft-prompt embeddings prepended to every input.

Supports the soft-prompt length and initialization from the embeddings of a text (``initText``,
repeated or cut to the length) instead of random. Causal-LM tasks only; packing is not supported (the
soft prompt would precede only the first sample of a packed row). Rows of added tokens are trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from finetune_operator.api.v1alpha1 import PromptParams
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import PreTrainedModel

from ..errors import ConfigError
from . import added_tokens
from .context import MethodContext, base_model

if TYPE_CHECKING:
    from peft.tuners.prompt_tuning import PromptEmbedding


def apply(model: PreTrainedModel, ctx: MethodContext) -> PeftModel:
    params = ctx.spec.method.prompt or PromptParams()
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=params.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    embeddings = model.get_input_embeddings()
    peft_model = get_peft_model(model, config)
    if params.init_text:
        ids = ctx.tokenizer(params.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("spec.method.prompt.initText tokenizes to nothing")
        ids = (ids * (params.num_virtual_tokens // len(ids) + 1))[: params.num_virtual_tokens]
        with torch.no_grad():
            init = embeddings(torch.tensor(ids, device=added_tokens.weight(embeddings).device))
            encoder = cast("PromptEmbedding", peft_model.prompt_encoder[peft_model.active_adapter])
            encoder.embedding.weight.copy_(init.to(encoder.embedding.weight.dtype))
    added_tokens.attach(base_model(peft_model), ctx.new_token_ids)
    return peft_model
