"""Read dataset files into records that remember where they came from, and check them.

Every record keeps its file and line (JSONL, CSV), or its position (JSON arrays, Parquet rows), so a
bad record is reported as ``file:line: reason`` — all of them, before any training starts.
Files may be local, relative to the manifest, or on object storage (anything fsspec opens).

Files are streamed, never held whole: JSONL and CSV text in chunks of :data:`CHUNK_BYTES` cut after a
newline (a newline is never inside a UTF-8 sequence, so each chunk decodes on its own and line numbers
stay exact), Parquet a batch of rows at a time. :func:`scan` checks a source record by record and hands
the good ones to a :class:`RecordSink` (a list for :func:`load_checked`; Arrow shards for the data
pipeline, :mod:`.pipeline`), one file at a time: a file found defective late (a NUL byte, bytes that are
not UTF-8, a Parquet row group that cannot be read) gives no records at all, as if it had been read
whole first. Only a JSON array (``.json``) is read whole: use JSONL or Parquet for large data.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from finetune_operator.api.tasks import DataFormat
from finetune_operator.api.v1alpha1 import ColumnMapping, DataSource, TaskSpec

from .. import storage

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Most problems listed before giving up on reading further.
MAX_REPORTED = 50
#: Bytes read from a file at a time (a chunk grows to the end of its last line).
CHUNK_BYTES = 1 << 20
#: Parquet rows decoded at a time.
PARQUET_BATCH_ROWS = 4096


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
        return where_of(self.file, self.line, self.unit)


def where_of(file: str, line: int, unit: str) -> str:
    """Where a record is: ``file:line``, ``file:row 3``; an augmented copy's unit also holds its tag
    after a ``|`` (:mod:`.augmentation`), named after its source: ``file:12 (randomSwap 1)``."""
    unit, _, tag = unit.partition("|")
    where = f"{file}:{unit} {line}" if unit else f"{file}:{line}"
    return f"{where} ({tag})" if tag else where


class DataError(ValueError):
    """Problems with dataset records; each line of the message is ``file:line: reason``."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        #: How many problems there are (more than listed when the list was cut at MAX_REPORTED).
        self.total = max(total or 0, len(problems))
        more = self.total - len(problems)
        text = "\n".join(problems) + (f"\n... and {more} more" if more > 0 else "")
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a tokenizing worker process, it reaches the parent whole (not as its message).
        return (type(self), (self.problems, self.total))


