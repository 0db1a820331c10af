"""Full fine-tuning: every parameter is trained, or every parameter a freeze leaves.

Supports ``spec.method.freeze``:

- ``headOnly``: only the task's output layer: the LM head of a causal LM (with tied embeddings the
  head *is* the input embedding matrix, so that is trained too), the classification layer of a
  sequence classifier (``score`` on Llama-family models, ``classifier`` on encoders), the span layer
  of an extractive-QA model (``qa_outputs``);
- ``lastLayers: N``: only the last N transformer blocks, plus the parameters outside the blocks that
  are not embeddings (the final norm, an untied head);
- ``patterns``: parameters whose names match any of these regular expressions are frozen (applied
  after the two above).

Rows of tokens added with ``spec.model.addTokens`` are trained even when the embeddings are frozen.
Works with DDP and DeepSpeed ZeRO 1-3.
"""

from __future__ import annotations

import re

from finetune_operator.api.tasks import Head
from torch import nn
from transformers import PreTrainedModel

from ..errors import ConfigError
from ..modeling import HEAD_MODULES
from . import added_tokens
from .context import MethodContext


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of transformer blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError("spec.method.freeze.lastLayers: the model has no list of transformer blocks")
    return max(lists, key=len)


def task_head(model: PreTrainedModel, head: Head) -> nn.Module | None:
    """The layer that produces the task's outputs (see the module docstring), None if the model has none."""
    if head == "causal-lm":
        return added_tokens.output_embeddings(model)
    for name in HEAD_MODULES[head]:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def apply(model: PreTrainedModel, ctx: MethodContext) -> PreTrainedModel:
    freeze = ctx.spec.method.freeze
    if freeze is None:
        return model
    embedding_params = {id(model.get_input_embeddings().weight)}
    if freeze.head_only or freeze.last_layers is not None:
        for param in model.parameters():
            param.requires_grad = False
    if freeze.head_only:
        head = task_head(model, ctx.head)
        if head is None:
            raise ConfigError("spec.method.freeze.headOnly: the model has no output head")
        for param in head.parameters():
            param.requires_grad = True
    if freeze.last_layers is not None:
        blocks = transformer_blocks(model)
        if freeze.last_layers > len(blocks):
            raise ConfigError(
                f"spec.method.freeze.lastLayers is {freeze.last_layers} but the model has {len(blocks)} blocks"
            )
        in_blocks = {id(p) for p in blocks.parameters()}
        for block in list(blocks)[-freeze.last_layers :]:
            for param in block.parameters():
                param.requires_grad = True
        for param in model.parameters():
            if id(param) not in in_blocks and id(param) not in embedding_params:
                param.requires_grad = True
    for pattern in freeze.patterns:
        regex = re.compile(pattern)
        for name, param in model.named_parameters():
            if regex.search(name):
                param.requires_grad = False
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("spec.method.freeze leaves no parameter to train")
    added_tokens.attach(model, ctx.new_token_ids)
    return model
