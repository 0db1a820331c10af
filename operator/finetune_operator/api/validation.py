"""Validate FineTuneJob manifests and report each problem by file, line and field path.

Used by ``finetune validate``, ``finetune run`` and the operator; one code path for all three.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .base import RULE_ERROR_TYPE
from .v1alpha1 import KIND, PATTERN_HINTS, FineTuneJob

PathItem = str | int


@dataclass(frozen=True)
class FieldError:
    """One problem with a manifest: where it is and what is wrong."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return f"{where}{self.path or '<document>'}: {self.message}"


class InvalidSpec(ValueError):
    """A FineTuneJob manifest that does not validate; ``errors`` says where and why."""

    def __init__(self, errors: Sequence[FieldError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


def format_path(items: Sequence[PathItem]) -> str:
    out = ""
    for item in items:
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out += f".{item}" if out else item
    return out


def _data_path(data: Any, loc: Sequence[PathItem]) -> list[PathItem]:
    """Keep the parts of a pydantic error location that are real manifest fields.

    pydantic adds tags for union branches and validators (``int``, ``function-after[...]``); they are
    dropped by following the location through the data itself.
    """
    path: list[PathItem] = []
    current = data
    for item in loc:
        if isinstance(current, dict) and isinstance(item, str):
            path.append(item)
            current = current.get(item)
        elif isinstance(current, list) and isinstance(item, int):
            path.append(item)
            current = current[item] if 0 <= item < len(current) else None
        else:
            break
    return path


def errors_from_validation(exc: ValidationError, data: Any) -> list[FieldError]:
    """Turn a pydantic ValidationError into FieldErrors with manifest paths (messages merged per path)."""
    merged: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        path = _data_path(data, err["loc"])
        message = err["msg"]
        if err["type"] == RULE_ERROR_TYPE:
            relative = str((err.get("ctx") or {}).get("field") or "")
            path += [p for p in relative.split(".") if p]
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            message = PATTERN_HINTS.get(pattern, message)
        key = format_path(path)
        if message not in merged.setdefault(key, []):
            merged[key].append(message)
    return [FieldError(path=p, message=" or ".join(msgs)) for p, msgs in merged.items()]


def validate_object(data: Any) -> FineTuneJob:
    """Validate one manifest (already parsed). Raises InvalidSpec naming every bad field."""
    if not isinstance(data, dict):
        raise InvalidSpec([FieldError("", "a FineTuneJob manifest must be a mapping")])
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        raise InvalidSpec(errors_from_validation(exc, data)) from None


# --------------------------------------------------------------------------------------------------
# Files, with line numbers
# --------------------------------------------------------------------------------------------------


@dataclass
class Document:
    """One YAML document of a file, with the line where each field path starts."""

    file: str
    data: Any
    start_line: int
    lines: dict[tuple[PathItem, ...], int] = field(default_factory=dict)

    def line_of(self, path: str) -> int:
        """Line of the deepest existing prefix of ``path`` (1-based)."""
        items = _parse_path(path)
        while items:
            if tuple(items) in self.lines:
                return self.lines[tuple(items)]
            items.pop()
        return self.start_line


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_path(path: str) -> list[PathItem]:
    return [int(idx) if idx else name for name, idx in _PATH_TOKEN.findall(path)]


def _index_lines(node: yaml.Node, prefix: tuple[PathItem, ...], out: dict[tuple[PathItem, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path = (*prefix, key.value)
                out[path] = key.start_mark.line + 1
                _index_lines(value, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            out[path] = item.start_mark.line + 1
            _index_lines(item, path, out)


def read_documents(path: str | Path, text: str | None = None) -> Iterator[Document]:
    """Parse a (multi-document) YAML file. Raises InvalidSpec on a YAML syntax error."""
    name = str(path)
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise InvalidSpec([FieldError("", f"invalid YAML: {exc.problem}", name, line)]) from None
    for node in nodes:
        if node is None:
            continue
        data = yaml.SafeLoader("").construct_document(node)
        doc = Document(name, data, node.start_mark.line + 1)
        _index_lines(node, (), doc.lines)
        yield doc


def is_finetunejob(data: Any) -> bool:
    """A document meant as a FineTuneJob (its apiVersion is then checked like any other field)."""
    return isinstance(data, dict) and data.get("kind") == KIND


def validate_document(doc: Document) -> FineTuneJob:
    """Validate a document; errors carry the file and line."""
    try:
        return validate_object(doc.data)
    except InvalidSpec as exc:
        raise InvalidSpec([FieldError(e.path, e.message, doc.file, doc.line_of(e.path)) for e in exc.errors]) from None


def load_jobs(path: str | Path) -> list[FineTuneJob]:
    """Every FineTuneJob in a YAML file (other kinds are ignored). Raises InvalidSpec on any error."""
    jobs: list[FineTuneJob] = []
    errors: list[FieldError] = []
    for doc in read_documents(path):
        if not is_finetunejob(doc.data):
            continue
        try:
            jobs.append(validate_document(doc))
        except InvalidSpec as exc:
            errors.extend(exc.errors)
    if errors:
        raise InvalidSpec(errors)
    return jobs
