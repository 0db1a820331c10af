"""The file list that checkpoints and outputs both carry: every file's path, size and sha256.

A checkpoint's ``manifest.json`` (:mod:`.checkpoint_store`) and a job output's ``manifest.json``
(:mod:`.outputs`) list their files with the same entries, so one reader verifies either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

HASH_BLOCK = 4 * 2**20


@dataclass(frozen=True)
class FileEntry:
    path: str  #: relative to the manifest's directory, '/'-separated
    size: int  #: bytes
    sha256: str


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(directory: Path) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every file under directory, sorted, largest first."""
    found = [(p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file()]
    return sorted(found, key=lambda item: (-item[1].stat().st_size, item[0]))


def file_entries(directory: Path, *, exclude: frozenset[str] = frozenset()) -> list[FileEntry]:
    """An entry for every file under ``directory`` (except the relative paths in ``exclude``), by path."""
    entries = [
        FileEntry(rel, path.stat().st_size, sha256_file(path))
        for rel, path in local_files(directory)
        if rel not in exclude
    ]
    return sorted(entries, key=lambda e: e.path)
