"""Validate FineTuneJob manifests and report each problem by file, line and field path.

Used by ``finetune validate``, ``finetune run`` and the operator; one code path for all three. The
parse is the API server's: strict types, camelCase field names only, null fields dropped (as the API
server prunes them), unknown fields refused, metadata checked by Kubernetes' rules. Files are read as
``kubectl`` reads them (YAML 1.1 scalars as sigs.k8s.io/yaml resolves them, duplicate keys refused), and
every problem with a file — unreadable, not UTF-8, binary, empty, not a mapping, unrendered template
syntax, broken YAML — is one ``FILE:LINE: reason`` line, never a traceback.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from .base import RULE_ERROR_TYPE, unwrap_annotation
from .sweep import KIND as SWEEP_KIND
from .sweep import FineTuneSweep, FineTuneSweepStatus, name_problem
from .v1alpha1 import API_VERSION, GROUP, KIND, PATTERN_HINTS, FineTuneJob, FineTuneJobStatus

PathItem = str | int
Loc = tuple[PathItem, ...]


@dataclass(frozen=True)
class FieldError:
    """One problem with a manifest: where it is and what is wrong.

    ``path`` is the field as the API server names it (``spec.training.maxSteps``; empty for a problem
    with the file or document as a whole); ``loc`` the same path as keys, used to find the line.
    """

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    loc: Loc | None = field(default=None, compare=False)

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


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


# --------------------------------------------------------------------------------------------------
# Messages for people
# --------------------------------------------------------------------------------------------------


def _model_at(path: Sequence[PathItem], root: type[BaseModel] = FineTuneJob) -> type[BaseModel] | None:
    """The model class of the object at ``path`` (a mapping in the manifest), if it is one."""
    tp: Any = root
    for item in path:
        tp = unwrap_annotation(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(item, str):
            by_alias = {(f.alias or name): f for name, f in tp.model_fields.items()}
            if item not in by_alias:
                return None
            tp = by_alias[item].annotation
        elif typing.get_origin(tp) is list and isinstance(item, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict and isinstance(item, str):
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = unwrap_annotation(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unknown_field_message(parent: Sequence[PathItem], key: str, root: type[BaseModel]) -> str:
    model = _model_at(parent, root)
    if model is None:
        return "unknown field"
    aliases = [f.alias or name for name, f in model.model_fields.items()]
    if key in model.model_fields and model.model_fields[key].alias not in (None, key):
        return f"unknown field: field names are camelCase, as in the CRD: {model.model_fields[key].alias}"
    if to_camel(key) in aliases:
        return f"unknown field: field names are camelCase, as in the CRD: {to_camel(key)}"
    close = difflib.get_close_matches(key, aliases, n=1, cutoff=0.75) or [
        a for a in aliases if a.lower() == key.lower()
    ]
    return f"unknown field (did you mean {close[0]}?)" if close else "unknown field"


def _looks_like(value: Any, kind: type) -> bool:
    if not isinstance(value, str):
        return False
    if kind is bool:
        return value.strip().lower() in ("true", "false")
    try:
        kind(value)
    except ValueError:
        return False
    return True


def _message(err: Any, path: Sequence[PathItem], root: type[BaseModel]) -> str:
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return _unknown_field_message(path[:-1], str(path[-1]) if path else "", root)
    if kind == "string_pattern_mismatch":
        return PATTERN_HINTS.get(str(ctx.get("pattern", "")), str(err["msg"]))
    if kind == "int_type":
        if _looks_like(value, int):
            return f"must be an integer, not a string: write {value.strip()} without quotes"
        if isinstance(value, float):
            return "must be an integer (without a decimal point)"
        return "must be an integer"
    if kind == "float_type":
        if _looks_like(value, float):
            return f"must be a number, not a string: write {value.strip()} without quotes"
        return "must be a number"
    if kind == "bool_type":
        if _looks_like(value, bool):
            return f"must be a boolean, not a string: write {value.strip().lower()} without quotes"
        return "must be a boolean (true or false)"
    if kind == "string_type":
        if isinstance(value, (bool, int, float)):
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            return f'must be a string: quote the value ("{shown}")'
        return "must be a string"
    if kind == "list_type":
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping (an object with fields)"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    return str(err["msg"])


def errors_from_validation(exc: ValidationError, data: Any, root: type[BaseModel] = FineTuneJob) -> list[FieldError]:
    """Turn a pydantic ValidationError of ``root`` into FieldErrors with manifest paths: one message
    per field."""
    found: dict[str, FieldError] = {}
    for err in exc.errors(include_url=False):
        path = _data_path(data, err["loc"])
        if err["type"] == RULE_ERROR_TYPE:
            relative = str((err.get("ctx") or {}).get("field") or "")
            path += [p for p in relative.split(".") if p]
            message = str(err["msg"])
        else:
            message = _message(err, path, root)
        key = format_path(path)
        if key not in found:
            found[key] = FieldError(path=key, message=message, loc=tuple(path))
    return list(found.values())


_INT64 = range(-(2**63), 2**63)


def as_the_api_server_sees_it(value: Any) -> Any:
    """The manifest as it reaches the API server (kubectl sends JSON, which the server decodes):

    - a field set to null is absent (the server prunes it: no CRD field is nullable);
    - a number without a fractional part is an integer (``2.0`` is sent as ``2``), but only within
      int64: a larger one is a float to the server, so never an integer.
    """
    if isinstance(value, dict):
        return {k: as_the_api_server_sees_it(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [as_the_api_server_sees_it(v) for v in value]
    if isinstance(value, float) and value.is_integer() and int(value) in _INT64:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return float(value)
    return value


def validate_object(data: Any) -> FineTuneJob:
    """Validate one manifest (already parsed). Raises InvalidSpec naming every bad field."""
    if not isinstance(data, dict):
        raise InvalidSpec([FieldError("", f"a FineTuneJob manifest must be a mapping, not {_what(data)}")])
    data = as_the_api_server_sees_it(data)
    # The API server drops a created object's status (the operator writes it): only unknown fields in
    # it are refused (strict field validation), not its values.
    status = data.pop("status", None)
    errors: list[FieldError] = []
    if status is not None:
        try:
            FineTuneJobStatus.parse_manifest(status)
        except ValidationError as exc:
            errors = [
                FieldError(format_path(["status", *(e.loc or ())]), e.message, loc=("status", *(e.loc or ())))
                for e in errors_from_validation(exc, status, FineTuneJobStatus)
                if e.message.startswith("unknown field")
            ]
    try:
        job = FineTuneJob.parse_manifest(data)
    except ValidationError as exc:
        raise InvalidSpec([*errors_from_validation(exc, data), *errors]) from None
    if errors:
        raise InvalidSpec(errors)
    return job


def validate_sweep_object(data: Any) -> FineTuneSweep:
    """Validate one FineTuneSweep manifest (already parsed), as :func:`validate_object` a job, and what
    CEL cannot check (:meth:`~.sweep.FineTuneSweepSpec.problems`). Raises InvalidSpec naming every bad field."""
    if not isinstance(data, dict):
        raise InvalidSpec([FieldError("", f"a {SWEEP_KIND} manifest must be a mapping, not {_what(data)}")])
    data = as_the_api_server_sees_it(data)
    status = data.pop("status", None)
    errors: list[FieldError] = []
    if status is not None:
        try:
            FineTuneSweepStatus.parse_manifest(status)
        except ValidationError as exc:
            errors = [
                FieldError(format_path(["status", *(e.loc or ())]), e.message, loc=("status", *(e.loc or ())))
                for e in errors_from_validation(exc, status, FineTuneSweepStatus)
                if e.message.startswith("unknown field")
            ]
    try:
        sweep = FineTuneSweep.parse_manifest(data)
    except ValidationError as exc:
        raise InvalidSpec([*errors_from_validation(exc, data, FineTuneSweep), *errors]) from None
    name = name_problem(sweep.metadata.name)
    if name:
        errors.append(FieldError("metadata.name", name, loc=("metadata", "name")))
    for loc, message in sweep.spec.problems():
        errors.append(FieldError(format_path(["spec", *loc]), message, loc=("spec", *loc)))
    if errors:
        raise InvalidSpec(errors)
    return sweep


def _what(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# Files, with line numbers
# --------------------------------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
#: PyYAML's implicit types that go-yaml v2 does not have (dates, ``=``) or reads otherwise (int and
#: float: PyYAML's also read ``1:30`` as sexagesimal 90, and need a signed exponent).
_REPLACED = {f"{_TAG}timestamp", f"{_TAG}value", f"{_TAG}int", f"{_TAG}float"}
_INT = r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
_FLOAT = (
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, resolving plain scalars as kubectl does (sigs.k8s.io/yaml, go-yaml v2):
    no timestamps (a date stays a string), no sexagesimal numbers (``1:30`` is a string), ``1e-4`` is
    a number, ``y``/``n`` are booleans."""

    bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


