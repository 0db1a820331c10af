"""The data pipeline: records checked in a stream, tokenized in parallel, and cached as Arrow shards.

One function, :func:`prepare`, turns a job's data into the token rows it trains on, and the statistics
of them (:class:`DataStats`); the recipes call it, and so does the preflight (the operator's CPU Job,
``finetune plan``), so both see the very same rows. It runs in two phases, because bad data must be
refused before any model file is opened and the tokenizer is one of them:

1. :func:`check` (:meth:`~..harness.Run.read_data`, before the process group, on every rank, as a
   bad record must end every rank with exit 3): each source is read file by file in bounded memory and
   every record checked by its format's module (:func:`.records.scan`, exact ``file:line`` of every
   problem); the rank that builds (below) writes the good records into Arrow shards (memory-mapped,
   the record as JSON beside its file and line). Skipped when a committed cache of the same data exists:
   that data was checked already.
2. :func:`prepare` with the tokenizer: on a cache hit, the shards are read (memory-mapped); otherwise
   the builder tokenizes with ``datasets.Dataset.map(batched=True, num_proc=...)`` over the available
   cores (each format's batched ``tokenize`` over the records' columns: :mod:`.prompt_completion`,
   :mod:`.chat`, :mod:`.text`, :mod:`.classification`, :mod:`.qa`), packs in order (a stream,
   :mod:`.packing`), writes the splits with ``save_to_disk``, uploads them and commits.

The tokenized cache lives beside the checkpoints, at ``<checkpoint_dir>/data-cache/<data>/<tokenizer>/``
(through the same fsspec filesystems as the checkpoints, :mod:`..storage`), where ``<data>`` hashes the
data files (a remote file's ETag or version and size; a local file's content sha256), ``spec.data``
(format, columns, maxSeqLength, packing, completionOnlyLoss, systemPrompt, evalSplit, sources), the
task and its parameters and the seed, and ``<tokenizer>`` hashes the tokenizer as loaded (its whole
serialized state: vocabulary, added tokens, normalizer, post-processor; the chat template and special
tokens). It holds ``train/``, ``eval/``, ``general/`` (``eval_questions/`` for QA, ``eval_prompts/`` for
causal-LM prompt formats: :mod:`.eval_prompts`), ``meta.json``
(the statistics that do not depend on the world size) and ``COMMITTED``, written last, listing every
file with its size: a cache without it (a builder killed mid-write) is never read, and is replaced by
the next build. Deleting a cache is always safe: the next run builds it again. Without a checkpoint
directory the cache is the work directory's.

Who builds: global rank 0 when there is a checkpoint directory (shared by every node, as the checkpoint
protocol assumes), else each node's local rank 0 in its work directory. The other ranks do not take
part in a collective while it builds (a long tokenization would run into the process group's timeout,
the NCCL timeouts reported during rank-0 preprocessing elsewhere): they poll for the ``COMMITTED``
marker of their node's copy; each other node's local rank 0 downloads the committed cache into its work
directory first. A builder that fails ends its own node's ranks through torchrun, and the Job (every
pod) through its failure policy. Every rank then reads all of the rows, memory-mapped: the Trainer's
sampler shards them, exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from finetune_operator.api.tasks import PROMPT_FORMATS, DataFormat, task_row
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import DataSource, DataSpec, FineTuneJobSpec, QAParams, TaskSpec
from transformers import PreTrainedTokenizerBase

from .. import storage
from ..distributed import World
from . import classification, eval_prompts, examples, preference, qa
from .examples import Example
from .packing import iter_blocks, iter_packed
from .records import FORMATS, DataError, Record, RecordSink, scan, split_indices, where_of
from .replay import replay_rows_per_epoch

log = logging.getLogger(__name__)

#: Bumped when the cache's layout or content changes: older caches are then never read.
VERSION = 2  # 2: eval_prompts/
CACHE_DIR = "data-cache"
COMMITTED = "COMMITTED"
META = "meta.json"
#: Rows per Arrow record batch written, and per batch a tokenizing worker is handed.
BATCH_ROWS = 1000
#: A tokenizing worker process is started for every so many records (up to the available cores).
ROWS_PER_PROCESS = 4000
#: How often a rank waiting for the builder looks for the commit marker.
POLL_SECONDS = 0.5
#: The columns of a checked record in its Arrow shard.
_RECORD_COLUMNS: dict[str, pa.DataType] = {
    "file": pa.string(),
    "line": pa.int64(),
    "unit": pa.string(),
    "record": pa.large_string(),
}
RECORD_SCHEMA = pa.schema(_RECORD_COLUMNS)

_IDS = datasets.List(datasets.Value("int32"))


# --------------------------------------------------------------------------------------------------
# Phase 1: checked records, in Arrow shards
# --------------------------------------------------------------------------------------------------


class ArrowSink:
    """A :class:`~.records.RecordSink` that writes the good records into Arrow stream files, one per
    data file (a defective file's is deleted), in batches of :data:`BATCH_ROWS`."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[Path] = []
        self._path: Path | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._rows: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
        self._written = 0

    def begin(self, path: str) -> None:
        self._path = self.directory / f"{len(self.shards):05d}.arrow"
        self._writer = pa.ipc.new_stream(str(self._path), RECORD_SCHEMA)
        self._written = 0

    def add(self, record: Record) -> None:
        self._rows["file"].append(record.file)
        self._rows["line"].append(record.line)
        self._rows["unit"].append(record.unit)
        self._rows["record"].append(json.dumps(record.data, ensure_ascii=False, default=str))
        if len(self._rows["record"]) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows["record"]:
            assert self._writer is not None
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._rows, schema=RECORD_SCHEMA))
            self._written += len(self._rows["record"])
            self._rows = {name: [] for name in RECORD_SCHEMA.names}

    def _close(self) -> Path:
        assert self._writer is not None and self._path is not None
        self._writer.close()
        self._writer = None
        return self._path

    def commit(self) -> None:
        self._flush()
        path = self._close()
        if self._written:
            self.shards.append(path)
        else:
            path.unlink()

    def discard(self) -> None:
        self._rows = {name: [] for name in RECORD_SCHEMA.names}
        self._close().unlink()

    def dataset(self) -> datasets.Dataset | None:
        """The committed records, memory-mapped (None when there are none)."""
        if not self.shards:
            return None
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in self.shards])


