"""``promptCompletion`` records: a prompt and its completion.

Tokens: the prompt's, then the completion's and EOS; the loss covers the completion only
(``completionOnlyLoss``, the default) or everything.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec
from transformers import PreTrainedTokenizerBase

from .examples import IGNORE, Example, eos
from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("prompt", "completion")


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    return need_text(record, columns.prompt) or need_text(record, columns.completion)


def example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    """The record's training row (cut to maxSeqLength)."""
    prompt: list[int] = tokenizer(record.data[data.columns.prompt], add_special_tokens=True)["input_ids"]
    completion: list[int] = tokenizer(record.data[data.columns.completion], add_special_tokens=False)["input_ids"]
    completion = completion + eos(tokenizer)
    ids = (prompt + completion)[: data.max_seq_length]
    prompt_labels = [IGNORE] * len(prompt) if data.completion_only_loss else list(prompt)
    labels = (prompt_labels + completion)[: data.max_seq_length]
    return Example(ids, labels)


def prompt(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> tuple[list[int], str]:
    """The tokens a completion is generated after (the training row's prompt part), and the record's
    completion (the reference)."""
    ids: list[int] = tokenizer(record.data[data.columns.prompt], add_special_tokens=True)["input_ids"]
    return ids, record.data[data.columns.completion]
