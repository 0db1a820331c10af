"""Read dataset files into records that remember where they came from, and check them.

Every record keeps its file and line (JSONL, CSV), or its position (JSON arrays, Parquet rows), so a
bad record is reported as ``file:line: reason`` — all of them, before any training starts.
Files may be local, relative to the manifest, or on object storage (anything fsspec opens).

Every defect of the data itself is a :class:`DataError` (the trainer's exit 3, permanent): a file that
does not exist or cannot be read, text that is not UTF-8 (with its line and byte offset), a binary
file, a Parquet or CSV file that cannot be parsed, no records at all, a column mapping naming a column
no record has. Only ``\\n`` (or ``\\r\\n``) ends a JSONL line: a JSON string may hold U+2028, U+0085,
form feeds and the other characters ``str.splitlines`` would break at, so line numbers stay exact.

Each record is checked by its format's module (:data:`FORMATS`), which says which columns it reads
and why a record is unusable; a format whose records must fit the task's parameters (classification:
the labels) checks them against ``spec.task`` too.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from finetune_operator.api.tasks import DataFormat
from finetune_operator.api.v1alpha1 import ColumnMapping, DataSource, TaskSpec

from .. import storage

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Most problems listed before giving up on reading further.
MAX_REPORTED = 50


@dataclass(frozen=True)
class Record:
    """One dataset record and where it is: its line (1-based), or with ``unit`` its position, e.g. the
    3rd row of a Parquet file is ``file:row 3``."""

    data: dict[str, Any]
    file: str
    line: int
    unit: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.unit} {self.line}" if self.unit else f"{self.file}:{self.line}"


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
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip(" \t\r"):
            continue
        try:
            # strict=False: control characters (form feeds, ...) may stand unescaped inside strings.
            value = json.loads(line, strict=False)
        except json.JSONDecodeError as exc:
            yield f"{name}:{number}: invalid JSON: {exc.msg} (column {exc.colno})"
            continue
        except RecursionError:
            yield f"{name}:{number}: invalid JSON: nested too deeply"
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
    except RecursionError:
        yield f"{name}:1: invalid JSON: nested too deeply"
        return
    lines: list[int] | None = None
    if isinstance(value, list):
        lines = _array_item_lines(text)
    elif isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        yield f'{name}:1: expected a JSON array of objects (or {{"data": [...]}})'
        return
    for index, item in enumerate(value):
        record = Record(item, name, lines[index]) if lines else Record(item, name, index + 1, unit="record")
        if not isinstance(item, dict):
            yield f"{record.where}: expected a JSON object, got {type(item).__name__}"
            continue
        yield record


def _array_item_lines(text: str) -> list[int]:
    """The line each element of a (valid) top-level JSON array starts on."""
    decoder = json.JSONDecoder(strict=False)
    ws = " \t\r\n"
    pos = text.index("[") + 1
    lines: list[int] = []
    line, counted = 1, 0
    while True:
        while text[pos] in ws or text[pos] == ",":
            pos += 1
        if text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _value, pos = decoder.raw_decode(text, pos)


def _read_csv(name: str, text: str) -> Iterator[Record | str]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        if reader.fieldnames is None:  # reads the header: an empty file has none (and no records)
            return
    except csv.Error as exc:
        yield f"{name}:1: invalid CSV header: {exc}"
        return
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: a record is where it starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"{name}:{start}: invalid CSV: {exc}"
            return
        if None in row:
            yield f"{name}:{start}: more fields than the header has"
            continue
        yield Record(dict(row), name, start)


def _read_parquet(name: str, data: bytes) -> Iterator[Record | str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield f"{name}: not a readable Parquet file: {exc}"
        return
    for index, row in enumerate(rows):
        yield Record(row, name, index + 1, unit="row")


def decode_text(name: str, raw: bytes) -> str:
    """UTF-8 text (a byte-order mark is dropped); a binary or otherwise encoded file is a DataError."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise DataError([f"{name}:{line}: a binary file, not text (NUL byte at byte offset {nul})"])
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            [f"{name}:{line}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} cannot be decoded"]
        ) from None


def _read_bytes(path: str, base_dir: str | None) -> bytes:
    try:
        return storage.read_bytes(path, base_dir=base_dir)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # The data is missing or unreadable: permanent. Other errors (network, throttling) may pass.
        raise DataError([f"{path}: cannot read: {exc.strerror or exc}"]) from None