class RecordView(Sequence[Record]):
    """Checked records read back from their Arrow shards, as :class:`~.records.Record` objects."""

    def __init__(self, dataset: datasets.Dataset | None):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if self.dataset is None or not -len(self) <= index < len(self):
            raise IndexError(index)
        return _record(self.dataset[index % len(self)])

    def __iter__(self) -> Iterator[Record]:
        if self.dataset is None:
            return
        for batch in self.dataset.iter(batch_size=BATCH_ROWS):
            for file, line, unit, text in zip(
                batch["file"], batch["line"], batch["unit"], batch["record"], strict=True
            ):
                yield Record(json.loads(text), file, line, unit)


def _record(row: dict[str, Any]) -> Record:
    return Record(json.loads(row["record"]), row["file"], row["line"], row["unit"])


@dataclass(frozen=True)
class Source:
    """One data source of a run: its records' format, and the task they are checked against."""

    source: DataSource
    fmt: DataFormat
    task: TaskSpec | None


def sources(config: TrainerConfig) -> dict[str, Source]:
    """The run's sources by name: ``train``, ``eval`` (a file of its own), ``general`` (general
    text, ``training.forgetting.generalEval``), ``replay`` (``forgetting.replay.source``) and
    ``fisher`` (``forgetting.ewc.fisherData``), the last three plain text."""
    spec = config.spec
    data = spec.data
    found = {"train": Source(data.train, data.format, spec.task)}
    if data.eval is not None:
        found["eval"] = Source(data.eval, data.format, spec.task)
    forgetting = spec.training.forgetting
    if forgetting is not None and forgetting.general_eval is not None:
        found["general"] = Source(forgetting.general_eval, "text", None)
    if forgetting is not None and forgetting.replay is not None:
        found["replay"] = Source(forgetting.replay.source, "text", None)
    if forgetting is not None and forgetting.ewc is not None and forgetting.ewc.fisher_data is not None:
        found["fisher"] = Source(forgetting.ewc.fisher_data, "text", None)
    return found


@dataclass
class Checked:
    """A run's data after phase 1: its cache key, and (on the rank that builds, unless a committed cache
    made reading unnecessary) the checked records of each source and the eval split."""

    data_key: str
    #: A committed cache of this very data exists: it was not read again.
    known_valid: bool
    has_eval: bool
    by_source: dict[str, datasets.Dataset | None] = field(default_factory=dict)
    #: (train, eval) record indices when ``evalSplit`` holds out part of the training records.
    split: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None

    @property
    def has_records(self) -> bool:
        return bool(self.by_source)

    def records(self, name: str) -> datasets.Dataset | None:
        """The checked records of ``train``, ``eval`` (the eval file's, or the held-out ones) or
        ``general``, memory-mapped."""
        if self.split is not None and name in ("train", "eval"):
            everything = self.by_source.get("train")
            assert everything is not None
            return everything.select(self.split[0 if name == "train" else 1])
        return self.by_source.get(name)

    @property
    def train(self) -> RecordView:
        return RecordView(self.records("train"))

    @property
    def eval(self) -> RecordView:
        return RecordView(self.records("eval"))

    @property
    def general(self) -> RecordView:
        return RecordView(self.records("general"))


def is_builder(config: TrainerConfig, world: World) -> bool:
    """Whether this rank builds the tokenized cache (see the module docstring)."""
    return world.is_main if config.checkpoint_dir else world.is_local_main


def check(config: TrainerConfig, world: World | None = None, *, reread: bool = False) -> Checked:
    """Phase 1: read and check every source (the first one with problems raises a DataError listing
    them), and hold out the eval split. Nothing is read when a committed cache of this data exists,
    unless ``reread``."""
    world = world or World.from_env()
    spec = config.spec
    data = spec.data
    named = sources(config)
    key = data_key(config, named)
    has_eval = data.eval is not None or data.eval_split > 0
    if not reread and _Cache.data_known_valid(config, key):
        return Checked(key, known_valid=True, has_eval=has_eval)
    directory = Path(config.work_dir) / CACHE_DIR / "records"
    writes = is_builder(config, world)
    if writes:
        shutil.rmtree(directory, ignore_errors=True)
    found: dict[str, datasets.Dataset | None] = {}
    counts: dict[str, int] = {}
    first_file = ""
    for name, src in named.items():
        sink: ArrowSink | None = ArrowSink(directory / name) if writes else None
        result = scan(src.source, src.fmt, data.columns, task=src.task, base_dir=config.base_dir, sink=sink)
        problems, total = result.problems(src.fmt, data.columns)
        if problems:
            raise DataError(problems, total=total)
        counts[name] = result.records
        if name == "train" and result.first is not None:
            first_file = result.first.file
        found[name] = sink.dataset() if sink is not None else None
    split = None
    if data.eval is None and data.eval_split > 0:
        train, held = split_indices(counts["train"], data.eval_split, spec.training.seed, where=first_file)
        split = (np.asarray(train, dtype=np.int64), np.asarray(held, dtype=np.int64))
    return Checked(key, known_valid=False, has_eval=has_eval, by_source=found if writes else {}, split=split)


