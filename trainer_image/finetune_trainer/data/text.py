"""``text`` records: plain documents (continual pre-training).

Tokens: each record is a document followed by EOS. With packing, documents are cut into blocks of
maxSeqLength (:func:`.packing.pack_documents`); otherwise each is truncated to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec
from transformers import PreTrainedTokenizerBase

from .examples import Example, eos
from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("text",)


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    return need_text(record, columns.text)


def tokenize(
    columns: Mapping[str, Sequence[Any]], tokenizer: PreTrainedTokenizerBase, data: DataSpec
) -> dict[str, list[list[int]]]:
    """A batch of documents (``columns["text"]``) as whole rows, EOS last (not cut to maxSeqLength);
    the loss covers every token."""
    end = eos(tokenizer)
    ids: list[list[int]] = [doc + end for doc in tokenizer(list(columns["text"]), add_special_tokens=True)["input_ids"]]
    return {"input_ids": ids, "labels": [list(row) for row in ids]}


def tokens(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[int]:
    """The whole document's tokens, EOS last (not cut)."""
    return tokenize({"text": [record.data[data.columns.text]]}, tokenizer, data)["input_ids"][0]


def example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    """The document as one training row, truncated to maxSeqLength; the loss covers every token."""
    ids = tokens(record, tokenizer, data)[: data.max_seq_length]
    return Example(ids, list(ids))
