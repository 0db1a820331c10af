"""Write what a job leaves behind — an adapter and/or a merged model — with a manifest of digests.

Layout under the output location::

    adapter/        PEFT adapter (+ added_tokens.safetensors, tokenizer) — PEFT methods
    merged/         the full model with the adapter folded in (or the trained model, for `full`)
    manifest.json   every file: path, size, sha256 (entries as a checkpoint's manifest has them)
    metrics.jsonl   the run's log (``finetune report OUTPUT`` reads it)
    trainer-config.json  the job's trainer config: its spec (task, labels, data format, base model) and
                    where it ran (``finetune predict OUTPUT`` reads it)
    evaluation.json the evaluations before and after training, with what a metric line cannot hold
                    (a classifier's confusion matrix; ``finetune report`` reads it)
    samples.jsonl   with the ``bleu``/``rouge`` metrics: the last evaluation's prompts, references and
                    generations, one JSON line each, for a person to read (``finetune report`` shows a few)

The artifact digest reported in status is the sha256 of ``manifest.json`` itself, so one value
verifies every byte. Outputs go to a local staging directory first and are uploaded afterwards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import storage
from .file_manifest import FileEntry, file_entries, sha256_file
from .methods import added_tokens
from .methods.context import base_model

if TYPE_CHECKING:
    from peft import PeftModel

ADDED_TOKENS_FILE = "added_tokens.safetensors"
TRAINER_CONFIG_FILE = "trainer-config.json"
EVALUATION_FILE = "evaluation.json"
#: The generation metrics' samples (:mod:`.generation`), written in the work directory by rank 0.
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class Artifact:
    kind: str  #: adapter | merged | model
    uri: str
    sha256: str
    bytes: int


def write_manifest(root: Path) -> list[FileEntry]:
    """``manifest.json`` under ``root``: every other file's entry (as a checkpoint's), and the total."""
    files = file_entries(root, exclude=frozenset({"manifest.json"}))
    manifest = {"files": [asdict(f) for f in files], "bytes": sum(f.size for f in files)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return files


def save_strategy(spec: FineTuneJobSpec) -> tuple[bool, bool]:
    """(save adapter, save merged) for the spec's output.save."""
    save = spec.output.save
    if spec.method.type == "full":
        return False, True
    if save == "auto":
        return True, False
    return save in ("adapter", "both"), save in ("merged", "both")


def dequantized_copy(peft_model: Any) -> Any:
    """A float copy of a 4-bit PEFT model: same adapter on the dequantized base (for merging)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = peft_model.peft_config[peft_model.active_adapter]
    adapter_state = get_peft_model_state_dict(peft_model)
    base = peft_model.unload()
    base.dequantize()
    fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, adapter_state)
    return fresh


def merged_model(model: Any, *, quantized: bool) -> PreTrainedModel:
    """The adapter folded into the base weights (added-token rows too)."""
    if quantized:
        model = dequantized_copy(model)
    rows = added_tokens.find(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if rows is not None:
        rows.merge_into(base)
        delattr(base, added_tokens.ATTRIBUTE)
    merged: PreTrainedModel = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return merged


def save_outputs(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    spec: FineTuneJobSpec,
    *,
    staging: Path,
    destination: str,
    run_files: Sequence[Path] = (),
) -> list[Artifact]:
    """Save the spec's outputs into ``staging``, copy them to ``destination``, return the artifacts.

    ``run_files`` (the run's ``metrics.jsonl``) go along at the top of the output, listed in its
    manifest: a pod's work directory is gone with the pod, and ``finetune report OUTPUT_URI`` reads them.
    """
    want_adapter, want_merged = save_strategy(spec)
    staging.mkdir(parents=True, exist_ok=True)
    for path in run_files:
        if path.is_file() and path.resolve() != (staging / path.name).resolve():
            shutil.copyfile(path, staging / path.name)
    saved: list[tuple[str, str]] = []  # (artifact kind, folder)
    if want_adapter:
        adapter_dir = staging / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        rows = added_tokens.find(model)
        if rows is not None:
            save_file(rows.state(), str(adapter_dir / ADDED_TOKENS_FILE))
        tokenizer.save_pretrained(adapter_dir)
        saved.append(("adapter", "adapter"))
    if want_merged:
        merged_dir = staging / "merged"
        merged = merged_model(model, quantized=spec.method.type == "qlora")
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        saved.append(("model" if spec.method.type == "full" else "merged", "merged"))
    files = write_manifest(staging)
    digest = sha256_file(staging / "manifest.json")
    storage.upload(staging, destination)
    artifacts = []
    for kind, folder in saved:
        size = sum(f.size for f in files if f.path.startswith(folder + "/"))
        artifacts.append(Artifact(kind, f"{destination.rstrip('/')}/{folder}", digest, size))
    return artifacts


def load_adapter_for_inference(base: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """Base model + a saved adapter (with its added-token rows), as the job's output describes it."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    extra = adapter_dir / ADDED_TOKENS_FILE
    if extra.exists():
        state = load_file(str(extra))
        first = int(state["first"][0])
        count = state["input_delta"].shape[0]
        rows = added_tokens.AddedTokenRows(base_model(model), list(range(first, first + count)))
        with torch.no_grad():
            rows.input_delta.copy_(state["input_delta"])
            if rows.output_delta is not None:
                rows.output_delta.copy_(state["output_delta"])
        setattr(base_model(model), added_tokens.ATTRIBUTE, rows)
    return model
