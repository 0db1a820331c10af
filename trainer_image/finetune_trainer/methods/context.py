"""What a method needs to know besides the model, and the types of the models methods return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, cast

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from peft import PeftModel

#: What ``apply`` returns: peft's wrapper around the model (every PEFT method), or the model itself
#: (``full``).
TunedModel: TypeAlias = "PeftModel | PreTrainedModel"


def base_model(peft_model: PeftModel) -> PreTrainedModel:
    """The transformers model inside ``peft_model``. peft types ``get_base_model()`` as any
    ``nn.Module``; ours always wrap the PreTrainedModel they were given (the model itself for prompt
    learning, the tuner's ``.model`` otherwise)."""
    return cast(PreTrainedModel, peft_model.get_base_model())


@dataclass
class MethodContext:
    spec: FineTuneJobSpec
    tokenizer: PreTrainedTokenizerBase
    #: Optimizer steps the run will take (AdaLoRA's budget schedule needs it).
    total_steps: int
    #: Ids of tokens added by spec.model.addTokens; their embedding rows must be trained.
    new_token_ids: list[int] = field(default_factory=list)