ManifestLoader.add_implicit_resolver(f"{_TAG}int", re.compile(_INT), list("-+0123456789"))
ManifestLoader.add_implicit_resolver(f"{_TAG}float", re.compile(_FLOAT), list("-+0123456789."))
ManifestLoader.add_implicit_resolver(f"{_TAG}bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))

#: Go template actions (Helm, kustomize-less pipelines): ``{{ .Values.x }}``, ``{{- if ... }}``. A Jinja
#: chat template (``{{ message['content'] }}``, ``{% for %}``) in spec.model.chatTemplate is not one.
_GO_TEMPLATE = re.compile(
    r"\{\{-?\s*(\.|\$|(if|else|end|range|with|include|template|define|block|toYaml|toJson|tpl|printf|quote"
    r"|default|required|lookup|nindent|indent)\b)"
)
TEMPLATE_HINT = "unrendered template syntax ({{ ... }}): render the template first (e.g. helm template)"
#: Most mapping entries and list items one file may expand to (YAML aliases can multiply them).
MAX_NODES = 200_000


@dataclass
class Document:
    """One YAML document of a file, with the line where each field path starts."""

    file: str
    data: Any
    start_line: int
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, path: str | Loc) -> int:
        """Line of the deepest existing prefix of ``path`` (1-based)."""
        items = list(path) if isinstance(path, tuple) else _parse_path(path)
        while items:
            if tuple(items) in self.lines:
                return self.lines[tuple(items)]
            items.pop()
        return self.start_line

    def error(self, error: FieldError) -> FieldError:
        """The error, placed in this document's file and line."""
        return FieldError(error.path, error.message, self.file, self.line_of(error.loc or error.path), error.loc)


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_path(path: str) -> list[PathItem]:
    return [int(idx) if idx else name for name, idx in _PATH_TOKEN.findall(path)]