def read_source(source: DataSource, *, base_dir: str | None = None) -> tuple[list[Record], list[str]]:
    """All records of a data source, and the problems met while reading (not raised here)."""
    records: list[Record] = []
    problems: list[str] = []
    files = storage.list_files(source.uri, base_dir=base_dir, suffixes=tuple(SUFFIXES))
    if not files:
        fs, local = storage.filesystem(source.uri, base_dir)
        if fs.exists(local):
            problems.append(f"{source.uri}: no data files found (looked for {', '.join(SUFFIXES)})")
        else:
            problems.append(f"{source.uri}: no such file or directory")
    for path in files:
        kind = _file_type(path, source.file_type)
        raw = _read_bytes(path, base_dir)
        items: Iterable[Record | str]
        if kind == "parquet":
            items = _read_parquet(path, raw)
        else:
            try:
                text = decode_text(path, raw)
            except DataError as exc:
                problems.extend(exc.problems)
                continue
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
# Checks, by format
# --------------------------------------------------------------------------------------------------


def need_text(record: Record, column: str) -> str | None:
    """Why ``column`` of the record is not a non-empty string, or None: the check most formats share."""
    if column not in record.data:
        return f"missing column '{column}'"
    value = record.data[column]
    if not (isinstance(value, str) and value.strip()):
        return f"column '{column}' must be a non-empty string"
    return None


class Format(Protocol):
    """What a format module tells about its records (each module in :data:`FORMATS` is one).

    A module whose records must also fit the task's parameters defines
    ``check_for_task(record, columns, task) -> str | None`` besides :meth:`check` (looked up with
    getattr); :func:`load_checked` uses it when given the task.
    """

    #: The columns the format reads, by their ColumnMapping field (``spec.data.columns.<alias>``).
    @property
    def COLUMNS(self) -> tuple[str, ...]: ...

    def check(self, record: Record, columns: ColumnMapping) -> str | None:
        """The reason the record is unusable in this format, or None."""
        ...


def _absent_columns(records: list[Record], fmt: DataFormat, columns: ColumnMapping) -> list[str]:
    """One problem per mapped column that no record has (instead of one per record): most likely the
    spec's column mapping is wrong, or the data is not of this format."""
    present: set[str] = set()
    for record in records:
        present.update(record.data)
    found = ", ".join(sorted(present)[:20]) or "none"
    problems = []
    for attr in FORMATS[fmt].COLUMNS:
        column = getattr(columns, attr)
        if column not in present:
            alias = ColumnMapping.model_fields[attr].alias or attr
            problems.append(
                f"{records[0].where}: no record has a column '{column}' (spec.data.columns.{alias} for format "
                f"{fmt}); the records' columns: {found}"
            )
    return problems


def load_checked(
    source: DataSource,
    fmt: DataFormat,
    columns: ColumnMapping,
    *,
    task: TaskSpec | None = None,
    base_dir: str | None = None,
) -> list[Record]:
    """Read a source and check every record (against ``task`` too, where the format checks that);
    raise DataError listing every bad one, and when nothing is left to train on."""
    records, problems = read_source(source, base_dir=base_dir)
    absent = _absent_columns(records, fmt, columns) if records else []
    if absent:
        problems += absent
    else:
        module = FORMATS[fmt]
        with_task = getattr(module, "check_for_task", None)
        for record in records:
            reason = with_task(record, columns, task) if with_task and task else module.check(record, columns)
            if reason:
                problems.append(f"{record.where}: {reason}")
    if not records and not problems:
        problems.append(f"{source.uri}: no records (the data is empty)")
    if problems:
        raise DataError(problems[:MAX_REPORTED], total=len(problems))
    return records


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random fraction of the records for evaluation (at least one, and at least one
    left to train on: a DataError otherwise)."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        where = records[0].file if records else "the training data"
        raise DataError(
            [
                f"{where}: spec.data.evalSplit {fraction} holds out {n_eval} of {len(records)} record(s), "
                "leaving nothing to train on"
            ]
        )
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# The format modules build on Record, DataError and need_text above: they are imported once those exist
# (importing a format module first works too: it imports this module, which then finds it in progress).
from . import chat, classification, preference, prompt_completion, qa, text  # noqa: E402

#: Each data format's module: its columns and its record check.
FORMATS: dict[DataFormat, Format] = {
    "promptCompletion": prompt_completion,
    "chat": chat,
    "text": text,
    "classification": classification,
    "qa": qa,
    "preference": preference,
}