# --------------------------------------------------------------------------------------------------
# Cache keys
# --------------------------------------------------------------------------------------------------

#: Fields of a remote file's listing that change with its content, in order of preference.
VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "version_id", "LastModified", "last_modified")


def file_fingerprint(path: str, base_dir: str | None) -> list[Any]:
    """What identifies a data file's content: a remote file's ETag (or version) and size, a local
    file's size and sha256 (an unreadable file's error: the check reports it)."""
    try:
        fs, local = storage.filesystem(path, base_dir)
        info = fs.info(local)
        if storage.is_remote(path):
            for name in VERSION_FIELDS:
                if info.get(name):
                    return [path, info.get("size"), name, str(info[name])]
        with fs.open(local, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        return [path, info.get("size"), "sha256", digest]
    except OSError as exc:
        return [path, "unreadable", str(exc)]


def data_files(config: TrainerConfig, named: dict[str, Source] | None = None) -> dict[str, list[list[Any]]]:
    """Every data file of the run's sources (``named``, default :func:`sources`), by source name, as
    its :func:`file_fingerprint`."""
    return {
        name: [
            file_fingerprint(p, config.base_dir)
            for p in storage.list_files(src.source.uri, base_dir=config.base_dir, suffixes=tuple(_suffixes()))
        ]
        for name, src in (sources(config) if named is None else named).items()
    }


def data_key(config: TrainerConfig, named: dict[str, Source]) -> str:
    """The hash of everything the checked, tokenized rows depend on but the tokenizer (module docstring)."""
    spec = config.spec
    files = data_files(config, named)
    described = {
        "version": VERSION,
        "data": spec.data.model_dump(mode="json", by_alias=True),
        "task": spec.task.model_dump(mode="json", by_alias=True),
        "seed": spec.training.seed,
        "sources": {name: src.source.model_dump(mode="json", by_alias=True) for name, src in named.items()},
        "files": files,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _suffixes() -> tuple[str, ...]:
    from .records import SUFFIXES

    return tuple(SUFFIXES)


def tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    """The hash of a tokenizer as loaded: its serialized state (a fast tokenizer's ``tokenizer.json``:
    vocabulary, merges, added tokens, normalizer, post-processor; a slow one's vocabulary), its chat
    template and special tokens."""
    digest = hashlib.sha256()
    described = {
        "class": type(tokenizer).__name__,
        "fast": tokenizer.is_fast,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {
            name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk", "sep", "cls")
        },
        "added": {str(k): str(v) for k, v in sorted(tokenizer.added_tokens_decoder.items())},
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    if tokenizer.is_fast:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The cache: where it is, committed or not, upload and download
# --------------------------------------------------------------------------------------------------


class _Cache:
    """One tokenized cache: its directory in the store (``uri``; None without a checkpoint directory)
    and its local copy (the store's directory itself when the store is local)."""

    def __init__(self, config: TrainerConfig, data: str, tokenizer: str):
        self.fs, root = _root_fs(config)
        self.path = f"{root}/{data}/{tokenizer}"
        self.remote = storage.is_remote(_root_uri(config))
        self.uri = f"{_root_uri(config)}/{data}/{tokenizer}" if config.checkpoint_dir else None
        self.local = Path(config.work_dir) / CACHE_DIR / data / tokenizer if self.remote else Path(self.path)

    @staticmethod
    def data_known_valid(config: TrainerConfig, data: str) -> bool:
        """Whether a committed cache of this data exists (with any tokenizer)."""
        fs, root = _root_fs(config)
        try:
            return bool(fs.glob(f"{root}/{data}/*/{COMMITTED}"))
        except OSError:
            return False

    def local_committed(self) -> bool:
        return _verified(_local_fs(), str(self.local))

    def remote_committed(self) -> bool:
        self.fs.invalidate_cache()
        return _verified(self.fs, self.path)

    def publish(self, staging: Path) -> None:
        """Make the built ``staging`` directory the cache: moved into the local place, uploaded (when the
        store is remote), committed there and then locally; each marker written last."""
        files = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        marker = json.dumps({"version": VERSION, "files": files}, indent=1).encode()
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(self.local)
        if self.remote:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)  # a partial cache of a builder killed mid-upload
            self.fs.put(str(self.local).rstrip("/") + "/", self.path.rstrip("/") + "/", recursive=True)
            self.fs.pipe_file(f"{self.path}/{COMMITTED}", marker)
        _write_atomic(self.local / COMMITTED, marker)

    def download(self) -> None:
        """Copy the committed cache from the store into the local place, verify it, commit it there."""
        marker = self.fs.cat_file(f"{self.path}/{COMMITTED}")
        partial = self.local.parent / f".{self.local.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.fs.get(self.path.rstrip("/") + "/", str(partial), recursive=True)
        (partial / COMMITTED).unlink(missing_ok=True)
        shutil.rmtree(self.local, ignore_errors=True)
        partial.rename(self.local)
        _write_atomic(self.local / COMMITTED, marker)
        if not self.local_committed():
            raise OSError(f"the data cache {self.uri} changed while it was downloaded")


def _root_uri(config: TrainerConfig) -> str:
    if config.checkpoint_dir:
        return f"{config.checkpoint_dir.rstrip('/')}/{CACHE_DIR}"
    return str(Path(config.work_dir) / CACHE_DIR)


def _root_fs(config: TrainerConfig) -> tuple[Any, str]:
    c = config.spec.checkpoint
    fs, root = storage.filesystem(_root_uri(config), config.base_dir, endpoint_url=c.endpoint_url, region=c.region)
    return fs, root.rstrip("/")


def _local_fs() -> Any:
    return storage.filesystem("/")[0]


def _verified(fs: Any, path: str) -> bool:
    """Whether the cache at ``path`` is committed: its marker parses, is of this version, and every
    file it lists is there with its size."""
    try:
        marker = json.loads(fs.cat_file(f"{path}/{COMMITTED}"))
        if marker.get("version") != VERSION:
            return False
        sizes = {
            str(name)[len(path.rstrip("/")) + 1 :]: info.get("size")
            for name, info in fs.find(path, detail=True).items()
        }
    except (OSError, ValueError):
        return False
    return all(sizes.get(name) == size for name, size in marker["files"].items())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wait(ready: Any, what: str) -> None:
    """Poll ``ready()`` until it is true (the builder's failure ends this process from outside)."""
    started = last = time.monotonic()
    while not ready():
        time.sleep(POLL_SECONDS)
        if time.monotonic() - last > 60:
            last = time.monotonic()
            log.warning("still waiting for %s (%.0f s)", what, last - started)


# --------------------------------------------------------------------------------------------------
# Phase 2: tokenization, by task
# --------------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup CPU quota (a pod's limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def _columns_of(texts: Sequence[str], fmt: DataFormat, data: DataSpec) -> dict[str, list[Any]]:
    """The format's columns (by ColumnMapping attribute) of a batch of records stored as JSON."""
    rows = [json.loads(text) for text in texts]
    return {attr: [row[getattr(data.columns, attr)] for row in rows] for attr in FORMATS[fmt].COLUMNS}


def _causal_batch(
    texts: list[str], *, tokenizer: PreTrainedTokenizerBase, data: DataSpec, cut: bool
) -> dict[str, list[Any]]:
    rows = examples.tokenizer_for(data.format)(_columns_of(texts, data.format, data), tokenizer, data)
    lengths = [len(ids) for ids in rows["input_ids"]]
    if cut:
        n = data.max_seq_length
        rows = {"input_ids": [ids[:n] for ids in rows["input_ids"]], "labels": [lab[:n] for lab in rows["labels"]]}
    return {**rows, "length": lengths}


def _classification_batch(
    texts: list[str], *, tokenizer: PreTrainedTokenizerBase, data: DataSpec, task: TaskSpec
) -> dict[str, list[Any]]:
    rows = classification.tokenize(_columns_of(texts, "classification", data), tokenizer, data, task)
    n = data.max_seq_length
    return {
        "input_ids": [ids[:n] for ids in rows["input_ids"]],
        "labels": rows["labels"],
        "length": [len(ids) for ids in rows["input_ids"]],
    }


def _preference_batch(texts: list[str], *, tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = preference.tokenize(_columns_of(texts, "preference", data), tokenizer, data)
    rows["length"] = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True)
    ]
    return rows


def _wheres(files: list[str], lines: list[int], units: list[str]) -> list[str]:
    return [where_of(f, n, u) for f, n, u in zip(files, lines, units, strict=True)]


def _qa_batch(
    texts: list[str],
    files: list[str],
    lines: list[int],
    units: list[str],
    indices: list[int],
    *,
    tokenizer: PreTrainedTokenizerBase,
    data: DataSpec,
    params: QAParams,
) -> dict[str, list[Any]]:
    columns = _columns_of(texts, "qa", data)
    windows, problems = qa.tokenize(
        columns, tokenizer, data, params, wheres=_wheres(files, lines, units), first=indices[0]
    )
    if problems:
        none = [None] * len(problems)
        return {
            "input_ids": none,
            "offsets": none,
            "question": none,
            "start_positions": none,
            "end_positions": none,
            "problem": problems,
        }
    return {
        "input_ids": [w.input_ids for w in windows],
        "offsets": [[list(s) if s is not None else None for s in w.offsets] for w in windows],
        "question": [w.question for w in windows],
        "start_positions": [w.start for w in windows],
        "end_positions": [w.end for w in windows],
        "problem": [None] * len(windows),
    }


def _qa_records_batch(
    texts: list[str],
    files: list[str],
    lines: list[int],
    units: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    data: DataSpec,
) -> dict[str, list[Any]]:
    """Per record: its question and whole context's token count (what a window is cut from), whether
    it is unanswerable, and what evaluation decodes against (id, context, gold answer texts)."""
    columns = _columns_of(texts, "qa", data)
    pairs = tokenizer(list(columns["question"]), list(columns["context"]))["input_ids"]
    return {
        "length": [len(ids) for ids in pairs],
        "unanswerable": [not a["text"] for a in columns["answers"]],
        "id": _wheres(files, lines, units),
        "context": columns["context"],
        "answers": [list(a["text"]) for a in columns["answers"]],
    }


_CAUSAL = datasets.Features({"input_ids": _IDS, "labels": _IDS, "length": datasets.Value("int64")})
_PREFERENCE = datasets.Features(
    {"prompt_ids": _IDS, "chosen_ids": _IDS, "rejected_ids": _IDS, "length": datasets.Value("int64")}
)
_QA_WINDOWS = datasets.Features(
    {
        "input_ids": _IDS,
        "offsets": datasets.List(datasets.List(datasets.Value("int32"))),
        "question": datasets.Value("int64"),
        "start_positions": datasets.Value("int64"),
        "end_positions": datasets.Value("int64"),
        "problem": datasets.Value("string"),
    }
)
_QA_RECORDS = datasets.Features(
    {
        "length": datasets.Value("int64"),
        "unanswerable": datasets.Value("bool"),
        "id": datasets.Value("string"),
        "context": datasets.Value("large_string"),
        "answers": datasets.List(datasets.Value("string")),
    }
)


def _classification_features(task: TaskSpec) -> datasets.Features:
    params = task.classification
    assert params is not None
    label = datasets.List(datasets.Value("float32")) if params.multi_label else datasets.Value("int64")
    return datasets.Features({"input_ids": _IDS, "labels": label, "length": datasets.Value("int64")})


class _Mapper:
    """Runs the batched tokenizations as ``Dataset.map`` over the available cores, writing each result
    into the build directory (under names of its own, never datasets' fingerprint cache)."""

    def __init__(self, work: Path, key: str):
        self.work = work
        self.key = key
        self.cpus = available_cpus()
        self.calls = 0

    def __call__(
        self,
        records: datasets.Dataset,
        name: str,
        function: Any,
        features: datasets.Features,
        *,
        input_columns: list[str],
        with_indices: bool = False,
        **kwargs: Any,
    ) -> datasets.Dataset:
        self.calls += 1
        processes = min(self.cpus, max(1, len(records) // ROWS_PER_PROCESS))
        return records.map(
            function,
            batched=True,
            batch_size=BATCH_ROWS,
            input_columns=input_columns,
            with_indices=with_indices,
            remove_columns=records.column_names,
            fn_kwargs=kwargs,
            features=features,
            num_proc=processes if processes > 1 else None,
            cache_file_name=str(self.work / f"{name}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"{self.key}-{name}",
            writer_batch_size=BATCH_ROWS,
        )


def _write_rows(rows: Iterator[Example], path: Path) -> datasets.Dataset:
    """Packed rows (``input_ids``, ``labels``, ``position_ids``) written as they come, memory-mapped back."""
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "position_ids")])
    batch: dict[str, list[list[int]]] = {name: [] for name in schema.names}
    with pa.ipc.new_stream(str(path), schema) as writer:
        for row in rows:
            batch["input_ids"].append(row.input_ids)
            batch["labels"].append(row.labels)
            batch["position_ids"].append(row.position_ids or [])
            if len(batch["input_ids"]) >= BATCH_ROWS:
                writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
                batch = {name: [] for name in schema.names}
        if batch["input_ids"]:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
    return datasets.Dataset.from_file(str(path))


def _iter_column(dataset: datasets.Dataset, *columns: str) -> Iterator[tuple[Any, ...]]:
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        yield from zip(*(batch[c] for c in columns), strict=True)


def _row_lengths(dataset: datasets.Dataset, column: str = "input_ids") -> np.ndarray[Any, Any]:
    """The token count of every row (of its ``column`` of token ids)."""
    table = dataset.with_format("arrow")[:]
    return np.asarray(pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False), dtype=np.int64)


