"""``classification`` records: a text and its label (or, with ``multiLabel``, its labels).

A label is a class name from ``task.classification.labels`` or a class id, an integer from 0 to
``numLabels - 1`` (in a CSV file, where every cell is text, the digits of one; a name that is all
digits is read as the name). With ``multiLabel`` the label column holds a list of names or ids (in a
CSV cell, the list as JSON: ``["billing", "refund"]``); an empty list is an example of no class, and a
single name or id is a list of one.

:func:`check_for_task` refuses a record whose text is empty, whose label is missing, is not one of the
names, is an id out of range (negative, or ``numLabels`` or more), or is a list without
``multiLabel``; every bad record is reported as ``file:line: reason`` before any model is loaded.

Tokens (:func:`example`): the text's tokens, the tokenizer's special tokens included (no EOS is
appended: a Llama-family classifier reads the logits at the last token that is not padding, and the
padding token is often EOS), truncated to ``data.maxSeqLength``; the target is the class id, or with
``multiLabel`` a multi-hot vector of ``numLabels`` floats. :class:`ClassificationCollator` pads a batch
on the right and adds the attention mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from finetune_operator.api.v1alpha1 import ClassificationParams, ColumnMapping, DataSpec, TaskSpec
from transformers import PreTrainedTokenizerBase

from .collate import pad_right
from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("text", "label")
#: Class names listed in a message about a name that is not one of them.
NAMES_SHOWN = 10


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable whatever the classes, or None: a text and a label."""
    problem = need_text(record, columns.text)
    if problem:
        return problem
    if columns.label not in record.data or record.data[columns.label] in (None, ""):
        return f"missing column '{columns.label}'"
    return None


def check_for_task(record: Record, columns: ColumnMapping, task: TaskSpec) -> str | None:
    """The reason the record is unusable for the task's classes, or None."""
    problem = check(record, columns)
    if problem:
        return problem
    params = _params(task)
    parsed = class_ids(record.data[columns.label], params)
    return parsed if isinstance(parsed, str) else None


def _params(task: TaskSpec) -> ClassificationParams:
    # The API requires spec.task.classification for spec.task.type classification.
    assert task.classification is not None, "spec.task.classification is required for classification"
    return task.classification


def class_names(params: ClassificationParams) -> list[str]:
    """Every class's name in id order: ``labels``, or the ids as text when there are none."""
    return list(params.labels) if params.labels else [str(i) for i in range(params.num_labels)]


def _class_id(value: Any, params: ClassificationParams) -> int | str:
    """The class id of one label value, or the reason it is none."""
    names = params.labels or []
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        if not value.strip().isdigit():
            if names:
                shown = ", ".join(repr(n) for n in names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
                return f"label {value!r} is not one of spec.task.classification.labels ({shown})"
            return f"label {value!r} is not a class id (spec.task.classification has no labels to name classes)"
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        return f"label must be a class name or an integer class id, got {type(value).__name__} {value!r}"
    if not 0 <= value < params.num_labels:
        return (
            f"label id {value} is out of range: spec.task.classification.numLabels is {params.num_labels} "
            f"(ids 0 to {params.num_labels - 1})"
        )
    return value


def class_ids(value: Any, params: ClassificationParams) -> list[int] | str:
    """The class ids a label value names (one, unless ``multiLabel``), or the reason it names none."""
    if params.multi_label and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return f"label {value!r} is not a JSON list of labels: {exc.msg}"
    if isinstance(value, list):
        if not params.multi_label:
            return "a list of labels needs spec.task.classification.multiLabel"
        ids: list[int] = []
        for item in value:
            one = _class_id(item, params)
            if isinstance(one, str):
                return one
            ids.append(one)
        return ids
    one = _class_id(value, params)
    return one if isinstance(one, str) else [one]


@dataclass
class ClassificationExample:
    """One training row: token ids and the target (a class id, or a multi-hot vector)."""

    input_ids: list[int]
    label: int | list[float]

    def __len__(self) -> int:
        return len(self.input_ids)


def example(
    record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec, task: TaskSpec
) -> ClassificationExample:
    """The record's row: its text's tokens (cut to maxSeqLength) and its target. The record is checked."""
    params = _params(task)
    ids: list[int] = tokenizer(record.data[data.columns.text], add_special_tokens=True)["input_ids"]
    parsed = class_ids(record.data[data.columns.label], params)
    assert not isinstance(parsed, str), f"{record.where}: {parsed} (the record was not checked)"
    label: int | list[float]
    if params.multi_label:
        label = [0.0] * params.num_labels
        for class_id in parsed:
            label[class_id] = 1.0
    else:
        label = parsed[0]
    return ClassificationExample(ids[: data.max_seq_length], label)


def build_examples(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec, task: TaskSpec
) -> list[ClassificationExample]:
    return [example(r, tokenizer, data, task) for r in records]


def target_classes(examples: Sequence[ClassificationExample]) -> list[list[int]]:
    """Each example's class ids (one for single-label, any number for multi-label)."""
    return [
        [example.label] if isinstance(example.label, int) else [i for i, v in enumerate(example.label) if v]
        for example in examples
    ]


class ClassificationDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Examples as the Trainer's items: ``input_ids`` and ``labels`` (the target)."""

    def __init__(self, examples: Sequence[ClassificationExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        return {"input_ids": ex.input_ids, "labels": ex.label}


class ClassificationCollator:
    """Pads a batch on the right with the pad token, with its attention mask; the targets become a
    ``long`` tensor of class ids or a float ``[batch, numLabels]`` multi-hot matrix.

    Counts the real (non-padding) tokens and the rows it hands out, for throughput reporting.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.tokens = 0
        self.samples = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_right(features, self.pad_token_id)
        labels = [f["labels"] for f in features]
        targets = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], list) else torch.long)
        self.samples += len(features)
        self.tokens += int(mask.sum())
        return {"input_ids": input_ids, "attention_mask": mask, "labels": targets}
