"""``qa`` records: a question, its context, and the answers found in the context (SQuAD style).

Check only for now: its tokenization arrives with the extractive-QA recipe in a later issue.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import ColumnMapping

from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("question", "context", "answers")


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None: every answer text must stand at its offset."""
    problem = need_text(record, columns.question) or need_text(record, columns.context)
    if problem:
        return problem
    d = record.data
    answers = d.get(columns.answers)
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list):
        return f"column '{columns.answers}' must be {{text: [...], answer_start: [...]}}"
    starts = answers.get("answer_start")
    if not isinstance(starts, list) or len(starts) != len(answers["text"]):
        return f"column '{columns.answers}': answer_start must list one offset per answer text"
    for text, start in zip(answers["text"], starts, strict=True):
        if not isinstance(start, int) or d[columns.context][start : start + len(text)] != text:
            return f"answer {text!r} is not at offset {start} of the context"
    return None
