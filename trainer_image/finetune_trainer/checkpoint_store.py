"""Durable checkpoints on any fsspec store (``s3://``, ``gs://``, ``az://``, ``file://`` or a path).

Layout under a job's checkpoint prefix (``<spec.checkpoint.uri>/<namespace>/<job>``)::

    checkpoint-<step>/                       every file transformers' Trainer saved for that step
    checkpoint-<step>/.parts/node-<k>.json   multi-node runs: the files node k uploaded
    checkpoint-<step>/manifest.json          written LAST: the commit marker

The protocol:

- A checkpoint is *committed* when its ``manifest.json`` exists, parses, names its own step and every
  file it lists is present with the listed size. Readers (resume, rotation, status) only ever see
  committed checkpoints.
- A writer uploads every file first and the manifest last, in one PUT (atomic on object stores; on a
  local filesystem a temporary file renamed into place). Each node uploads the files its own ranks
  wrote (their disks are not shared); with several nodes each writes ``.parts/node-<k>.json`` and node 0
  merges them into the manifest once all are there.
- Deleting uncommits first: the manifest goes, then the files. A crash anywhere leaves a *partial*
  checkpoint (no manifest), which is never read and is removed by the next clean-up.

The manifest records every file's size and sha256 (verified after a download), the step, the world
size, the number of nodes, the DeepSpeed ZeRO stage, the evaluation metrics of that step and the
config hash of the spec that wrote it (``finetune_operator.api.trainer_config.checkpoint_hash``: the
training-defining sections of the spec, so suspending or re-resourcing a job keeps its checkpoints).

Uploads stream from disk with bounded memory, one file at a time, while a second thread computes the
sha256 of the files: on S3 through boto3's transfer manager (threads, at most ``UPLOAD_CONCURRENCY``
parts of ``UPLOAD_CHUNK_BYTES`` in flight and in memory), elsewhere through fsspec's ``put_file``.
Listing, reading, writing the manifest and deleting go through fsspec everywhere.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator.api.v1alpha1 import CheckpointRecord
from fsspec.implementations.local import LocalFileSystem

from . import storage
from .file_manifest import FileEntry, local_files, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The record of the divergences rolled back (spec.training.onDivergence rollback), beside the checkpoints.
ROLLBACKS = "rollbacks.json"
PARTS_DIR = ".parts"
FORMAT = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

#: S3 multipart geometry: memory held per upload is at most chunk x concurrency (64 MiB by default).
UPLOAD_CHUNK_BYTES = int(os.environ.get("FINETUNE_CHECKPOINT_CHUNK_MB", "16")) * 2**20
UPLOAD_CONCURRENCY = int(os.environ.get("FINETUNE_CHECKPOINT_CONCURRENCY", "4"))


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (storage error, corrupt file, missing part)."""


@dataclass(frozen=True)
class Manifest:
    step: int
    uri: str  #: the checkpoint directory
    time: str  #: RFC 3339, when it was committed
    config_hash: str
    world_size: int
    nodes: int
    files: tuple[FileEntry, ...]
    epoch: float | None = None
    zero_stage: int | None = None  #: DeepSpeed ZeRO stage, None without DeepSpeed
    metrics: dict[str, float] = field(default_factory=dict)  #: evaluation metrics at this step, if any
    format: int = FORMAT

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def committed_at(self) -> float:
        return datetime.fromisoformat(self.time).timestamp()

    def to_json(self) -> str:
        body = asdict(self)
        body["files"] = [asdict(f) for f in self.files]
        body["bytes"] = self.bytes
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | builtins.bytes, uri: str) -> Manifest:  # `bytes` is the property above
        raw = json.loads(text)
        return cls(
            step=int(raw["step"]),
            uri=uri,
            time=str(raw["time"]),
            config_hash=str(raw["config_hash"]),
            world_size=int(raw["world_size"]),
            nodes=int(raw.get("nodes", 1)),
            files=tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]),
            epoch=raw.get("epoch"),
            zero_stage=raw.get("zero_stage"),
            metrics={str(k): float(v) for k, v in (raw.get("metrics") or {}).items()},
            format=int(raw.get("format", FORMAT)),
        )


