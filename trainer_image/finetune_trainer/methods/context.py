"""What a method needs to know besides the model."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from transformers import PreTrainedTokenizerBase


@dataclass
class MethodContext:
    spec: FineTuneJobSpec
    tokenizer: PreTrainedTokenizerBase
    #: Optimizer steps the run will take (AdaLoRA's budget schedule needs it).
    total_steps: int
    #: Ids of tokens added by spec.model.addTokens; their embedding rows must be trained.
    new_token_ids: list[int] = field(default_factory=list)
