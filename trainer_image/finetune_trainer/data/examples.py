"""Training rows for causal-LM training (SFT and continual pre-training), and the dataset serving them.

Each causal-LM format's module (:mod:`.prompt_completion`, :mod:`.chat`, :mod:`.text`) turns a batch of
its records' columns into whole rows (``tokenize``, what the data pipeline maps over Arrow shards,
:mod:`.pipeline`); :func:`build_examples` picks the module by the spec's format and cuts the rows to
maxSeqLength.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


#: A causal-LM format's batched tokenization: the records' columns (by ColumnMapping attribute) to
#: whole ``input_ids`` and ``labels`` rows.
Tokenize = Callable[[Mapping[str, Sequence[Any]], PreTrainedTokenizerBase, DataSpec], dict[str, list[list[int]]]]


def tokenizer_for(fmt: str) -> Tokenize:
    """The batched tokenization of a causal-LM format."""
    # The format modules build on Example: imported here, not above, so that they can import this module.
    from . import chat, prompt_completion, text

    functions: dict[str, Tokenize] = {
        "promptCompletion": prompt_completion.tokenize,
        "chat": chat.tokenize,
        "text": text.tokenize,
    }
    if fmt not in functions:
        raise ValueError(f"format {fmt} is not a causal-LM format")
    return functions[fmt]


def build_examples(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> list[Example]:
    """Tokenize records in the spec's format (unpacked), each row cut to maxSeqLength."""
    from .records import FORMATS

    tokenize = tokenizer_for(data.format)
    if not records:
        return []
    if data.format == "chat":
        from .chat import require_fast

        require_fast(tokenizer, records[0].where)
    attrs = FORMATS[data.format].COLUMNS
    rows = tokenize({a: [r.data[getattr(data.columns, a)] for r in records] for a in attrs}, tokenizer, data)
    n = data.max_seq_length
    return [Example(ids[:n], labels[:n]) for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)]