def _file_type(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError([f"{path}: cannot tell the file type from '{suffix}'; set fileType"])
    return SUFFIXES[suffix]


def _read_jsonl(name: str, lines: Iterator[tuple[int, str]]) -> Iterator[Record | str]:
    for number, line in lines:
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


def _read_csv(name: str, lines: Iterator[str]) -> Iterator[Record | str]:
    reader = csv.DictReader(lines, strict=True)
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


def decode_text(name: str, raw: bytes) -> str:
    """UTF-8 text (a byte-order mark is dropped); a binary or otherwise encoded file is a DataError."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError([_binary(name, raw.count(b"\n", 0, nul) + 1, nul)])
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError([_not_utf8(name, line, raw[exc.start], exc.start)]) from None


def _binary(name: str, line: int, offset: int) -> str:
    return f"{name}:{line}: a binary file, not text (NUL byte at byte offset {offset})"


def _not_utf8(name: str, line: int, byte: int, offset: int) -> str:
    return f"{name}:{line}: not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} cannot be decoded"


class _TextFile:
    """A text file's decoded pieces, read :data:`CHUNK_BYTES` at a time and cut after the last newline
    of each read, so every piece decodes alone and ends at a line's end (the last one may not).

    The first defect is the one :func:`decode_text` finds in the whole file: a NUL byte anywhere (the
    rest of the file is still scanned for one after bytes that are not UTF-8), else the first byte
    that is not UTF-8. The pieces stop there and :attr:`defect` says why.
    """

    def __init__(self, name: str, fh: IO[bytes]):
        self.name = name
        self.fh = fh
        self.defect: str | None = None
        self._offset = 0  # bytes of the file before ``_pending``
        self._newlines = 0  # newlines in them
        self._pending = b""  # bytes read, not decoded yet (after the last newline read)
        self._first = True
        self._done = False

    def pieces(self) -> Iterator[str]:
        """The decoded pieces from where the last call stopped (a new call continues the file)."""
        while not self._done:
            chunk = self.fh.read(CHUNK_BYTES)
            if chunk:
                nul = chunk.find(b"\x00")
                if nul >= 0:
                    line = self._newlines + self._pending.count(b"\n") + chunk.count(b"\n", 0, nul) + 1
                    self.defect = _binary(self.name, line, self._offset + len(self._pending) + nul)
                    self._done = True
                    return
                self._pending += chunk
                cut = self._pending.rfind(b"\n") + 1
                if cut == 0:
                    continue
                head, self._pending = self._pending[:cut], self._pending[cut:]
            else:
                head, self._pending, self._done = self._pending, b"", True
                if not head:
                    return
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = self._newlines + head.count(b"\n", 0, exc.start) + 1
                self.defect = _not_utf8(self.name, line, head[exc.start], self._offset + exc.start)
                self._find_nul(head + self._pending)
                self._done = True
                return
            if self._first:
                text, self._first = text.removeprefix("\ufeff"), False
            self._offset += len(head)
            self._newlines += head.count(b"\n")
            yield text

    def _find_nul(self, data: bytes) -> None:
        """Scan ``data`` (the bytes from ``_offset`` on) and the rest of the file for a NUL byte, which
        makes the file binary whatever came before."""
        offset, newlines = self._offset, self._newlines
        while data:
            nul = data.find(b"\x00")
            if nul >= 0:
                self.defect = _binary(self.name, newlines + data.count(b"\n", 0, nul) + 1, offset + nul)
                return
            offset += len(data)
            newlines += data.count(b"\n")
            data = self.fh.read(CHUNK_BYTES)

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text) of every line: only ``\\n`` ends one (JSON strings may hold the other
        characters ``str.splitlines`` breaks at)."""
        number = 0
        for piece in self.pieces():
            parts = piece.split("\n")
            if piece.endswith("\n"):
                parts.pop()
            for line in parts:
                number += 1
                yield number, line

    def csv_lines(self) -> Iterator[str]:
        """The lines as the csv module splits a file opened with ``newline=""`` (``\\r`` too)."""
        for piece in self.pieces():
            yield from io.StringIO(piece, newline="")

    def drain(self) -> None:
        """Read the rest of the file for its defects only (records are no longer wanted)."""
        for _ in self.pieces():
            pass


class _ParquetFile:
    """A Parquet file's rows, a batch at a time; :attr:`defect` says why it cannot be read."""

    def __init__(self, name: str, fh: IO[bytes]):
        self.name = name
        self.fh = fh
        self.defect: str | None = None
        self._iterator = self._read()

    def _read(self) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            yield from pq.ParquetFile(self.fh).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.defect = f"{self.name}: not a readable Parquet file: {exc}"

    def _batches(self) -> Iterator[Any]:
        """The batches from where the last call stopped."""
        yield from self._iterator

    def records(self) -> Iterator[Record]:
        index = 0
        for batch in self._batches():
            for row in batch.to_pylist():
                index += 1
                yield Record(row, self.name, index, unit="row")

    def drain(self) -> None:
        for _ in self._batches():
            pass


class _WholeFile:
    """A JSON array file, read whole (its records' lines need the whole text)."""

    def __init__(self, name: str, fh: IO[bytes]):
        self.name = name
        self.fh = fh
        self.defect: str | None = None

    def items(self) -> Iterator[Record | str]:
        try:
            text = decode_text(self.name, self.fh.read())
        except DataError as exc:
            self.defect = exc.problems[0]
            return
        yield from _read_json(self.name, text)

    def drain(self) -> None:
        pass


def _open(path: str, base_dir: str | None) -> IO[bytes]:
    """The file, opened for reading; a missing or unreadable one is a DataError (permanent). Other
    errors (network, throttling) pass, and may be retried."""
    try:
        fs, local = storage.filesystem(path, base_dir)
        fh: IO[bytes] = fs.open(local, "rb", block_size=CHUNK_BYTES)
        return fh
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise DataError([f"{path}: cannot read: {exc.strerror or exc}"]) from None


class RecordSink(Protocol):
    """Where :func:`scan` puts the good records of a source, one file at a time: a file's records are
    kept by :meth:`commit`, or all dropped by :meth:`discard` when the file turns out to be defective."""

    def begin(self, path: str) -> None: ...

    def add(self, record: Record) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


class ListSink:
    """The good records, in a list."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._file: list[Record] = []

    def begin(self, path: str) -> None:
        self._file = []

    def add(self, record: Record) -> None:
        self._file.append(record)

    def commit(self) -> None:
        self.records.extend(self._file)
        self._file = []

    def discard(self) -> None:
        self._file = []


@dataclass
class Tally:
    """Problems of one kind: the first :data:`MAX_REPORTED` kept, all counted."""

    kept: list[str] = field(default_factory=list)
    total: int = 0

    def add(self, problem: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_REPORTED:
            self.kept.append(problem)

    def extend(self, other: Tally) -> None:
        room = MAX_REPORTED - len(self.kept)
        self.kept.extend(other.kept[: max(room, 0)])
        self.total += other.total


@dataclass
class Scan:
    """What reading and checking a source found (the good records went to the sink)."""

    uri: str
    records: int = 0  #: records read, good and bad
    first: Record | None = None  #: the first record (where a problem about every record points)
    present: set[str] = field(default_factory=set)  #: every column some record has
    read: Tally = field(default_factory=Tally)  #: files and lines that are no records
    checked: Tally = field(default_factory=Tally)  #: records their format refuses

    def merge(self, other: Scan) -> None:
        self.records += other.records
        self.first = self.first or other.first
        self.present |= other.present
        self.read.extend(other.read)
        self.checked.extend(other.checked)

    def problems(self, fmt: DataFormat, columns: ColumnMapping) -> tuple[list[str], int]:
        """Every problem, in the order they are reported (the files' first, then the records'), and
        how many there are: a mapped column no record has is one problem, instead of one per record."""
        problems, total = list(self.read.kept), self.read.total
        absent = _absent_columns(self, fmt, columns) if self.first is not None else []
        if absent:
            problems += absent
            total += len(absent)
        else:
            problems += self.checked.kept
            total += self.checked.total
        if not self.records and not total:
            problems.append(f"{self.uri}: no records (the data is empty)")
            total = 1
        return problems[:MAX_REPORTED], total


def _reader(
    path: str, kind: str, fh: IO[bytes]
) -> tuple[Iterator[Record | str], _TextFile | _ParquetFile | _WholeFile]:
    if kind == "parquet":
        parquet = _ParquetFile(path, fh)
        return parquet.records(), parquet
    if kind == "json":
        whole = _WholeFile(path, fh)
        return whole.items(), whole
    text = _TextFile(path, fh)
    return (_read_csv(path, text.csv_lines()) if kind == "csv" else _read_jsonl(path, text.lines())), text


def scan(
    source: DataSource,
    fmt: DataFormat,
    columns: ColumnMapping,
    *,
    task: TaskSpec | None = None,
    base_dir: str | None = None,
    sink: RecordSink | None = None,
) -> Scan:
    """Read a source file by file in bounded memory, check every record with its format's module
    (against ``task`` too, where the format checks that), and hand the good ones to ``sink``; stop
    after ``source.maxSamples`` records. Problems are collected, not raised (:meth:`Scan.problems`),
    except a file that cannot be read at all (a DataError)."""
    module = FORMATS[fmt]
    with_task = getattr(module, "check_for_task", None) if task is not None else None
    found = Scan(source.uri)
    files = storage.list_files(source.uri, base_dir=base_dir, suffixes=tuple(SUFFIXES))
    if not files:
        fs, local = storage.filesystem(source.uri, base_dir)
        if fs.exists(local):
            found.read.add(f"{source.uri}: no data files found (looked for {', '.join(SUFFIXES)})")
        else:
            found.read.add(f"{source.uri}: no such file or directory")
    limit = source.max_samples
    for path in files:
        kind = _file_type(path, source.file_type)
        this = Scan(source.uri)
        if sink is not None:
            sink.begin(path)
        full = False
        with _open(path, base_dir) as fh:
            items, reader = _reader(path, kind, fh)
            for item in items:
                if isinstance(item, str):
                    this.read.add(item)
                    continue
                this.records += 1
                if this.first is None:
                    this.first = item
                this.present.update(item.data)
                reason = with_task(item, columns, task) if with_task else module.check(item, columns)
                if reason:
                    this.checked.add(f"{item.where}: {reason}")
                elif sink is not None:
                    sink.add(item)
                if limit is not None and found.records + this.records >= limit:
                    full = True
                    reader.drain()  # a defect later in the file still drops all of it
                    break
        if reader.defect is not None:
            if sink is not None:
                sink.discard()
            found.read.add(reader.defect)
            continue
        if sink is not None:
            sink.commit()
        found.merge(this)
        if full:
            break
    return found


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


def _absent_columns(found: Scan, fmt: DataFormat, columns: ColumnMapping) -> list[str]:
    """One problem per mapped column that no record has (instead of one per record): most likely the
    spec's column mapping is wrong, or the data is not of this format."""
    assert found.first is not None
    shown = ", ".join(sorted(found.present)[:20]) or "none"
    problems = []
    for attr in FORMATS[fmt].COLUMNS:
        column = getattr(columns, attr)
        if column not in found.present:
            alias = ColumnMapping.model_fields[attr].alias or attr
            problems.append(
                f"{found.first.where}: no record has a column '{column}' (spec.data.columns.{alias} for format "
                f"{fmt}); the records' columns: {shown}"
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
    raise DataError listing every bad one, and when nothing is left to train on. The records are
    returned in a list: for the few a prediction reads (training streams them, :mod:`.pipeline`)."""
    sink = ListSink()
    problems, total = scan(source, fmt, columns, task=task, base_dir=base_dir, sink=sink).problems(fmt, columns)
    if problems:
        raise DataError(problems, total=total)
    return sink.records


def split_indices(count: int, fraction: float, seed: int, *, where: str) -> tuple[list[int], list[int]]:
    """Which of ``count`` records train and which are held out for evaluation: a seeded random
    ``fraction`` (at least one, and at least one left to train on: a DataError naming ``where``
    otherwise), each list in record order."""
    if fraction <= 0:
        return list(range(count)), []
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(count * fraction))
    if n_eval >= count:
        raise DataError(
            [
                f"{where}: spec.data.evalSplit {fraction} holds out {n_eval} of {count} record(s), "
                "leaving nothing to train on"
            ]
        )
    held = sorted(order[:n_eval])
    del order
    kept = set(held)
    return [i for i in range(count) if i not in kept], held


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random fraction of the records for evaluation (:func:`split_indices`)."""
    where = records[0].file if records else "the training data"
    train, held = split_indices(len(records), fraction, seed, where=where)
    return [records[i] for i in train], [records[i] for i in held]


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