@dataclass(frozen=True)
class BestMetric:
    """Which evaluation metric ranks checkpoints for keepBest, and in which direction."""

    name: str = "eval_loss"
    greater_is_better: bool = False

    def value(self, manifest: Manifest) -> float | None:
        return manifest.metrics.get(self.name)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.greater_is_better else a < b


@dataclass
class UploadResult:
    step: int
    files: list[FileEntry]
    bytes: int
    seconds: float
    manifest: Manifest | None  #: set on the node that committed


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def step_of(name: str) -> int | None:
    match = CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


class CheckpointStore:
    """One job's checkpoints under ``uri``: upload-then-commit, list committed, rotate, download."""

    def __init__(
        self,
        uri: str,
        *,
        config_hash: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        base_dir: str | None = None,
    ):
        self.uri = uri.rstrip("/")
        self.config_hash = config_hash
        self.endpoint_url = endpoint_url
        self.region = region
        self._s3: Any = None
        self._transfer: Any = None
        self.fs, self.root = storage.filesystem(self.uri, base_dir, endpoint_url=endpoint_url, region=region)
        self.root = self.root.rstrip("/")
        self.remote = storage.is_remote(self.uri)
        self.is_s3 = self.uri.startswith("s3://")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    # ---- rollbacks (spec.training.onDivergence rollback) -----------------------------------------
    def read_rollbacks(self) -> list[dict[str, Any]]:
        """The divergences rolled back so far (``rollbacks.json`` beside the checkpoints), oldest first."""
        try:
            raw = json.loads(self.fs.cat_file(f"{self.root}/{ROLLBACKS}"))
        except FileNotFoundError:
            return []
        return [dict(r) for r in raw] if isinstance(raw, list) else []

    def write_rollbacks(self, records: list[dict[str, Any]]) -> None:
        self._write_atomic(f"{self.root}/{ROLLBACKS}", json.dumps(records, indent=2, sort_keys=True).encode())
        self._refresh()

    # ---- names ---------------------------------------------------------------------------------
    def dir_path(self, step: int) -> str:
        return f"{self.root}/checkpoint-{step}"

    def dir_uri(self, step: int) -> str:
        return f"{self.uri}/checkpoint-{step}"

    def _refresh(self) -> None:
        self.fs.invalidate_cache()

    # ---- reading -------------------------------------------------------------------------------
    def steps_present(self) -> list[int]:
        """Steps of every checkpoint directory, committed or not."""
        self._refresh()
        if not self.fs.exists(self.root):
            return []
        steps = []
        for entry in self.fs.ls(self.root, detail=False):
            step = step_of(str(entry).rstrip("/").rsplit("/", 1)[-1])
            if step is not None:
                steps.append(step)
        return sorted(set(steps))

    def read_manifest(self, step: int) -> Manifest | None:
        """The manifest of checkpoint ``step`` if that checkpoint is committed and complete, else None."""
        path = f"{self.dir_path(step)}/{MANIFEST}"
        try:
            text = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            manifest = Manifest.from_json(text, self.dir_uri(step))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring checkpoint-%d: unreadable manifest (%s)", step, exc)
            return None
        if manifest.step != step:
            log.warning("ignoring checkpoint-%d: its manifest names step %d", step, manifest.step)
            return None
        sizes = self._sizes(step)
        for f in manifest.files:
            if sizes.get(f.path) != f.size:
                log.warning("ignoring checkpoint-%d: %s is missing or has the wrong size", step, f.path)
                return None
        return manifest

    def _sizes(self, step: int) -> dict[str, int]:
        base = self.dir_path(step)
        found = self.fs.find(base, detail=True)
        sizes = {}
        for path, info in found.items():
            rel = str(path)[len(base) :].lstrip("/")
            sizes[rel] = int(info.get("size") or 0)
        return sizes

    def committed(self) -> list[Manifest]:
        """Every committed checkpoint, oldest step first."""
        out = []
        for step in self.steps_present():
            manifest = self.read_manifest(step)
            if manifest is not None:
                out.append(manifest)
        return out

    def newest(self) -> Manifest | None:
        """The committed checkpoint with the highest step (found newest-first: one manifest read usually)."""
        for step in reversed(self.steps_present()):
            manifest = self.read_manifest(step)
            if manifest is not None:
                return manifest
        return None

    def download(self, manifest: Manifest, target: Path) -> Path:
        """Copy a committed checkpoint into ``target`` (reusing files whose sha256 already matches)."""
        target.mkdir(parents=True, exist_ok=True)
        base = self.dir_path(manifest.step)
        for f in manifest.files:
            local = target / f.path
            if local.is_file() and local.stat().st_size == f.size and sha256_file(local) == f.sha256:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".partial")
            self.fs.get_file(f"{base}/{f.path}", str(partial))
            digest = sha256_file(partial)
            if digest != f.sha256:
                partial.unlink(missing_ok=True)
                raise CheckpointError(
                    f"{manifest.uri}/{f.path}: sha256 {digest[:12]}… does not match the manifest's {f.sha256[:12]}…"
                )
            partial.replace(local)
        listed = {f.path for f in manifest.files}
        for rel, path in local_files(target):
            if rel not in listed:
                path.unlink()
        return target

    # ---- writing -------------------------------------------------------------------------------
    def _put_file(self, local: Path, remote: str) -> None:
        if self.is_s3:
            self._put_s3(local, remote)
        elif self.is_local:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, remote)
        else:
            self.fs.put_file(str(local), remote)

    def _put_s3(self, local: Path, remote: str) -> None:
        """Upload one file with boto3's transfer manager: threads, a multipart upload of
        ``UPLOAD_CHUNK_BYTES`` parts, at most ``UPLOAD_CONCURRENCY`` in flight and in memory.

        (s3fs's async client sends every part from one event-loop thread; on the benchmark it reached
        about 0.75 of this.)"""
        if self._s3 is None:
            import boto3
            from boto3.s3.transfer import TransferConfig

            options = storage.storage_options(self.uri, endpoint_url=self.endpoint_url, region=self.region)
            self._s3 = boto3.session.Session().client(
                "s3",
                endpoint_url=options.get("endpoint_url"),
                region_name=options.get("client_kwargs", {}).get("region_name"),
            )
            self._transfer = TransferConfig(
                multipart_threshold=UPLOAD_CHUNK_BYTES,
                multipart_chunksize=UPLOAD_CHUNK_BYTES,
                max_concurrency=UPLOAD_CONCURRENCY,
            )
            self._transfer.max_in_memory_upload_chunks = UPLOAD_CONCURRENCY
        bucket, key = remote.split("/", 1)
        self._s3.upload_file(str(local), bucket, key, Config=self._transfer)

    def _write_atomic(self, remote: str, data: bytes) -> None:
        if self.is_local:
            tmp = f"{remote}.tmp-{os.getpid()}"
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, remote)
        else:
            self.fs.pipe_file(remote, data)

    def upload(
        self,
        local_dir: Path,
        step: int,
        *,
        world_size: int,
        nodes: int = 1,
        node_rank: int = 0,
        epoch: float | None = None,
        zero_stage: int | None = None,
        metrics: dict[str, float] | None = None,
        parts_timeout: float = 600.0,
    ) -> UploadResult:
        """Upload ``local_dir`` as checkpoint ``step``; node 0 commits it (returns the manifest).

        With several nodes every node calls this with the files its ranks wrote; node 0 waits (up to
        ``parts_timeout`` seconds) for every other node's part list before it writes the manifest.
        """
        started = time.monotonic()
        base = self.dir_path(step)
        if nodes == 1 and self.fs.exists(base):
            self.delete(step)  # leftovers of an earlier, uncommitted attempt at this step
        files = local_files(local_dir)
        entries: list[FileEntry] = []
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as hasher:
            digests = [hasher.submit(sha256_file, path) for _rel, path in files]
            for rel, path in files:
                self._put_file(path, f"{base}/{rel}")
            for (rel, path), digest in zip(files, digests, strict=True):
                entries.append(FileEntry(rel, path.stat().st_size, digest.result()))
        self._refresh()
        uploaded = sum(e.size for e in entries)
        if nodes > 1:
            part = json.dumps({"node": node_rank, "files": [asdict(e) for e in entries]}).encode()
            self._write_atomic(f"{base}/{PARTS_DIR}/node-{node_rank}.json", part)
            if node_rank != 0:
                return UploadResult(step, entries, uploaded, time.monotonic() - started, None)
            entries = self._merge_parts(step, nodes, parts_timeout)
        manifest = Manifest(
            step=step,
            uri=self.dir_uri(step),
            time=now_rfc3339(),
            config_hash=self.config_hash,
            world_size=world_size,
            nodes=nodes,
            files=tuple(sorted(entries, key=lambda e: e.path)),
            epoch=epoch,
            zero_stage=zero_stage,
            metrics=dict(metrics or {}),
        )
        self._write_atomic(f"{base}/{MANIFEST}", manifest.to_json().encode())
        return UploadResult(step, entries, uploaded, time.monotonic() - started, manifest)

    def _merge_parts(self, step: int, nodes: int, timeout: float) -> list[FileEntry]:
        base = f"{self.dir_path(step)}/{PARTS_DIR}"
        deadline = time.monotonic() + timeout
        parts: dict[int, list[FileEntry]] = {}
        while True:
            for node in range(nodes):
                if node in parts:
                    continue
                try:
                    raw = json.loads(self.fs.cat_file(f"{base}/node-{node}.json"))
                except FileNotFoundError:
                    continue
                parts[node] = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]]
            if len(parts) == nodes:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(nodes)) - set(parts))
                raise CheckpointError(f"checkpoint-{step}: nodes {missing} did not upload within {timeout:.0f}s")
            time.sleep(0.5)
            self._refresh()
        merged: dict[str, FileEntry] = {}
        for node in sorted(parts):
            for entry in parts[node]:
                seen = merged.get(entry.path)
                if seen is not None and seen != entry:
                    raise CheckpointError(f"checkpoint-{step}: nodes wrote different contents for {entry.path}")
                merged[entry.path] = entry
        return list(merged.values())

    # ---- deleting ------------------------------------------------------------------------------
    def uncommit(self, step: int) -> None:
        """Remove checkpoint ``step``'s manifest: its files stay (a partial checkpoint) until a clean-up."""
        manifest = f"{self.dir_path(step)}/{MANIFEST}"
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        self._refresh()

    def delete(self, step: int) -> None:
        """Uncommit (manifest first), then remove every file of checkpoint ``step``."""
        base = self.dir_path(step)
        self.uncommit(step)
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)
        self._refresh()

    def delete_all(self) -> list[int]:
        steps = self.steps_present()
        for step in steps:
            self.delete(step)
        return steps

    def clean_partial(self, *, below: int | None = None) -> list[int]:
        """Remove uncommitted checkpoints (only those below step ``below`` when given: newer ones may be
        in flight on another node). Returns the steps removed."""
        removed = []
        for step in self.steps_present():
            if below is not None and step >= below:
                continue
            if self.read_manifest(step) is None:
                log.info("removing partial checkpoint %s", self.dir_uri(step))
                self.delete(step)
                removed.append(step)
        return removed

    def rotate(self, keep_last: int, best: BestMetric | None, *, protect: Iterable[int] = ()) -> list[Manifest]:
        """Keep the ``keep_last`` newest committed checkpoints, the best one (when ``best``) and
        ``protect``; delete the other committed ones and stale partials. Returns what is kept."""
        committed = self.committed()
        keep = {m.step for m in committed[-keep_last:]} | set(protect)
        best_manifest = best_checkpoint(committed, best) if best else None
        if best_manifest is not None:
            keep.add(best_manifest.step)
        kept = []
        for manifest in committed:
            if manifest.step in keep:
                kept.append(manifest)
            else:
                log.info("keepLast: deleting %s", manifest.uri)
                self.delete(manifest.step)
        if committed:
            self.clean_partial(below=committed[-1].step)
        return kept


def best_checkpoint(committed: Iterable[Manifest], best: BestMetric) -> Manifest | None:
    chosen: Manifest | None = None
    chosen_value: float | None = None
    for manifest in committed:
        value = best.value(manifest)
        if value is None or value != value:  # no metric at this step, or NaN
            continue
        if chosen_value is None or best.better(value, chosen_value):
            chosen, chosen_value = manifest, value
    return chosen


def summary_line(manifest: Manifest) -> str:
    return f"checkpoint-{manifest.step} ({manifest.bytes:,} B, {len(manifest.files)} files) at {manifest.uri}"


def describe(manifests: Iterable[Manifest]) -> list[CheckpointRecord]:
    """status.checkpoints entries, oldest first."""
    return [CheckpointRecord(step=m.step, uri=m.uri, time=m.time) for m in manifests]
