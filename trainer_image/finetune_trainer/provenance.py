"""What produced a model: the trainer's part of ``status.provenance`` and the output's ``provenance.json``.

Collected on rank 0 when the outputs are written (:meth:`..harness.Training.save_outputs`):

- **model**: ``spec.model.uri``; a Hub model's resolved commit (``config._commit_hash``, what
  ``from_pretrained`` loaded); a stored copy's files (a local directory, a package's files, or what was
  downloaded from object storage) as the SHA-256 of their manifest — every file's path, size and
  SHA-256, the same listing a checkpoint's manifest has (this reads the model's files once more, on
  rank 0 at the end of the run: about a second per GB);
- **data**: every file read for training, evaluation and general-text evaluation, with its size and
  the SHA-256 of its bytes (local files) or its store's ETag or version (objects in storage: the store's
  own identity of the content, not re-read) — the fingerprints the tokenized cache is keyed by;
- **tokenizer** (its whole serialized state, the data cache's key) and **chat template** hashes;
- the **seed**, the **last committed checkpoint**'s manifest digest, the **accelerator** and the
  versions of the **libraries** that trained it.

The operator adds what only the cluster knows: the trainer image's digest (the pod's ``imageID``),
the nodes the pods ran on and its own version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import DataFileProvenance, ModelProvenance, Provenance

from .data import pipeline
from .file_manifest import FileEntry, file_entries, sha256_file
from .modeling import ModelSource

PROVENANCE_FILE = "provenance.json"
#: The distributions whose versions are recorded (their import names may differ).
LIBRARIES = ("torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes", "accelerate", "datasets")


def libraries() -> dict[str, str]:
    """The versions of Python, torch's CUDA (``none`` for a CPU build) and :data:`LIBRARIES`."""
    found = {"python": platform.python_version(), "cuda": torch.version.cuda or "none"}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def accelerator() -> str:
    """The first visible accelerator's name, or ``cpu``."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def model_provenance(uri: str, source: ModelSource, model_config: Any) -> ModelProvenance:
    """The base model: a Hub model's commit, a stored copy's manifest digest."""
    if not source.is_local:
        commit = getattr(model_config, "_commit_hash", None)
        return ModelProvenance(uri=uri, revision=commit or source.revision)
    root = Path(source.path)
    if source.gguf_file:  # the one file the model is read from, of a package that may hold others
        entries = [
            FileEntry(source.gguf_file, (root / source.gguf_file).stat().st_size, sha256_file(root / source.gguf_file))
        ]
    else:
        entries = file_entries(root)
    return ModelProvenance(uri=uri, sha256=manifest_digest(entries))


def manifest_digest(entries: list[FileEntry]) -> str:
    """The SHA-256 of a file listing (path, size, sha256 of each file, by path) as canonical JSON."""
    listing = [asdict(e) for e in sorted(entries, key=lambda e: e.path)]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def data_provenance(config: TrainerConfig) -> list[DataFileProvenance]:
    """Every data file of the run, by role, with what identifies its content."""
    out = []
    for role, fingerprints in pipeline.data_files(config).items():
        for fingerprint in fingerprints:
            path, size, kind, value = [*fingerprint, None, None][:4]
            out.append(
                DataFileProvenance(
                    uri=path,
                    role=role,  # type: ignore[arg-type]
                    bytes=size if isinstance(size, int) else None,
                    sha256=value if kind == "sha256" else None,
                    etag=str(value) if kind not in (None, "sha256") and value is not None else None,
                )
            )
    return out


def collect(
    config: TrainerConfig,
    *,
    source: ModelSource,
    model_config: Any,
    tokenizer: Any,
    checkpoint_sha256: str | None,
) -> Provenance:
    """The trainer's part of the provenance (module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    return Provenance(
        accelerator=accelerator(),
        model=model_provenance(config.spec.model.uri, source, model_config),
        data=data_provenance(config),
        tokenizer_sha256=pipeline.tokenizer_key(tokenizer),
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        seed=config.spec.training.seed,
        checkpoint_sha256=checkpoint_sha256,
        libraries=libraries(),
    )


def write(provenance: Provenance, path: Path) -> Path:
    path.write_text(provenance.model_dump_json(by_alias=True, exclude_none=True, indent=2), encoding="utf-8")
    return path
