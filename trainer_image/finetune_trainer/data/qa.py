"""``qa`` records: a question, its context, and the answers found in the context (SQuAD style).

A record's ``answers`` column is ``{"text": [...], "answer_start": [...]}``: each answer text with the
character offset where it stands in the context. SQuAD v2-style unanswerable questions have empty
lists. :func:`check` refuses a record whose question or context is empty, whose answer offsets are
not integers inside the context, or whose answer text is not at its offset.

:func:`windows` tokenizes the records for the span head: the question, then the context, as a pair
(``truncation="only_second"``: only the context is cut). A context longer than what
``data.maxSeqLength`` leaves after the question is split into several windows, each overlapping the
previous one by ``task.qa.docStride`` tokens (the tokenizer's ``stride``). Each window keeps the
offset mapping of its context tokens (character spans in the context) and the index of its record,
to decode predicted spans back into text over all the windows of a question.

Training targets: a window that holds the whole (first) answer points at the answer's first and
last context tokens; a window that does not, and every window of an unanswerable question, points at
the *null position*, token 0. Token 0 is never part of the context — the question comes first and is
never truncated — so the null target cannot be mistaken for a span: it is the CLS token of BERT-like
tokenizers, the BOS token of tokenizers that add one (Llama 2/3), and the question's first token for
those that add none (SmolLM2 and other GPT-2-style BPE tokenizers, the tests' tiny Llama). In a
decoder-only model token 0 attends only to itself, so its null score cannot depend on the context; the
span head still learns to answer "none" by scoring every span of an answerless window below it (what
transformers' own QA heads on decoder models do: the null index falls back to 0). The offset mapping
needs a fast (Rust) tokenizer: :func:`require_fast` refuses another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from finetune_operator.api.v1alpha1 import ColumnMapping, DataSpec, QAParams
from transformers import PreTrainedTokenizerBase

from ..errors import ConfigError
from .records import MAX_REPORTED, DataError, Record, need_text

COLUMNS: tuple[str, ...] = ("question", "context", "answers")

#: The position a window without the answer points at (see the module docstring).
NULL_POSITION = 0


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None: a non-empty question and context, and every answer
    text non-empty and standing at its offset, inside the context."""
    problem = need_text(record, columns.question)
    if problem:
        return problem
    context = record.data.get(columns.context)
    if isinstance(context, str) and not context.strip():
        return f"empty context (column '{columns.context}')"
    problem = need_text(record, columns.context)
    if problem:
        return problem
    context = record.data[columns.context]
    answers = record.data.get(columns.answers)
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list):
        return f"column '{columns.answers}' must be {{text: [...], answer_start: [...]}}"
    starts = answers.get("answer_start")
    if not isinstance(starts, list) or len(starts) != len(answers["text"]):
        return f"column '{columns.answers}': answer_start must list one offset per answer text"
    for text, start in zip(answers["text"], starts, strict=True):
        if not isinstance(text, str) or not text:
            return f"column '{columns.answers}': every answer text must be a non-empty string, got {text!r}"
        if not isinstance(start, int) or isinstance(start, bool):
            return f"answer {text!r}: answer_start must be an integer, got {start!r}"
        if start < 0 or start + len(text) > len(context):
            return f"answer {text!r}: answer_start {start} is out of range for a context of {len(context)} characters"
        if context[start : start + len(text)] != text:
            return f"answer {text!r} is not at offset {start} of the context"
    return None


@dataclass(frozen=True)
class Question:
    """What evaluation needs of one record: where it is, its context and its gold answer texts (empty
    for an unanswerable question)."""

    id: str
    context: str
    answers: tuple[str, ...]


def questions(records: Sequence[Record], columns: ColumnMapping) -> list[Question]:
    """The records' questions, in order (``id`` is the record's ``file:line``)."""
    return [Question(r.where, r.data[columns.context], tuple(r.data[columns.answers]["text"])) for r in records]


def unanswerable(records: Sequence[Record], columns: ColumnMapping) -> bool:
    """Whether any record is an unanswerable question (SQuAD v2-style data)."""
    return any(not r.data[columns.answers]["text"] for r in records)