def _int_column(dataset: datasets.Dataset, column: str) -> np.ndarray[Any, Any]:
    table = dataset.with_format("arrow")[:]
    return np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def _forgetting_rows(
    spec: FineTuneJobSpec,
    checked: Checked,
    out: dict[str, datasets.Dataset],
    mapper: _Mapper,
    tokenizer: PreTrainedTokenizerBase,
    work: Path,
) -> None:
    """A causal-LM run's ``replay`` rows and the EWC Fisher's ``fisher`` rows into ``out``, plain text
    (loss on every token). Replay rows are shaped like the training rows: documents packed into blocks
    of maxSeqLength when training packs, else each cut to it. The Fisher's samples are records, each
    cut to maxSeqLength: fisherData's, else the replay source's (without either, :mod:`..ewc` takes the
    general-eval or the training rows)."""
    data = spec.data
    plain: dict[str, Any] = {"tokenizer": tokenizer, "data": data.model_copy(update={"format": "text"})}
    replay_records = checked.records("replay")
    if replay_records is not None:
        replay = mapper(
            replay_records,
            "replay-rows",
            _causal_batch,
            _CAUSAL,
            input_columns=["record"],
            cut=not data.packing,
            **plain,
        )
        if data.packing:
            blocks = iter_blocks((ids for (ids,) in _iter_column(replay, "input_ids")), data.max_seq_length)
            replay = _write_rows(blocks, work / "replay-packed.arrow")
        out["replay"] = replay
    forgetting = spec.training.forgetting
    fisher_records = checked.records("fisher")
    fisher_records = fisher_records if fisher_records is not None else replay_records
    if forgetting is not None and forgetting.ewc is not None and fisher_records is not None:
        out["fisher"] = mapper(
            fisher_records, "fisher-rows", _causal_batch, _CAUSAL, input_columns=["record"], cut=True, **plain
        )


