"""``promptCompletion`` records: a prompt and its completion.

Tokens: the prompt's, then the completion's and EOS; the loss covers the completion only
(``completionOnlyLoss``, the default) or everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec
from transformers import PreTrainedTokenizerBase

from .examples import IGNORE, Example, eos
from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("prompt", "completion")


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    return need_text(record, columns.prompt) or need_text(record, columns.completion)


def tokenize(
    columns: Mapping[str, Sequence[Any]], tokenizer: PreTrainedTokenizerBase, data: DataSpec
) -> dict[str, list[list[int]]]:
    """The training rows of a batch of checked records, whole (not cut to maxSeqLength): ``input_ids``
    and ``labels`` of each; ``columns`` holds the records' ``prompt`` and ``completion`` values."""
    prompts: list[list[int]] = tokenizer(list(columns["prompt"]), add_special_tokens=True)["input_ids"]
    completions: list[list[int]] = tokenizer(list(columns["completion"]), add_special_tokens=False)["input_ids"]
    end = eos(tokenizer)
    ids, labels = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        completion = completion + end
        ids.append(prompt + completion)
        labels.append(([IGNORE] * len(prompt) if data.prompt_loss_masked else list(prompt)) + completion)
    return {"input_ids": ids, "labels": labels}


def example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    """The record's training row (cut to maxSeqLength)."""
    c = data.columns
    row = tokenize({"prompt": [record.data[c.prompt]], "completion": [record.data[c.completion]]}, tokenizer, data)
    return Example(row["input_ids"][0][: data.max_seq_length], row["labels"][0][: data.max_seq_length])


def prompt(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> tuple[list[int], str]:
    """The tokens a completion is generated after (the training row's prompt part), and the record's
    completion (the reference)."""
    ids: list[int] = tokenizer(record.data[data.columns.prompt], add_special_tokens=True)["input_ids"]
    return ids, record.data[data.columns.completion]
