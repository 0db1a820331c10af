"""``python -m finetune_trainer.predict OUTPUT --input FILE``: run a job's saved model on records.

``finetune predict`` calls this. OUTPUT is a job's output location (a local directory or an object
storage URI: ``spec.output.uri``, or one of the artifacts ``status.artifacts`` and the run's summary
list); FILE holds records of the job's data format, checked as the
training data is (``file:line: reason``, exit 3). What the output is — task, data format and columns,
labels, base model, method — comes from the ``trainer-config.json`` the job saved beside its
artifacts, and every file is verified against the output's ``manifest.json`` before it is loaded.

The merged model is used when the output has one, else the adapter on the base model of
``spec.model`` (loaded as in training: a QLoRA base quantized again, added tokens restored), or as
``--artifact`` says. Each record gives one JSON line: where it came from, the prediction and, where
the record has one, the reference; the task's recipe decides what a prediction is (a completion, a
label, an answer span) and prints its scores over the records to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO, cast

from finetune_operator.api.trainer_config import (
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_OK,
    TrainerConfig,
    load_trainer_config,
)
from finetune_operator.api.v1alpha1 import DataSource, ModelSpec
from pydantic import ValidationError

from . import storage
from .data.records import DataError, Record, load_checked
from .errors import ConfigError
from .file_manifest import sha256_file
from .outputs import TRAINER_CONFIG_FILE

Artifact = Literal["adapter", "merged"]


class OutputError(ConfigError):
    """The output cannot be used: missing, incomplete, or not matching its manifest."""


@dataclass(frozen=True)
class SavedOutput:
    """A job's verified output on local disk, and the artifact to run."""

    root: Path
    config: TrainerConfig
    artifact: Artifact

    @property
    def artifact_dir(self) -> Path:
        return self.root / self.artifact

    @classmethod
    def open(cls, location: str, *, artifact: Artifact | None, cache_dir: Path) -> SavedOutput:
        """The output at ``location``, or the output an artifact's URI (``.../adapter``, ``.../merged``,
        as ``status.artifacts`` lists them) belongs to."""
        parent, _, last = location.rstrip("/").rpartition("/")
        if parent and last in ("adapter", "merged") and artifact in (None, last):
            location, artifact = parent, cast(Artifact, last)
        root = storage.download(location, cache_dir) if storage.is_remote(location) else Path(location)
        if not (root / "manifest.json").is_file():
            raise OutputError(f"{location}: no manifest.json: not a job's output (or it is incomplete)")
        verify_manifest(root)
        if not (root / TRAINER_CONFIG_FILE).is_file():
            raise OutputError(f"{location}: no {TRAINER_CONFIG_FILE} (written by jobs of this release and later)")
        config = load_trainer_config(str(root / TRAINER_CONFIG_FILE))
        present = [a for a in ("merged", "adapter") if (root / a).is_dir()]
        if artifact is None:
            if not present:
                raise OutputError(f"{location}: neither merged/ nor adapter/ is there")
            artifact = "merged" if "merged" in present else "adapter"
        elif artifact not in present:
            raise OutputError(f"{location}: no {artifact}/ (the output has: {', '.join(present) or 'nothing'})")
        return cls(root, config, artifact)

    def tokenizer(self) -> Any:
        """The tokenizer saved with the artifact (chat template, padding and added tokens as trained)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.artifact_dir))

    def model(self, load: Callable[..., Any], tokenizer: Any, cache_dir: Path) -> Any:
        """The trained model in eval mode. ``load(source, model_spec, dtype=..., **kwargs)`` is the
        recipe's loader (:mod:`.modeling`), which puts its task's head on the base."""
        from . import methods, modeling
        from .distributed import World
        from .outputs import load_adapter_for_inference

        spec = self.config.spec
        dtype = modeling.model_dtype(spec.model.dtype)
        if self.artifact == "merged":
            source = modeling.ModelSource(str(self.artifact_dir), None, None, True)
            # The merged model is plain weights of the same architecture: no GGUF, no quantization.
            model = load(source, ModelSpec(uri=str(self.artifact_dir), dtype=spec.model.dtype), dtype=dtype)
        else:
            world = World(rank=0, local_rank=0, world_size=1, local_world_size=1)
            source = modeling.resolve_source(
                spec.model, base_dir=self.config.base_dir, cache_dir=cache_dir, world=world
            )
            ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=1)
            base = load(source, spec.model, dtype=dtype, **methods.load_kwargs(ctx))
            modeling.grow_embeddings(base, tokenizer)
            model = load_adapter_for_inference(base, self.artifact_dir)
        model.eval()
        return model


def verify_manifest(root: Path) -> None:
    """Every file the output's manifest lists is there with its size and sha256."""
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    bad = []
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            bad.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            bad.append(f"{entry['path']}: does not match its sha256 in manifest.json")
    if bad:
        raise OutputError(f"{root}: " + "; ".join(bad[:10]))


def read_records(config: TrainerConfig, uri: str) -> list[Record]:
    """The input's records, checked as the job's training data is."""
    data = config.spec.data
    return load_checked(DataSource(uri=uri), data.format, data.columns, task=config.spec.task, base_dir=None)


class Predictions:
    """Where the JSON lines go."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.count = 0

    def write(self, items: Iterator[dict[str, Any]]) -> None:
        for item in items:
            self.stream.write(json.dumps(item, ensure_ascii=False) + "\n")
            self.stream.flush()
            self.count += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_trainer.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", metavar="OUTPUT", help="the job's output: a directory or an object storage URI")
    parser.add_argument("--input", required=True, help="records of the job's data format (a file or directory)")
    parser.add_argument("--artifact", choices=("merged", "adapter"), help="default: merged if present, else adapter")
    parser.add_argument("--predictions", help="write the JSON lines here (default: standard output)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest generated text (causal-LM tasks)")
    args = parser.parse_args(argv)

    from .recipes import predictor_for

    with ExitStack() as stack:
        cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune-predict-")))
        try:
            saved = SavedOutput.open(args.output, artifact=args.artifact, cache_dir=cache / "outputs")
            records = read_records(saved.config, args.input)
            predict = predictor_for(saved.config.spec.task.type)
            stream = (
                stack.enter_context(open(args.predictions, "w", encoding="utf-8")) if args.predictions else sys.stdout
            )
            out = Predictions(stream)
            scores = predict(saved, records, out, cache_dir=cache, max_new_tokens=args.max_new_tokens)
        except DataError as exc:
            print(f"invalid data:\n{exc}", file=sys.stderr)
            return EXIT_INVALID_DATA
        except (ConfigError, OSError, ValidationError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID_CONFIG
        where = f" to {args.predictions}" if args.predictions else ""
        print(f"{out.count} predictions ({saved.artifact}){where}", file=sys.stderr)
        for name, value in scores.items():
            print(f"{name}: {value:.4f}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