def nearest_rank(sorted_values: np.ndarray[Any, Any], q: float) -> int:
    """The ``q`` quantile (0 < q <= 1) of sorted values by the nearest-rank definition: the smallest value
    with at least ``q`` of the values at or below it (0 for no values)."""
    if not len(sorted_values):
        return 0
    return int(sorted_values[max(math.ceil(q * len(sorted_values)), 1) - 1])


def _tokenize_all(
    config: TrainerConfig, tokenizer: PreTrainedTokenizerBase, checked: Checked, work: Path, mapper: _Mapper
) -> tuple[dict[str, datasets.Dataset], dict[str, Any]]:
    """Every split's rows and the statistics of the training data (:class:`DataStats`'s, but the steps)."""
    spec = config.spec
    data = spec.data
    recipe = task_row(spec.task.type).recipe
    train_records = checked.records("train")
    assert train_records is not None
    if data.augmentation is not None:  # the training records only, before they are tokenized
        from .augmentation import augment

        train_records = augment(config, train_records, work, mapper)
    eval_records = checked.records("eval")
    general_records = checked.records("general")
    out: dict[str, datasets.Dataset] = {}
    meta: dict[str, Any] = {
        "records": {
            "train": len(train_records),
            "eval": len(eval_records) if eval_records is not None else 0,
            "general": len(general_records) if general_records is not None else 0,
            **{name: len(r) for name in ("replay", "fisher") if (r := checked.records(name)) is not None},
        },
        "allow_null": False,
    }
    cut_at = data.max_seq_length
    if recipe in ("causal_lm", "distill"):  # distillation trains on the causal-LM rows
        if data.format == "chat":
            from .chat import require_fast

            first = train_records[0]
            require_fast(tokenizer, f"{first['file']}:{first['line']}")
        documents = data.packing and data.format == "text"
        kw: dict[str, Any] = {"tokenizer": tokenizer, "data": data}
        train = mapper(
            train_records, "train-rows", _causal_batch, _CAUSAL, input_columns=["record"], cut=not documents, **kw
        )
        lengths = _int_column(train, "length")
        truncated = 0 if documents else int((lengths > cut_at).sum())
        if data.packing:
            if documents:
                rows = iter_blocks((ids for (ids,) in _iter_column(train, "input_ids")), cut_at)
            else:
                rows = iter_packed(
                    (Example(ids, labels) for ids, labels in _iter_column(train, "input_ids", "labels")), cut_at
                )
            train = _write_rows(rows, work / "train-packed.arrow")
        row_tokens = _row_lengths(train)
        out["train"] = train
        if eval_records is not None:
            out["eval"] = mapper(
                eval_records, "eval-rows", _causal_batch, _CAUSAL, input_columns=["record"], cut=True, **kw
            )
            if data.format in PROMPT_FORMATS:  # what the generation metrics complete
                where = ["record", "file", "line", "unit"]
                out["eval_prompts"] = mapper(
                    eval_records, "eval-prompts", eval_prompts.batch, eval_prompts.FEATURES, input_columns=where, **kw
                )
        if general_records is not None:
            text = data.model_copy(update={"format": "text"})
            out["general"] = mapper(
                general_records,
                "general-rows",
                _causal_batch,
                _CAUSAL,
                input_columns=["record"],
                tokenizer=tokenizer,
                data=text,
                cut=True,
            )
        _forgetting_rows(spec, checked, out, mapper, tokenizer, work)
        if "replay" in out:  # an epoch's rows: the training rows and the replay rows mixed in (.replay)
            forgetting = spec.training.forgetting
            assert forgetting is not None and forgetting.replay is not None
            added = replay_rows_per_epoch(len(row_tokens), forgetting.replay.ratio)
            row_tokens = np.concatenate([row_tokens, np.resize(_row_lengths(out["replay"]), added)])
    elif recipe == "classification":
        params = spec.task.classification
        assert params is not None
        features = _classification_features(spec.task)
        kw = {"tokenizer": tokenizer, "data": data, "task": spec.task}
        train = mapper(train_records, "train-rows", _classification_batch, features, input_columns=["record"], **kw)
        lengths = _int_column(train, "length")
        truncated = int((lengths > cut_at).sum())
        row_tokens = np.minimum(lengths, cut_at)
        if params.resampling != "none":
            from .sampling import ClassBalancedSampler

            classes = _int_column(train, "labels").tolist()  # single-label: the API refuses multiLabel here
            order = ClassBalancedSampler(classes, params.resampling, seed=spec.training.seed).epoch_indices(0)
            row_tokens = row_tokens[np.asarray(order, dtype=np.int64)]
        out["train"] = train
        if eval_records is not None:
            out["eval"] = mapper(
                eval_records, "eval-rows", _classification_batch, features, input_columns=["record"], **kw
            )
    elif recipe == "qa":
        qa_params = spec.task.qa or QAParams()
        qa.require_fast(tokenizer)
        where = ["record", "file", "line", "unit"]
        kw = {"tokenizer": tokenizer, "data": data}
        per_record = mapper(train_records, "train-records", _qa_records_batch, _QA_RECORDS, input_columns=where, **kw)
        lengths = _int_column(per_record, "length")
        truncated = 0  # a long context is split into overlapping windows, nothing dropped
        unanswerable = bool(pc.any(per_record.with_format("arrow")[:].column("unanswerable")).as_py())

        def windows(records: datasets.Dataset, name: str) -> datasets.Dataset:
            made = mapper(
                records, name, _qa_batch, _QA_WINDOWS, input_columns=where, with_indices=True, params=qa_params, **kw
            )
            problems = pc.drop_null(made.with_format("arrow")[:].column("problem")).to_pylist()
            if problems:
                raise DataError([str(p) for p in problems[:50]], total=len(problems))
            return made.remove_columns("problem")

        train = windows(train_records, "train-windows")
        row_tokens = _row_lengths(train)
        out["train"] = train
        if eval_records is not None:
            out["eval"] = windows(eval_records, "eval-windows")
            questions = mapper(eval_records, "eval-records", _qa_records_batch, _QA_RECORDS, input_columns=where, **kw)
            unanswerable = unanswerable or bool(
                pc.any(questions.with_format("arrow")[:].column("unanswerable")).as_py()
            )
            out["eval_questions"] = questions.select_columns(["id", "context", "answers"])
        meta["allow_null"] = unanswerable
    elif recipe == "rl":
        # Rows are prompts (text, or chat messages) with their reference answers, never cut (.rl).
        from . import rl

        where = ["record", "file", "line", "unit"]
        kw = {"tokenizer": tokenizer, "data": data}

        def prompts(records: datasets.Dataset, name: str) -> datasets.Dataset:
            made = mapper(records, name, rl.batch, rl.features(data.format), input_columns=where, **kw)
            problems = pc.drop_null(made.with_format("arrow")[:].column("problem")).to_pylist()
            if problems:
                raise DataError([str(p) for p in problems[:50]], total=len(problems))
            return made.remove_columns("problem")

        train = prompts(train_records, "train-prompts")
        lengths = _int_column(train, "length")
        truncated = 0
        # An epoch trains on numGenerations completions of every prompt (perDeviceBatchSize counts them),
        # under PPO each ppo.epochs times: a row each, of the prompt's tokens (the completions' are not known
        # before they are sampled).
        rl_params = spec.task.rl
        assert rl_params is not None  # the API requires it
        updates = (rl_params.ppo.epochs if rl_params.ppo else 4) if rl_params.algorithm == "ppo" else 1
        row_tokens = np.repeat(lengths, rl_params.num_generations * updates)
        out["train"] = train
        if eval_records is not None:
            out["eval"] = prompts(eval_records, "eval-prompts")
    elif data.format == "preference":
        # Rows stay whole: the recipe cuts them to maxSeqLength as its trainer does (DPO keeps the start of
        # prompt + response). A row is a pair of sequences, prompt + chosen and prompt + rejected.
        kw = {"tokenizer": tokenizer, "data": data}
        train = mapper(train_records, "train-rows", _preference_batch, _PREFERENCE, input_columns=["record"], **kw)
        lengths = _int_column(train, "length")
        truncated = int((lengths > cut_at).sum())
        prompt_n, chosen_n, rejected_n = (_row_lengths(train, c) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        row_tokens = np.minimum(prompt_n + chosen_n, cut_at) + np.minimum(prompt_n + rejected_n, cut_at)
        out["train"] = train
        if eval_records is not None:
            out["eval"] = mapper(
                eval_records, "eval-rows", _preference_batch, _PREFERENCE, input_columns=["record"], **kw
            )
    else:  # unreachable: the API refuses a task without a recipe
        raise DataError([f"spec.task.type {spec.task.type} has no recipe"])
    ordered = np.sort(lengths)
    meta.update(
        token_length_p50=nearest_rank(ordered, 0.5),
        token_length_p95=nearest_rank(ordered, 0.95),
        token_length_max=int(ordered[-1]) if len(ordered) else 0,
        truncated=truncated,
        rows=len(row_tokens),
        tokens_per_epoch=int(row_tokens.sum()),
    )
    return out, meta


# --------------------------------------------------------------------------------------------------
# Phase 2: prepare
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataStats:
    """What the training data becomes (the preflight's figures, ``status.preflight``)."""

    train_records: int
    eval_records: int
    general_records: int
    #: Records refused: always 0 here (any bad record is a DataError, whose ``total`` counts them).
    bad_records: int
    #: Token counts of the training records before truncation (nearest-rank p50 and p95, and the max).
    token_length_p50: int
    token_length_p95: int
    token_length_max: int
    #: Training records that lose tokens to ``data.maxSeqLength`` (none for packed ``text``, cut into
    #: blocks, nor for ``qa``, split into overlapping windows).
    truncated: int
    #: Rows of one epoch (after packing, QA windows or class resampling), and their tokens.
    rows: int
    tokens_per_epoch: int
    steps_per_epoch: int
    #: The tokenized cache (None without a checkpoint directory: then it is the work directory's).
    cache_uri: str | None
    #: Whether this run read a cache built before instead of tokenizing.
    cache_hit: bool

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.train_records if self.train_records else 0.0


@dataclass(frozen=True)
class PreparedData:
    """A run's token rows, memory-mapped: ``train``; ``eval`` and ``general`` when the run has them;
    for QA the eval questions (``id``, ``context``, ``answers``) and whether null answers are allowed
    (some record is unanswerable)."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    general: datasets.Dataset | None
    eval_questions: datasets.Dataset | None
    allow_null: bool
    stats: DataStats
    #: Where the rows were read from (the cache's local copy).
    directory: Path
    #: Causal-LM runs with ``forgetting.replay``: the replay rows (:mod:`.replay`).
    replay: datasets.Dataset | None = None
    #: Causal-LM runs with ``forgetting.ewc``: the Fisher estimate's rows, when they are neither the
    #: general-eval nor the training rows (fisherData, else the replay records; :mod:`..ewc`).
    fisher: datasets.Dataset | None = None
    #: A causal-LM run of a prompt format: its eval prompts and references (:mod:`.eval_prompts`).
    eval_prompts: datasets.Dataset | None = None


def steps_per_epoch(config: TrainerConfig, rows: int, world_size: int) -> int:
    """Optimizer steps of one epoch over ``rows`` rows, as transformers' Trainer counts them."""
    from ..harness import planned_steps

    spec = config.spec
    one = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": 1, "max_steps": None})})
    return planned_steps(one, rows, world_size)


def prepare(
    config: TrainerConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    world: World | None = None,
    checked: Checked | None = None,
    world_size: int | None = None,
) -> PreparedData:
    """The run's token rows and their statistics: read from the tokenized cache, or built (by the rank
    that builds, :func:`is_builder`) and committed to it. ``checked`` is phase 1's result (:func:`check`
    runs when it is not given); ``world_size`` the ranks the steps are counted for (this world's)."""
    world = world or World.from_env()
    checked = checked or check(config, world)
    datasets.disable_progress_bars()
    cache = _Cache(config, checked.data_key, tokenizer_key(tokenizer))
    hit = True
    started = time.monotonic()
    if cache.local_committed():
        pass
    elif is_builder(config, world):
        if cache.remote and cache.remote_committed():
            cache.download()
        else:
            hit = False
            _build(config, tokenizer, checked, world, cache)
    elif cache.remote and world.is_local_main:
        _wait(cache.remote_committed, f"the data cache {cache.uri}")
        cache.download()
    else:
        _wait(cache.local_committed, f"the data cache's copy {cache.local}")
    prepared = _load(config, cache, hit=hit, world_size=world_size or world.world_size)
    if world.is_main:
        s = prepared.stats
        done = "read from" if hit else f"tokenized in {time.monotonic() - started:.1f} s into"
        print(
            f"data: {s.train_records} training records, {s.rows} rows of {s.tokens_per_epoch} tokens an epoch, "
            f"{done} {cache.uri or cache.local}",
            flush=True,
        )
    return prepared


def _build(
    config: TrainerConfig, tokenizer: PreTrainedTokenizerBase, checked: Checked, world: World, cache: _Cache
) -> None:
    if not checked.has_records:  # phase 1 found a committed cache of this data, for another tokenizer
        checked = check(config, world, reread=True)
    staging = cache.local.parent / f".{cache.local.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    work = staging.parent / f"{staging.name}-work"
    work.mkdir(parents=True)
    try:
        mapper = _Mapper(work, f"{checked.data_key[:16]}-{os.getpid()}")
        splits, meta = _tokenize_all(config, tokenizer, checked, work, mapper)
        staging.mkdir()
        for name, dataset in splits.items():
            dataset.save_to_disk(str(staging / name))
        (staging / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        cache.publish(staging)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _load(config: TrainerConfig, cache: _Cache, *, hit: bool, world_size: int) -> PreparedData:
    meta = json.loads((cache.local / META).read_text(encoding="utf-8"))

    def split(name: str) -> datasets.Dataset | None:
        path = cache.local / name
        return datasets.load_from_disk(str(path)) if path.is_dir() else None

    train = split("train")
    assert train is not None
    records = meta["records"]
    stats = DataStats(
        train_records=records["train"],
        eval_records=records["eval"],
        general_records=records["general"],
        bad_records=0,
        token_length_p50=meta["token_length_p50"],
        token_length_p95=meta["token_length_p95"],
        token_length_max=meta["token_length_max"],
        truncated=meta["truncated"],
        rows=meta["rows"],
        tokens_per_epoch=meta["tokens_per_epoch"],
        steps_per_epoch=steps_per_epoch(config, meta["rows"], world_size),
        cache_uri=cache.uri,
        cache_hit=hit,
    )
    return PreparedData(
        train=train,
        eval=split("eval"),
        general=split("general"),
        eval_questions=split("eval_questions"),
        allow_null=bool(meta["allow_null"]),
        stats=stats,
        directory=cache.local,
        replay=split("replay"),
        fisher=split("fisher"),
        eval_prompts=split("eval_prompts"),
    )


# --------------------------------------------------------------------------------------------------
# Serving rows to the Trainer
# --------------------------------------------------------------------------------------------------


class TokenRows(torch.utils.data.Dataset[dict[str, Any]]):
    """A dataset's rows as the Trainer's items: the columns ``keys`` names that it has (as Python lists
    and numbers, what the collators take), read from the memory-mapped Arrow files."""

    def __init__(self, dataset: datasets.Dataset, keys: Sequence[str]):
        self.dataset = dataset.select_columns([k for k in keys if k in dataset.column_names])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row: dict[str, Any] = self.dataset[int(index)]
        return row


def qa_windows(dataset: datasets.Dataset) -> list[qa.Window]:
    """The windows of a QA split, as evaluation decodes them (:class:`~.qa.Window`)."""
    return [
        qa.Window(ids, [(s[0], s[1]) if s is not None else None for s in offsets], question, start, end)
        for ids, offsets, question, start, end in _iter_column(
            dataset, "input_ids", "offsets", "question", "start_positions", "end_positions"
        )
    ]


def qa_questions(dataset: datasets.Dataset) -> list[qa.Question]:
    """The eval questions of a QA run (:class:`~.qa.Question`)."""
    return [qa.Question(i, c, tuple(a)) for i, c, a in _iter_column(dataset, "id", "context", "answers")]


__all__ = [
    "Checked",
    "DataStats",
    "PreparedData",
    "RecordSink",
    "TokenRows",
    "check",
    "prepare",
]
