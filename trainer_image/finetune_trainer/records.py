"""Read dataset files into records that remember where they came from, and check them.

Every record keeps its file and line (JSONL, CSV), or its position (JSON arrays, Parquet rows), so a
bad record is reported as ``file:line: reason`` — all of them, before any training starts.
Files may be local, relative to the manifest, or on object storage (anything fsspec opens).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api.v1alpha1 import ColumnMapping, DataFormat, DataSource

from . import storage

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Most problems listed before giving up on reading further.
MAX_REPORTED = 50


@dataclass(frozen=True)
class Record:
    """One dataset record and where it is."""

    data: dict[str, Any]
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class DataError(ValueError):
    """Problems with dataset records; each line of the message is ``file:line: reason``."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        more = (total or len(problems)) - len(problems)
        text = "\n".join(problems) + (f"\n... and {more} more" if more > 0 else "")
        super().__init__(text)


def _file_type(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError([f"{path}: cannot tell the file type from '{suffix}'; set fileType"])
    return SUFFIXES[suffix]


def _read_jsonl(name: str, text: str) -> Iterator[Record | str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{name}:{number}: invalid JSON: {exc.msg} (column {exc.colno})"
            continue
        if not isinstance(value, dict):
            yield f"{name}:{number}: expected a JSON object, got {type(value).__name__}"
            continue
        yield Record(value, name, number)


def _read_json(name: str, text: str) -> Iterator[Record | str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        yield f"{name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        return
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        yield f'{name}:1: expected a JSON array of objects (or {{"data": [...]}})'
        return
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            yield f"{name}:record {index}: expected a JSON object, got {type(item).__name__}"
            continue
        yield Record(item, name, index)


def _read_csv(name: str, text: str) -> Iterator[Record | str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        if None in row:
            yield f"{name}:{reader.line_num}: more fields than the header has"
            continue
        yield Record(dict(row), name, reader.line_num)


def _read_parquet(name: str, data: bytes) -> Iterator[Record | str]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    for index, row in enumerate(table.to_pylist()):
        yield Record(row, name, index)


def read_source(source: DataSource, *, base_dir: str | None = None) -> tuple[list[Record], list[str]]:
    """All records of a data source, and the problems met while reading (not raised here)."""
    records: list[Record] = []
    problems: list[str] = []
    files = storage.list_files(source.uri, base_dir=base_dir, suffixes=tuple(SUFFIXES))
    if not files:
        problems.append(f"{source.uri}: no data files found")
    for path in files:
        kind = _file_type(path, source.file_type)
        raw = storage.read_bytes(path, base_dir=base_dir)
        items: Iterable[Record | str]
        if kind == "parquet":
            items = _read_parquet(path, raw)
        else:
            text = raw.decode("utf-8")
            items = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind](path, text)
        for item in items:
            if isinstance(item, str):
                problems.append(item)
            else:
                records.append(item)
            if source.max_samples is not None and len(records) >= source.max_samples:
                return records, problems
    return records, problems


# --------------------------------------------------------------------------------------------------
# Per-format checks
# --------------------------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant", "tool")


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_record(record: Record, fmt: DataFormat, columns: ColumnMapping) -> str | None:
    """The reason a record is unusable for ``fmt``, or None."""
    d = record.data

    def need_text(column: str) -> str | None:
        if column not in d:
            return f"missing column '{column}'"
        if not _text(d[column]):
            return f"column '{column}' must be a non-empty string"
        return None

    if fmt == "promptCompletion":
        return need_text(columns.prompt) or need_text(columns.completion)
    if fmt == "text":
        return need_text(columns.text)
    if fmt == "preference":
        return need_text(columns.prompt) or need_text(columns.chosen) or need_text(columns.rejected)
    if fmt == "qa":
        problem = need_text(columns.question) or need_text(columns.context)
        if problem:
            return problem
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
    if fmt == "classification":
        problem = need_text(columns.text)
        if problem:
            return problem
        if columns.label not in d or d[columns.label] in (None, ""):
            return f"missing column '{columns.label}'"
        return None
    if fmt == "chat":
        messages = d.get(columns.messages)
        if not isinstance(messages, list) or not messages:
            return f"column '{columns.messages}' must be a non-empty list of messages"
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"{columns.messages}[{i}] must be an object with role and content"
            role = message.get("role")
            if role not in CHAT_ROLES:
                return f"{columns.messages}[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
            if not isinstance(message.get("content"), str):
                return f"{columns.messages}[{i}].content must be a string"
            if role == "system" and i != 0:
                return f"{columns.messages}[{i}]: a system message must come first"
        if not any(m["role"] == "assistant" for m in messages):
            return f"column '{columns.messages}' has no assistant message to learn from"
        return None
    raise AssertionError(f"unknown format {fmt}")


def load_checked(
    source: DataSource, fmt: DataFormat, columns: ColumnMapping, *, base_dir: str | None = None
) -> list[Record]:
    """Read a source and check every record; raise DataError listing every bad one."""
    records, problems = read_source(source, base_dir=base_dir)
    for record in records:
        reason = check_record(record, fmt, columns)
        if reason:
            problems.append(f"{record.where}: {reason}")
    if problems:
        raise DataError(problems[:MAX_REPORTED], total=len(problems))
    return records
