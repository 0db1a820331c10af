"""``text`` records: plain documents (continual pre-training).

Tokens: each record is a document followed by EOS. With packing, documents are cut into blocks of
maxSeqLength (:func:`.packing.pack_documents`); otherwise each is truncated to it.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec
from transformers import PreTrainedTokenizerBase

from .examples import Example, eos
from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("text",)


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    return need_text(record, columns.text)


def tokens(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[int]:
    """The whole document's tokens, EOS last (not cut)."""
    ids: list[int] = tokenizer(record.data[data.columns.text], add_special_tokens=True)["input_ids"]
    return ids + eos(tokenizer)


def example(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> Example:
    """The document as one training row, truncated to maxSeqLength; the loss covers every token."""
    ids = tokens(record, tokenizer, data)[: data.max_seq_length]
    return Example(ids, list(ids))
