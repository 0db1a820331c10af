"""Packing: several samples in one row, with ``position_ids`` that restart at every sample.

The packed rows carry no attention mask: transformers detects the packed format from the positions and
builds a per-row block-diagonal causal mask, so no token attends across samples (:mod:`.collate`
batches the rows, and makes sure the first token of a sample is never a target of the previous one).
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune_operator.api.v1alpha1 import DataSpec
from transformers import PreTrainedTokenizerBase

from . import text
from .examples import Example
from .records import Record


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Fill rows of up to max_length tokens with whole examples, in order; positions restart per example."""
    rows: list[Example] = []
    current = Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current) + len(ex) > max_length:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += ex.labels
        assert current.position_ids is not None
        current.position_ids += list(range(len(ex)))
    if current.input_ids:
        rows.append(current)
    return rows


def pack_documents(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[Example]:
    """Continual pre-training: documents one after another, cut into blocks of maxSeqLength."""
    block = data.max_seq_length
    rows: list[Example] = []
    ids: list[int] = []
    positions: list[int] = []
    for record in records:
        doc = text.tokens(record, tokenizer, data)
        while doc:
            take = doc[: block - len(ids)]
            doc = doc[len(take) :]
            ids += take
            positions += range(len(take))
            if len(ids) == block:
                rows.append(Example(ids, list(ids), positions))
                ids, positions = [], []
    if ids:
        rows.append(Example(ids, list(ids), positions))
    return rows
