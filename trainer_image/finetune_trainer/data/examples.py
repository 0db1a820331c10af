"""Training rows for causal-LM training (SFT and continual pre-training), and the dataset serving them.

Each causal-LM format's module (:mod:`.prompt_completion`, :mod:`.chat`, :mod:`.text`) turns one of its
records into an :class:`Example`; :func:`build_examples` picks the module by the spec's format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from finetune_operator.api.v1alpha1 import DataSpec
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from .records import Record

#: The label of a token that takes no loss.
IGNORE = -100


@dataclass
class Example:
    """One training row: token ids, labels (IGNORE where no loss), and restart positions if packed."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-sequence token to close a sample with (none if the tokenizer has none)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def build_examples(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[Example]:
    """Tokenize records in the spec's format (unpacked)."""
    # The format modules build on Example: imported here, not above, so that they can import this module.
    from . import chat, prompt_completion, text

    examples: dict[str, Callable[[Record, PreTrainedTokenizerBase, DataSpec], Example]] = {
        "promptCompletion": prompt_completion.example,
        "chat": chat.example,
        "text": text.example,
    }
    if data.format not in examples:
        raise ValueError(f"format {data.format} is not a causal-LM format")
    example = examples[data.format]
    return [example(r, tokenizer, data) for r in records]


class ExampleDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    """Examples as the Trainer's items: ``input_ids``, ``labels``, and ``position_ids`` if packed."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ex = self.examples[index]
        item = {"input_ids": ex.input_ids, "labels": ex.labels}
        if ex.position_ids is not None:
            item["position_ids"] = ex.position_ids
        return item
