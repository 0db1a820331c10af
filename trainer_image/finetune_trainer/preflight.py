"""``python -m finetune_trainer preflight --config FILE [--result FILE] [--world-size N]``: everything a
job can be refused for, checked on a CPU before any GPU is held.

The operator runs it as a CPU-only Job before the GPU Job exists; ``finetune plan`` and ``finetune run``
run it as a subprocess on this machine. In the order that keeps a refusal cheap:

1. **Write access**: a small object is written and deleted under the checkpoint directory and under the
   output directory, through the same filesystems training writes them with; a refused write is a
   permanent configuration error (exit 2) naming ``spec.checkpoint.uri`` or ``spec.output.uri``.
2. **Every record** of the training, evaluation and general-evaluation data read and checked, all
   problems of every source collected (exit 3, each ``file:line: reason``), before the model is
   touched at all.
3. **The model's config and tokenizer only**, never its weights
   (:func:`~.modeling.resolve_config_source`): a model in object storage is copied without its weight
   files; a Hub model's config and tokenizer loaders fetch their own files only.
4. **Tokenization** by the recipe's own functions, so the figures are those of training: token lengths
   of the training records (before truncation: p50, p95 and max by the nearest-rank definition), the
   fraction of records that lose tokens to ``data.maxSeqLength`` (none for packed ``text``, cut into
   blocks, nor for ``qa``, split into overlapping windows), the tokens of one epoch (the rows' tokens
   after truncation and packing; with class resampling, those of the resampled epoch) and the optimizer
   steps of one epoch (as :func:`~.harness.planned_steps` counts them). A record the tokenization refuses
   (a QA question too long for a window, a chat template that cannot be located) is bad data too.
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
import math
import os
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from finetune_operator.api import memory
from finetune_operator.api.tasks import DataFormat, task_row
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
    DataSource,
    FineTuneJobSpec,
    PreflightMemory,
    PreflightResult,
)
from pydantic import ValidationError

from . import storage
from .data.records import MAX_REPORTED, DataError, Record, load_checked, split_eval
from .errors import ConfigError

#: Bad-record messages kept in the result (the termination message keeps fewer when it must).
MAX_PROBLEMS = PREFLIGHT_MAX_PROBLEMS
#: The result's length limits of one problem and of the memory note.
MAX_PROBLEM_CHARS = 2048
MAX_NOTE_CHARS = 1024
PROBE_PREFIX = ".finetune-preflight-"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Data: checked records and their statistics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Records:
    """The checked records of a run (as :meth:`~.harness.Run.read_data` reads them) and every problem
    met reading and checking them (``file:line: reason``)."""

    train: list[Record]
    eval: list[Record]
    general: list[Record]
    problems: list[str] = field(default_factory=list)
    bad: int = 0


def _count(exc: DataError) -> int:
    """All the problems a DataError stands for, also those past the ones it lists."""
    total = getattr(exc, "total", None)
    if isinstance(total, int):
        return total
    more = re.search(r"\n\.\.\. and (\d+) more$", str(exc))
    return len(exc.problems) + (int(more.group(1)) if more else 0)


def read_records(config: TrainerConfig) -> Records:
    """Every source read and checked, the problems of all of them collected (not only the first
    source's), then the eval split held out, as the harness does."""
    spec, base = config.spec, config.base_dir
    data = spec.data
    problems: list[str] = []
    bad = 0

    def checked(source: DataSource, fmt: DataFormat, *, with_task: bool) -> list[Record]:
        nonlocal bad
        try:
            return load_checked(source, fmt, data.columns, task=spec.task if with_task else None, base_dir=base)
        except DataError as exc:
            problems.extend(exc.problems)
            bad += _count(exc)
            return []

    train = checked(data.train, data.format, with_task=True)
    held_out = checked(data.eval, data.format, with_task=True) if data.eval is not None else []
    forgetting = spec.training.forgetting
    general_source = forgetting.general_eval if forgetting else None
    general = checked(general_source, "text", with_task=False) if general_source else []
    if data.eval is None and train and not problems:
        try:
            train, held_out = split_eval(train, data.eval_split, spec.training.seed)
        except DataError as exc:
            problems.extend(exc.problems)
            bad += _count(exc)
    return Records(train, held_out, general, problems, bad)


@dataclass(frozen=True)
class DataStats:
    """What the training data becomes: records, token lengths, rows, tokens and steps of one epoch."""

    train_records: int
    eval_records: int
    #: Each training record's token count before truncation, in record order.
    token_lengths: list[int]
    #: Training records that lose tokens to ``data.maxSeqLength``.
    truncated: int
    #: Rows of one epoch (after packing, QA windows or class resampling).
    rows: int
    tokens_per_epoch: int
    steps_per_epoch: int
    cache_uri: str | None = None
    cache_hit: bool = False

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.train_records if self.train_records else 0.0


def nearest_rank(values: Sequence[int], q: float) -> int:
    """The ``q`` quantile (0 < q <= 1) of ``values`` by the nearest-rank definition: the smallest value
    with at least ``q`` of the values at or below it (0 for no values)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def steps_per_epoch(spec: FineTuneJobSpec, rows: int, world_size: int) -> int:
    """Optimizer steps of one epoch over ``rows`` rows, as transformers' Trainer counts them: each rank's
    share of the rows (the sampler pads to equal shares) in micro-batches, ``gradientAccumulationSteps``
    of them a step, at least one. :func:`~.harness.planned_steps` of a one-epoch run (a test holds them
    equal; the harness is not imported: it loads transformers' Trainer, seconds of a preflight)."""
    t = spec.training
    batches = math.ceil(math.ceil(rows / world_size) / t.per_device_batch_size)
    return max(batches // t.gradient_accumulation_steps, 1)


def data_stats(spec: FineTuneJobSpec, records: Records, tokenizer: Any, *, world_size: int) -> DataStats:
    """Tokenize the records with the task recipe's own functions (the evaluation and general-text
    records too: the tokenization can refuse a record, a DataError) and measure the training data."""
    recipe = task_row(spec.task.type).recipe
    data = spec.data
    untruncated = data.model_copy(update={"max_seq_length": sys.maxsize})
    train = records.train
    if recipe == "causal_lm":
        from .data.examples import build_examples
        from .data.packing import pack, pack_documents

        # The rows recipes.causal_lm trains on (its _examples; not imported: the recipe loads the Trainer).
        if data.packing and data.format == "text":
            rows = pack_documents(train, tokenizer, data)
        elif data.packing:
            rows = pack(build_examples(train, tokenizer, data), data.max_seq_length)
        else:
            rows = build_examples(train, tokenizer, data)
        build_examples(records.eval, tokenizer, data)
        build_examples(records.general, tokenizer, data.model_copy(update={"format": "text"}))
        lengths = [len(e) for e in build_examples(train, tokenizer, untruncated)]
        # Packed documents are cut into blocks, nothing dropped; every other row is cut at maxSeqLength.
        cut = data.packing and data.format == "text"
        truncated = 0 if cut else sum(n > data.max_seq_length for n in lengths)
        row_tokens = [len(r) for r in rows]
    elif recipe == "classification":
        from .data.classification import build_examples as classification_examples
        from .data.classification import target_classes
        from .data.sampling import ClassBalancedSampler

        params = spec.task.classification
        assert params is not None  # required for classification by the API
        examples = classification_examples(train, tokenizer, data, spec.task)
        classification_examples(records.eval, tokenizer, data, spec.task)
        lengths = [len(e) for e in classification_examples(train, tokenizer, untruncated, spec.task)]
        truncated = sum(n > data.max_seq_length for n in lengths)
        order = list(range(len(examples)))
        if params.resampling != "none" and examples:
            classes = [c for (c,) in target_classes(examples)]  # single-label: the API refuses multiLabel here
            order = ClassBalancedSampler(classes, params.resampling, seed=spec.training.seed).epoch_indices(0)
        row_tokens = [len(examples[i]) for i in order]
    elif recipe == "qa":
        from finetune_operator.api.v1alpha1 import QAParams

        from .data import qa as qa_data

        qa = spec.task.qa or QAParams()
        windows = qa_data.windows(train, tokenizer, data, qa)
        qa_data.windows(records.eval, tokenizer, data, qa)
        c = data.columns
        lengths = [len(tokenizer(r.data[c.question], r.data[c.context])["input_ids"]) for r in train]
        truncated = 0  # a long context is split into overlapping windows, nothing dropped
        row_tokens = [len(w) for w in windows]
    else:  # unreachable: the API refuses a task without a recipe
        raise ConfigError(f"spec.task.type {spec.task.type} has no recipe")
    return DataStats(
        train_records=len(train),
        eval_records=len(records.eval),
        token_lengths=lengths,
        truncated=truncated,
        rows=len(row_tokens),
        tokens_per_epoch=sum(row_tokens),
        steps_per_epoch=steps_per_epoch(spec, len(row_tokens), world_size),
    )


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
        loaded = AutoConfig.from_pretrained(source.path, **kwargs)
        tokenizer = modeling.load_tokenizer(source, spec.model)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"spec.model.uri: cannot read the config and tokenizer of {spec.model.uri}: {exc}") from None
    raw = Path(source.path) / "config.json"
    if source.is_local and not source.gguf_file and raw.is_file():
        model_config: dict[str, Any] = json.loads(raw.read_text(encoding="utf-8"))
    else:
        model_config = loaded.to_dict()
    return model_config, tokenizer


def memory_estimate(
    model_config: dict[str, Any], spec: FineTuneJobSpec, *, world_size: int, tokenizer_length: int
) -> tuple[memory.MemoryEstimate | None, str | None]:
    """The per-rank estimate, or None and why (an architecture or a spec the estimator does not model)."""
    device: Literal["cuda", "cpu"] = "cpu" if spec.resources.gpus_per_node == 0 else "cuda"
    try:
        estimate = memory.estimate(
            model_config, spec, world_size=world_size, tokenizer_length=tokenizer_length, device=device
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


def preflight(config: TrainerConfig, *, world_size: int | None = None) -> Outcome:
    """Run every check (module docstring) and return the outcome; a refusal is an outcome, not raised."""
    spec = config.spec
    world = world_size or memory.world_size_of(spec)
    found: dict[str, Any] = {}
    try:
        found["write_access"] = probe_storage(config)
        records = read_records(config)
        found.update(train_records=len(records.train), eval_records=len(records.eval))
        if records.problems:
            return _data_error(found, records.problems, records.bad)
        model_config, tokenizer = load_model_config(config)
        estimate, note = memory_estimate(model_config, spec, world_size=world, tokenizer_length=len(tokenizer))
        if estimate is not None:
            found["memory"] = PreflightMemory.model_validate(estimate.to_dict())
        elif note is not None:
            found["memory_note"] = _clip(note, MAX_NOTE_CHARS)
        try:
            stats = data_stats(spec, records, tokenizer, world_size=world)
        except DataError as exc:
            return _data_error(found, exc.problems, _count(exc))
    except ConfigError as exc:
        return _config_error(found, str(exc))
    result = PreflightResult(
        **found,
        token_length_p50=nearest_rank(stats.token_lengths, 0.50),
        token_length_p95=nearest_rank(stats.token_lengths, 0.95),
        token_length_max=max(stats.token_lengths, default=0),
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
