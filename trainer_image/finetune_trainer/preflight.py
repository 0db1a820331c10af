"""``python -m finetune_trainer preflight --config FILE [--result FILE] [--world-size N]``: everything a
job can be refused for, checked on a CPU before any GPU is held.

The operator runs it as a CPU-only Job before the GPU Job exists; ``finetune plan`` and ``finetune run``
run it as a subprocess on this machine. In the order that keeps a refusal cheap:

1. **Write access**: a small object is written and deleted under the checkpoint directory and under the
   output directory, through the same filesystems training writes them with; a refused write is a
   permanent configuration error (exit 2) naming ``spec.checkpoint.uri`` or ``spec.output.uri``.
2. **Every record** of the training, evaluation and general-evaluation data read and checked by the
   data pipeline's first phase (:func:`~.data.pipeline.check`, as every rank of the run does; exit 3,
   each ``file:line: reason``), before the model is touched at all.
3. **The model's config and tokenizer only**, never its weights
   (:func:`~.modeling.resolve_config_source`): a model in object storage is copied without its weight
   files; a Hub model's config and tokenizer loaders fetch their own files only. A ``distill`` job's
   teacher likewise, refused (naming ``spec.task.distill.teacher``) when its vocabulary is not the
   student's; its config sizes its weights in the memory estimate.
4. **The tokenized cache** built by the pipeline's second phase (:func:`~.data.pipeline.prepare`, the
   very function the recipes call, so the run that follows reads the rows and tokenizes nothing), and
   its statistics (:class:`~.data.pipeline.DataStats`): token lengths of the training records before
   truncation (p50, p95 and max by the nearest-rank definition), the fraction of records that lose
   tokens to ``data.maxSeqLength`` (none for packed ``text``, cut into blocks, nor for ``qa``, split
   into overlapping windows), the tokens of one epoch (after truncation and packing; with class
   resampling, those of the resampled epoch) and its optimizer steps for the job's world size (as
   :func:`~.harness.planned_steps` counts them). A record the tokenization refuses (a QA question too
   long for a window) is bad data too.
5. **Memory** per rank, by :func:`finetune_operator.api.memory.estimate` from the model's config.json;
   an architecture it does not model gives no estimate and a note, not a failure. Whether the job fits
   is not decided here: the operator and ``finetune plan`` compare the total with the GPU's memory
   (:func:`finetune_operator.api.memory.fits_total`).

The result (:class:`finetune_operator.api.v1alpha1.PreflightResult`, by alias) is the last line of
standard output, the ``--result`` file when given, and — always, in every outcome — a compact copy in the
termination-message file (``FINETUNE_TERMINATION_LOG``, else ``/dev/termination-log`` when it exists and
is writable), under 4096 bytes: Kubernetes keeps that much of it in the container's status, where the
operator reads it. Problems are dropped from that copy first. Human-readable reasons go to standard error.

Exit codes: 0 the data is valid; 2 a configuration error (model, tokenizer, write access); 3 bad data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from finetune_operator.api import memory
from finetune_operator.api.trainer_config import (
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_OK,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    TERMINATION_MESSAGE_MAX_BYTES,
    TrainerConfig,
    load_trainer_config,
)
from finetune_operator.api.v1alpha1 import (
    PREFLIGHT_MAX_PROBLEMS,
    FineTuneJobSpec,
    PreflightMemory,
    PreflightResult,
)
from pydantic import ValidationError

from . import storage
from .data.records import MAX_REPORTED, DataError
from .distributed import World
from .errors import ConfigError

#: Bad-record messages kept in the result (the termination message keeps fewer when it must).
MAX_PROBLEMS = PREFLIGHT_MAX_PROBLEMS
#: The result's length limits of one problem and of the memory note.
MAX_PROBLEM_CHARS = 2048
MAX_NOTE_CHARS = 1024
PROBE_PREFIX = ".finetune-preflight-"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Write access
# --------------------------------------------------------------------------------------------------


def probe_write(
    uri: str, field_name: str, *, base_dir: str | None, endpoint_url: str | None = None, region: str | None = None
) -> None:
    """Write a small object under ``uri`` and delete it, through the filesystem training writes there
    with; a refused write is a ConfigError naming ``field_name``."""
    fs, path = storage.filesystem(uri, base_dir, endpoint_url=endpoint_url, region=region)
    probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        if not storage.is_remote(uri):
            fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as fh:
            fh.write(b"finetune preflight: write access probe, deleted at once\n")
        fs.rm_file(probe)
    except (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"{field_name}: cannot write to {uri}: {reason}") from None


def probe_storage(config: TrainerConfig) -> list[str]:
    """Probe the checkpoint directory (as the checkpoint store opens it: the spec's endpoint and region)
    and the output directory (as the outputs are uploaded); return the URIs that accepted a write."""
    spec = config.spec
    probed: list[str] = []
    if config.checkpoint_dir is not None:
        c = spec.checkpoint
        probe_write(
            config.checkpoint_dir,
            "spec.checkpoint.uri",
            base_dir=config.base_dir,
            endpoint_url=c.endpoint_url,
            region=c.region,
        )
        probed.append(config.checkpoint_dir)
    output_field = "spec.output.uri" if spec.output.uri else "spec.checkpoint.uri"
    probe_write(config.output_dir, output_field, base_dir=None)
    probed.append(config.output_dir)
    return probed


# --------------------------------------------------------------------------------------------------
# Model config, tokenizer and memory
# --------------------------------------------------------------------------------------------------


def load_model_config(config: TrainerConfig) -> tuple[dict[str, Any], Any]:
    """The model's config (its config.json as a dict) and its tokenizer, as training loads it; never
    its weights."""
    from transformers import AutoConfig

    from . import modeling

    spec = config.spec
    source = modeling.resolve_config_source(
        spec.model, base_dir=config.base_dir, cache_dir=Path(config.work_dir) / "cache"
    )
    kwargs = modeling._common_kwargs(source, spec.model)
    try:
        with modeling.spec_errors(spec.model):  # trustRemoteCode and attention refusals name their field
            loaded = AutoConfig.from_pretrained(source.path, **kwargs)
        tokenizer = modeling.load_tokenizer(source, spec.model)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"spec.model.uri: cannot read the config and tokenizer of {spec.model.uri}: {exc}") from None
    raw = Path(source.path) / "config.json"
    if source.is_local and not source.gguf_file and raw.is_file():
        model_config: dict[str, Any] = json.loads(raw.read_text(encoding="utf-8"))
    else:
        model_config = loaded.to_dict()
    return model_config, tokenizer


def load_teacher_config(config: TrainerConfig, tokenizer: Any) -> dict[str, Any]:
    """A ``distill`` job's teacher config (as a dict), read as the student's is (never its weights),
    after checking that its tokenizer has the student's vocabulary: a ConfigError naming
    ``spec.task.distill.teacher`` otherwise, as the recipe refuses it."""
    from transformers import AutoConfig

    from . import modeling
    from .recipes import distill

    spec = config.spec
    teacher = distill.teacher_spec(spec)
    source = modeling.resolve_config_source(
        teacher, base_dir=config.base_dir, cache_dir=Path(config.work_dir) / "cache"
    )
    try:
        with modeling.spec_errors(teacher):
            loaded = AutoConfig.from_pretrained(source.path, **modeling._common_kwargs(source, teacher))
        theirs = modeling.load_tokenizer(source, teacher)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"spec.task.distill.teacher: cannot read the config and tokenizer of {teacher.uri}: {exc}"
        ) from None
    distill.check_vocabulary(theirs, tokenizer, spec)
    teacher_config: dict[str, Any] = loaded.to_dict()
    return teacher_config


def memory_estimate(
    model_config: dict[str, Any],
    spec: FineTuneJobSpec,
    *,
    world_size: int,
    tokenizer_length: int,
    teacher_config: dict[str, Any] | None = None,
) -> tuple[memory.MemoryEstimate | None, str | None]:
    """The per-rank estimate, or None and why (an architecture or a spec the estimator does not model)."""
    device: Literal["cuda", "cpu"] = "cpu" if spec.resources.gpus_per_node == 0 else "cuda"
    try:
        estimate = memory.estimate(
            model_config,
            spec,
            world_size=world_size,
            tokenizer_length=tokenizer_length,
            device=device,
            teacher_config=teacher_config,
        )
    except (memory.UnsupportedModel, memory.EstimateError) as exc:
        return None, f"no memory estimate: {exc}"
    return estimate, None


# --------------------------------------------------------------------------------------------------
# The preflight
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """The result and the exit code."""

    result: PreflightResult
    exit_code: int
    #: The human-readable reason of a refusal (standard error), empty when none.
    reason: str = ""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _data_error(found: dict[str, Any], problems: list[str], bad: int) -> Outcome:
    """Exit 3: the problems as the trainer prints them (the first :data:`MAX_REPORTED`), the first
    :data:`MAX_PROBLEMS` in the result."""
    shown = problems[:MAX_REPORTED]
    total = max(bad, len(problems))
    more = f"\n... and {total - len(shown)} more" if total > len(shown) else ""
    reason = "invalid data:\n" + "\n".join(shown) + more
    kept = [_clip(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS]]
    return Outcome(PreflightResult(**found, bad_records=total, problems=kept), EXIT_INVALID_DATA, reason)


def _config_error(found: dict[str, Any], message: str) -> Outcome:
    result = PreflightResult(**found, problems=[_clip(message, MAX_PROBLEM_CHARS)])
    return Outcome(result, EXIT_INVALID_CONFIG, f"invalid configuration: {message}")


#: The preflight is one process: it checks and builds the tokenized cache as a run's only rank would.
SINGLE_PROCESS = World(rank=0, local_rank=0, world_size=1, local_world_size=1)


def preflight(config: TrainerConfig, *, world_size: int | None = None) -> Outcome:
    """Run every check (module docstring) and return the outcome; a refusal is an outcome, not raised."""
    from .data import pipeline, vocabulary

    spec = config.spec
    world = world_size or memory.world_size_of(spec)
    found: dict[str, Any] = {}
    try:
        found["write_access"] = probe_storage(config)
        try:
            checked = pipeline.check(config, SINGLE_PROCESS)
        except DataError as exc:
            return _data_error(found, exc.problems, exc.total)
        model_config, tokenizer = load_model_config(config)
        teacher_config = load_teacher_config(config, tokenizer) if spec.task.type == "distill" else None
        estimate, note = memory_estimate(
            model_config, spec, world_size=world, tokenizer_length=len(tokenizer), teacher_config=teacher_config
        )
        if estimate is not None:
            found["memory"] = PreflightMemory.model_validate(estimate.to_dict())
        elif note is not None:
            found["memory_note"] = _clip(note, MAX_NOTE_CHARS)
        try:
            vocabulary.extend(config, tokenizer, checked, SINGLE_PROCESS)  # spec.model.mineTokens, as a run mines
            prepared = pipeline.prepare(config, tokenizer, world=SINGLE_PROCESS, checked=checked, world_size=world)
        except DataError as exc:  # a record the tokenization refuses (a QA question too long for a window)
            return _data_error(found, exc.problems, exc.total)
    except ConfigError as exc:
        return _config_error(found, str(exc))
    stats = prepared.stats
    result = PreflightResult(
        **found,
        train_records=stats.train_records,
        eval_records=stats.eval_records,
        bad_records=stats.bad_records,
        token_length_p50=stats.token_length_p50,
        token_length_p95=stats.token_length_p95,
        token_length_max=stats.token_length_max,
        truncated_fraction=stats.truncated_fraction,
        tokens_per_epoch=stats.tokens_per_epoch,
        steps_per_epoch=stats.steps_per_epoch,
        cache_uri=stats.cache_uri,
        cache_hit=stats.cache_hit,
    )
    return Outcome(result, EXIT_OK)


def result_json(result: PreflightResult) -> str:
    """The result as compact JSON, by alias, without the fields it has no value for."""
    return json.dumps(result.model_dump(by_alias=True, exclude_none=True, mode="json"), separators=(",", ":"))


def termination_text(result: PreflightResult, limit: int = TERMINATION_MESSAGE_MAX_BYTES) -> str:
    """The result as compact JSON of fewer than ``limit`` bytes: problems dropped from the last first,
    then the memory note shortened."""
    problems = list(result.problems)
    note = result.memory_note
    while True:
        text = result_json(result.model_copy(update={"problems": problems, "memory_note": note}))
        size = len(text.encode())
        if size < limit:
            return text
        if problems:
            problems.pop()
        elif note:
            note = note[: max(len(note) - (size - limit + 1), 0)] or None
        else:  # unreachable: every other field is short
            return text[: limit - 1]


def termination_log_path() -> str | None:
    """``FINETUNE_TERMINATION_LOG``, else Kubernetes' default path when it exists and is writable."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        return path
    if os.path.exists(TERMINATION_LOG) and os.access(TERMINATION_LOG, os.W_OK):
        return TERMINATION_LOG
    return None


def write_termination_log(result: PreflightResult) -> None:
    path = termination_log_path()
    if path is None:
        return
    try:
        Path(path).write_text(termination_text(result), encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_trainer preflight", description=__doc__)
    parser.add_argument("--config", required=True, help="trainer config JSON (written by the operator or finetune)")
    parser.add_argument("--result", help="also write the result JSON here")
    parser.add_argument(
        "--world-size", type=int, help="data-parallel ranks (default: spec.distributed.nodes x procsPerNode)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_trainer_config(args.config)
    except (OSError, ValidationError) as exc:
        outcome = _config_error({}, f"invalid trainer config {args.config}: {exc}")
    else:
        outcome = preflight(config, world_size=args.world_size)
    result = outcome.result.model_copy(update={"completed_at": datetime.now(UTC).replace(microsecond=0)})
    write_termination_log(result)
    if outcome.reason:
        print(outcome.reason, file=sys.stderr, flush=True)
    text = result_json(result)
    if args.result:
        Path(args.result).write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
