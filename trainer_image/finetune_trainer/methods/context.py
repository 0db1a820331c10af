"""What a method needs to know besides the model, and the types of the models methods return."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, cast

from finetune_operator.api.tasks import Head, task_row
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from peft import TaskType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import ConfigError
from ..modeling import HEAD_MODULES

if TYPE_CHECKING:
    from peft import PeftModel

#: What ``apply`` returns: peft's wrapper around the model (every PEFT method), or the model itself
#: (``full``).
TunedModel: TypeAlias = "PeftModel | PreTrainedModel"

#: peft's task type for each model head (:data:`finetune_operator.api.tasks.Head`). It picks peft's
#: wrapper, which keeps a task head trained in full and saved with the adapter: ``SEQ_CLS`` adds the
#: classification layer (``score``, ``classifier``) to ``modules_to_save``, ``QUESTION_ANS`` the span
#: layer (``qa_outputs``).
PEFT_TASK_TYPES: dict[Head, TaskType] = {
    "causal-lm": TaskType.CAUSAL_LM,
    "sequence-classification": TaskType.SEQ_CLS,
    "question-answering": TaskType.QUESTION_ANS,
    "reward": TaskType.SEQ_CLS,
}


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

    @property
    def head(self) -> Head:
        """The head the task trains (the task table's)."""
        return task_row(self.spec.task.type).head

    @property
    def peft_task_type(self) -> TaskType:
        """The ``task_type`` of the peft config (see :data:`PEFT_TASK_TYPES`)."""
        return PEFT_TASK_TYPES[self.head]

    def untargeted(self, targets: Sequence[str] | str | None, field: str) -> list[str] | None:
        """The peft config's ``exclude_modules``: the span layer of a QA model, which peft trains in full
        (``modules_to_save``) and refuses to wrap once an adapter is on it — and its ``all-linear`` leaves
        out LM and classification heads, not ``qa_outputs``. Naming that layer in the spec's
        ``targets`` (at ``field``) is a ConfigError rather than an adapter silently left out."""
        if self.head != "question-answering":
            return None
        head = list(HEAD_MODULES[self.head])
        named = [t for t in ([targets] if isinstance(targets, str) else targets or []) if t in head]
        if named:
            raise ConfigError(
                f"{field}: {named[0]} is the span head of spec.task.type qa, trained in full and saved with the "
                "adapter by every method: leave it out"
            )
        return head