@dataclass(frozen=True)
class Window:
    """One model input: the question and a window of its record's context.

    ``offsets[i]`` is the character span of token ``i`` in the context, None for a token outside the
    context part (the question, special tokens). ``start``/``end`` are the training targets: the
    answer's first and last tokens, or :data:`NULL_POSITION` both.
    """

    input_ids: list[int]
    offsets: list[tuple[int, int] | None]
    question: int  #: index of the record (its :class:`Question`) in the list given to :func:`windows`
    start: int
    end: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def context_tokens(self) -> tuple[int, int]:
        """First and last token index of the context part."""
        inside = [i for i, span in enumerate(self.offsets) if span is not None]
        return inside[0], inside[-1]


def require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer without offset mappings (a slow, pure-Python one)."""
    if not tokenizer.is_fast:
        raise ConfigError(
            f"spec.task.type qa needs a fast tokenizer (the offset mapping of tokens to characters); "
            f"the model's tokenizer {type(tokenizer).__name__} is a slow one. Use a model that ships "
            "tokenizer.json"
        )


def windows(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data: DataSpec, qa: QAParams
) -> list[Window]:
    """Tokenize the records into windows of at most ``data.maxSeqLength`` tokens (see the module
    docstring). A question too long to leave room for the ``docStride`` overlap plus one context
    token is a DataError naming its record."""
    require_fast(tokenizer)
    c = data.columns
    columns = {attr: [r.data[getattr(c, attr)] for r in records] for attr in COLUMNS}
    out, problems = tokenize(columns, tokenizer, data, qa, wheres=[r.where for r in records])
    if problems:
        raise DataError(problems[:MAX_REPORTED], total=len(problems))
    return out


def tokenize(
    columns: Mapping[str, Sequence[Any]],
    tokenizer: PreTrainedTokenizerBase,
    data: DataSpec,
    qa: QAParams,
    *,
    wheres: Sequence[str],
    first: int = 0,
) -> tuple[list[Window], list[str]]:
    """The windows of a batch of checked records (``columns`` holds their ``question``, ``context``
    and ``answers``; ``wheres`` their ``file:line``; ``first`` the index of the batch's first record,
    which the windows' ``question`` counts from), and the problems of the records whose question
    leaves no room for the context (no windows are made then). A fast tokenizer (:func:`require_fast`)."""
    questions, contexts, answers = list(columns["question"]), list(columns["context"]), list(columns["answers"])
    special = tokenizer.num_special_tokens_to_add(pair=True)
    problems: list[str] = []
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]] if questions else []
    for where, question_tokens in zip(wheres, lengths, strict=True):
        room = data.max_seq_length - question_tokens - special
        if room <= qa.doc_stride:
            problems.append(
                f"{where}: the question takes {question_tokens + special} of the {data.max_seq_length} "
                f"tokens of a window (spec.data.maxSeqLength), leaving {max(room, 0)} for the context, which "
                f"must exceed the overlap spec.task.qa.docStride {qa.doc_stride}"
            )
    if problems or not questions:
        return [], problems
    encoded = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=data.max_seq_length,
        stride=qa.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    out: list[Window] = []
    for i, input_ids in enumerate(encoded["input_ids"]):
        index = encoded["overflow_to_sample_mapping"][i]
        sequence_ids = encoded.sequence_ids(i)
        offsets = [
            (int(span[0]), int(span[1])) if seq == 1 else None
            for span, seq in zip(encoded["offset_mapping"][i], sequence_ids, strict=True)
        ]
        start, end = _targets(offsets, answers[index])
        out.append(Window(list(input_ids), offsets, first + index, start, end))
    return out, problems


def _targets(offsets: list[tuple[int, int] | None], answers: dict[str, Any]) -> tuple[int, int]:
    """The first answer's first and last token in the window, or the null position when the window
    does not hold all of it (or the question has no answer)."""
    if not answers["text"]:
        return NULL_POSITION, NULL_POSITION
    begin = answers["answer_start"][0]
    finish = begin + len(answers["text"][0])
    inside = [(i, span) for i, span in enumerate(offsets) if span is not None]
    if not inside or inside[0][1][0] > begin or inside[-1][1][1] < finish:
        return NULL_POSITION, NULL_POSITION
    # The first token ending after the answer's first character, the last starting before its end.
    start = next(i for i, (_, stop) in inside if stop > begin)
    end = next(i for i, (first, _) in reversed(inside) if first < finish)
    return start, end


class WindowDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Windows as the Trainer's items: ``input_ids``, ``start_positions``, ``end_positions``."""

    def __init__(self, items: Sequence[Window]):
        self.windows = list(items)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        w = self.windows[index]
        return {"input_ids": w.input_ids, "start_positions": w.start, "end_positions": w.end}
