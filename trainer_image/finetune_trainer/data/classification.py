"""``classification`` records: a text and its label.

Check only for now: its tokenization arrives with the classification recipe in a later issue.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import ColumnMapping

from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("text", "label")


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    problem = need_text(record, columns.text)
    if problem:
        return problem
    if columns.label not in record.data or record.data[columns.label] in (None, ""):
        return f"missing column '{columns.label}'"
    return None
