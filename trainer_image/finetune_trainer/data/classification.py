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
from collections.abc import Mapping, Sequence
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


def target(value: Any, params: ClassificationParams) -> int | list[float]:
    """The training target of a (checked) label value: a class id, or with ``multiLabel`` a multi-hot
    vector of ``numLabels`` floats."""
    parsed = class_ids(value, params)
    assert not isinstance(parsed, str), f"{parsed} (the record was not checked)"
    if not params.multi_label:
        return parsed[0]
    hot = [0.0] * params.num_labels
    for class_id in parsed:
        hot[class_id] = 1.0
    return hot


def tokenize(
    columns: Mapping[str, Sequence[Any]], tokenizer: PreTrainedTokenizerBase, data: DataSpec, task: TaskSpec
) -> dict[str, list[Any]]:
    """A batch of checked records (``columns["text"]``, ``columns["label"]``) as rows: each text's
    tokens whole (not cut to maxSeqLength) as ``input_ids``, its target as ``labels``."""
    params = _params(task)
    ids: list[list[int]] = tokenizer(list(columns["text"]), add_special_tokens=True)["input_ids"]
    return {"input_ids": ids, "labels": [target(value, params) for value in columns["label"]]}


def example(
    record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec, task: TaskSpec
) -> ClassificationExample:
    """The record's row: its text's tokens (cut to maxSeqLength) and its target. The record is checked."""
    [built] = build_examples([record], tokenizer, data, task)
    return built


def build_examples(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec, task: TaskSpec
) -> list[ClassificationExample]:
    """The records' rows (:func:`tokenize`, cut to maxSeqLength)."""
    if not records:
        return []
    c = data.columns
    rows = tokenize(
        {"text": [r.data[c.text] for r in records], "label": [r.data[c.label] for r in records]}, tokenizer, data, task
    )
    n = data.max_seq_length
    return [ClassificationExample(ids[:n], label) for ids, label in zip(rows["input_ids"], rows["labels"], strict=True)]


def classes_of(targets: Sequence[int | list[float]]) -> list[list[int]]:
    """The class ids of each target (a class id, or a multi-hot vector)."""
    return [[t] if isinstance(t, int) else [i for i, v in enumerate(t) if v] for t in targets]


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