class _FileProblem(Exception):
    def __init__(self, message: str, line: int | None, path: str = "", loc: Loc | None = None):
        super().__init__(message)
        self.message, self.line, self.path, self.loc = message, line, path, loc


def _index_lines(node: yaml.Node, prefix: Loc, out: dict[Loc, int], budget: list[int]) -> None:
    """Record the line of every path; refuse duplicate keys (kubectl does), naming both lines."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _FileProblem(f"too many YAML nodes (more than {MAX_NODES}, through aliases?)", node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            path = (*prefix, key.value)
            if key.value in seen:
                raise _FileProblem(
                    f"duplicate key {key.value!r} (first at line {seen[key.value]})", line, format_path(path), path
                )
            seen[key.value] = line
            out[path] = line
            _index_lines(value, path, out, budget)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            out[path] = item.start_mark.line + 1
            _index_lines(item, path, out, budget)


def _decode(name: str, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _FileProblem("not UTF-8 text: a UTF-16 file (save it as UTF-8)", 1)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise _FileProblem(f"a binary file, not YAML text (NUL byte at byte offset {nul})", raw[:nul].count(b"\n") + 1)
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _FileProblem(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} (column {column})", line
        ) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> _FileProblem:
    line: int | None = None
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        line = exc.problem_mark.line + 1
        problem = exc.problem or str(exc)
    elif isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1
        problem = f"unacceptable character #x{exc.character:04x}" if isinstance(exc.character, int) else str(exc)
    else:
        problem = str(exc).splitlines()[0]
    if "{{" in text:
        lines = text.splitlines()
        near = [n for n in range(max(1, (line or 1) - 2), (line or 1) + 1) if n <= len(lines) and "{{" in lines[n - 1]]
        if near or line is None:
            return _FileProblem(TEMPLATE_HINT, near[-1] if near else line)
    return _FileProblem(f"invalid YAML: {problem}", line)


def read_documents(path: str | Path, text: str | None = None) -> list[Document]:
    """Parse a (multi-document) YAML file. Raises InvalidSpec with one ``FILE:LINE: reason`` for a file
    that cannot be read as YAML: unreadable, not UTF-8, binary, broken YAML, duplicate keys, template
    syntax, or no document at all."""
    name = str(path)
    try:
        return _read_documents(name, path, text)
    except _FileProblem as problem:
        raise InvalidSpec([FieldError(problem.path, problem.message, name, problem.line, problem.loc)]) from None


def _read_documents(name: str, path: str | Path, text: str | None) -> list[Document]:
    if text is None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise _FileProblem(f"cannot read: {exc.strerror or exc}", None) from None
        text = _decode(name, raw)
    for number, line in enumerate(text.split("\n"), start=1):
        if _GO_TEMPLATE.search(line) and not line.lstrip().startswith("#"):
            raise _FileProblem(TEMPLATE_HINT, number)
    documents: list[Document] = []
    loader = ManifestLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = Document(name, None, node.start_mark.line + 1)
            _index_lines(node, (), doc.lines, [MAX_NODES])
            try:
                doc.data = loader.construct_document(node)
            except (ValueError, TypeError, OverflowError) as exc:
                raise _FileProblem(f"invalid YAML value: {exc}", node.start_mark.line + 1) from None
            if doc.data is not None:  # an empty document (a stray ---): kubectl skips it too
                documents.append(doc)
    except yaml.YAMLError as exc:
        raise _yaml_problem(exc, text) from None
    except RecursionError:
        raise _FileProblem("invalid YAML: nested too deeply", None) from None
    finally:
        loader.dispose()
    if not documents:
        raise _FileProblem("empty file: no YAML document (a FineTuneJob manifest is a mapping)", 1)
    return documents


# --------------------------------------------------------------------------------------------------
# Which documents are FineTuneJobs
# --------------------------------------------------------------------------------------------------

_NEAR_KIND = re.sub(r"[^a-z0-9]", "", KIND.lower())


def _near_miss(kind: str) -> bool:
    """A kind that is most likely a misspelt FineTuneJob (FinetuneJob, FineTuneJobs, fine-tune-job, ...)."""
    norm = re.sub(r"[^a-z0-9]", "", kind.lower())
    return norm.startswith(_NEAR_KIND) or difflib.SequenceMatcher(None, norm, _NEAR_KIND).ratio() >= 0.8


@dataclass
class DocumentResult:
    """What came of one document: a valid job, a document of another kind (skipped), or errors."""

    doc: Document
    job: FineTuneJob | None = None
    sweep: FineTuneSweep | None = None
    skipped: str | None = None
    errors: list[FieldError] = field(default_factory=list)


def _expand(doc: Document) -> list[Document]:
    """A ``kind: List`` document is its items (kubectl applies each); any other document is itself."""
    data = doc.data
    if not (isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list)):
        return [doc]
    out = []
    for i, item in enumerate(data["items"]):
        prefix: Loc = ("items", i)
        lines = {k[2:]: v for k, v in doc.lines.items() if k[:2] == prefix and len(k) > 2}
        out.append(Document(doc.file, item, doc.lines.get(prefix, doc.start_line), lines))
    return out


def check_document(doc: Document) -> DocumentResult:
    """Validate a document that is (or looks meant to be) a FineTuneJob; skip other kinds."""
    data = doc.data
    result = DocumentResult(doc)
    if not isinstance(data, dict):
        result.errors.append(
            doc.error(FieldError("", f"expected a Kubernetes object (a mapping), found {_what(data)}"))
        )
        return result
    kind, api_version = data.get("kind"), data.get("apiVersion")
    ours = isinstance(api_version, str) and api_version.split("/", 1)[0] == GROUP
    if kind is None and not ours:
        result.errors.append(
            doc.error(FieldError("kind", "required: every Kubernetes object names its apiVersion and kind", loc=()))
        )
        return result
    if kind == SWEEP_KIND:
        try:
            result.sweep = validate_sweep_object(data)
        except InvalidSpec as exc:
            result.errors.extend(doc.error(e) for e in exc.errors)
        return result
    if kind is not None and kind != KIND:
        if not isinstance(kind, str):
            result.errors.append(doc.error(FieldError("kind", "must be a string", loc=("kind",))))
        elif _near_miss(kind):
            message = f"{kind!r} is not a kind: did you mean {KIND} (apiVersion {API_VERSION})?"
            result.errors.append(doc.error(FieldError("kind", message, loc=("kind",))))
        elif ours:
            message = f"{GROUP} has no kind {kind!r}: the kind is {KIND}"
            result.errors.append(doc.error(FieldError("kind", message, loc=("kind",))))
        else:
            meta = data.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            result.skipped = f"{kind} {name}" if isinstance(name, str) else kind
        return result
    try:
        result.job = validate_object(data)
    except InvalidSpec as exc:
        result.errors.extend(doc.error(e) for e in exc.errors)
    return result


@dataclass
class FileResult:
    """Every document of one file, or the one problem that kept the file from being read."""

    path: str
    documents: list[DocumentResult] = field(default_factory=list)
    errors: list[FieldError] = field(default_factory=list)

    @property
    def all_errors(self) -> list[FieldError]:
        return [*self.errors, *(e for d in self.documents for e in d.errors)]


def check_file(path: str | Path) -> FileResult:
    """Read a file and check each of its documents (never raises for bad input)."""
    result = FileResult(str(path))
    try:
        docs = read_documents(path)
    except InvalidSpec as exc:
        result.errors.extend(exc.errors)
        return result
    for doc in docs:
        result.documents.extend(check_document(d) for d in _expand(doc))
    return result


def load_jobs(path: str | Path) -> list[FineTuneJob]:
    """Every FineTuneJob in a YAML file (other kinds are skipped). Raises InvalidSpec on any error."""
    result = check_file(path)
    if result.all_errors:
        raise InvalidSpec(result.all_errors)
    return [d.job for d in result.documents if d.job is not None]


def load_sweeps(path: str | Path) -> list[FineTuneSweep]:
    """Every FineTuneSweep in a YAML file (other kinds are skipped). Raises InvalidSpec on any error."""
    result = check_file(path)
    if result.all_errors:
        raise InvalidSpec(result.all_errors)
    return [d.sweep for d in result.documents if d.sweep is not None]
