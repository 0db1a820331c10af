"""``preference`` records: a prompt, a chosen and a rejected response (DPO and kin).

Check only for now: its tokenization arrives with the preference recipe in a later issue.
"""

from __future__ import annotations

from finetune_operator.api.v1alpha1 import ColumnMapping

from .records import Record, need_text

COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")


def check(record: Record, columns: ColumnMapping) -> str | None:
    """The reason the record is unusable, or None."""
    return need_text(record, columns.prompt) or need_text(record, columns.chosen) or need_text(record, columns.rejected)
