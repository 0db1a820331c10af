"""Packing: several samples in one row, with ``position_ids`` that restart at every sample.

The packed rows carry no attention mask: transformers detects the packed format from the positions and
builds a per-row block-diagonal causal mask, so no token attends across samples (:mod:`.collate`
batches the rows, and makes sure the first token of a sample is never a target of the previous one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from finetune_operator.api.v1alpha1 import DataSpec
from transformers import PreTrainedTokenizerBase

from . import text
from .examples import Example
from .records import Record


def iter_packed(examples: Iterable[Example], max_length: int) -> Iterator[Example]:
    """Fill rows of up to max_length tokens with whole examples, in order; positions restart per example.
    A stream: the data pipeline packs a dataset of any size in bounded memory."""
    current = Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current) + len(ex) > max_length:
            yield current
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += ex.labels
        assert current.position_ids is not None
        current.position_ids += list(range(len(ex)))
    if current.input_ids:
        yield current


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """:func:`iter_packed`, as a list."""
    return list(iter_packed(examples, max_length))


def iter_blocks(documents: Iterable[list[int]], block: int) -> Iterator[Example]:
    """Continual pre-training: documents' tokens one after another, cut into blocks of ``block`` tokens
    (the last one may be shorter), positions restarting with each document and each block."""
    ids: list[int] = []
    positions: list[int] = []
    for doc in documents:
        while doc:
            take = doc[: block - len(ids)]
            doc = doc[len(take) :]
            ids += take
            positions += range(len(take))
            if len(ids) == block:
                yield Example(ids, list(ids), positions)
                ids, positions = [], []
    if ids:
        yield Example(ids, list(ids), positions)


def pack_documents(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[Example]:
    """Continual pre-training: documents one after another, cut into blocks of maxSeqLength."""
    return list(iter_blocks((text.tokens(r, tokenizer, data) for r in records), data.max_seq_length))
