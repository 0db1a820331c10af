"""The run harness: what every recipe shares, composed by the recipe in a few lines.

A recipe (one module per task under ``recipes/``) supplies what is particular to its task: how
records become examples, the model and its head, the collator, the Trainer class (transformers' or
trl's) with its arguments, and its metrics. The harness does the rest, in the order that keeps a
failing run cheap:

1. :meth:`Run.open` — this process's place in the gang (:class:`~.distributed.World`), Prometheus
   metrics, SIGTERM handling and the FineTuneJob status reporter; all closed in every outcome.
2. :meth:`Run.read_data` — every record of the train, eval and general-eval data read and checked
   before anything heavy happens: a bad record exits 3 before the model is opened (phase 1 of the
   data pipeline, :mod:`.data.pipeline`, whose :func:`~.data.pipeline.prepare` then gives the recipe
   its token rows, from the tokenized cache when a run built it before).
3. :meth:`Run.prepare` — the process group, the TrainingArguments (before the model: ZeRO-3
   partitions at load time) and the resume decision (a checkpoint of another spec fails the run
   before any model is loaded); the chosen checkpoint is downloaded and verified on every node.
4. :meth:`Prepared.trainer` — the recipe's Trainer class with the harness's hooks (every micro-batch
   loss watched, saves timed) and the shared callbacks: progress, checkpoints (:mod:`.checkpointing`
   alone decides when to save and which checkpoints are kept), telemetry, early stopping.
5. :meth:`Training.train` and :meth:`Training.save_outputs` — training between two evaluations, the
   summary, the artifacts and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifact, FineTuneJobSpec, ModelSpec, Progress
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from . import checkpointing, distributed, modeling, provenance, storage
from .checkpoint_store import CheckpointStore, Manifest, describe
from .data import pipeline
from .faults import LossFaults
from .outputs import EVALUATION_FILE, SAMPLES_FILE, TRAINER_CONFIG_FILE, save_outputs
from .outputs import Artifact as SavedArtifact
from .progress import ProgressReporter
from .status import StatusReporter
from .telemetry import TelemetryCallback, TrainingMetrics, metrics_port
from .throughput import Counts, Throughput
from .training_args import training_arguments

TrainerT = TypeVar("TrainerT", bound=Trainer)


def start_metrics(config: TrainerConfig, world: distributed.World) -> TrainingMetrics | None:
    """Prometheus metrics of this rank, served on ``spec.metrics.port`` + local rank (None when off)."""
    if not config.spec.metrics.enabled:
        return None
    metrics = TrainingMetrics(namespace=config.job.namespace, job=config.job.name, rank=world.rank)
    metrics.serve(metrics_port(config.spec.metrics.port, world.local_rank))
    return metrics


def planned_steps(spec: FineTuneJobSpec, rows: int, world_size: int) -> int:
    """Optimizer steps the run will take, computed as transformers' Trainer does."""
    t = spec.training
    if t.max_steps is not None:
        return t.max_steps
    per_rank = math.ceil(rows / world_size)
    batches = math.ceil(per_rank / t.per_device_batch_size)
    per_epoch = max(batches // t.gradient_accumulation_steps, 1)
    assert t.epochs is not None
    return math.ceil(t.epochs * per_epoch)


def instrumented(trainer_cls: type[TrainerT]) -> Callable[..., TrainerT]:
    """``trainer_cls`` with the harness's two hooks: every micro-batch loss goes through a
    :class:`~.checkpointing.LossWatch`, and every checkpoint save is timed into the telemetry."""

    class Instrumented(trainer_cls):  # type: ignore[valid-type,misc]
        def __init__(
            self, *args: Any, loss_watch: checkpointing.LossWatch, telemetry: TrainingMetrics | None, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.loss_watch = loss_watch
            self.telemetry = telemetry

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            result = super().compute_loss(model, inputs, *args, **kwargs)
            step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
            if isinstance(result, tuple):
                return (self.loss_watch.observe(result[0], step=step, training=model.training), *result[1:])
            return self.loss_watch.observe(result, step=step, training=model.training)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            # transformers has no hook around the save itself; on_save comes after it.
            started = time.monotonic()
            super()._save_checkpoint(model, trial)
            if self.telemetry is not None:
                self.telemetry.observe_save(time.monotonic() - started)

    Instrumented.__name__ = Instrumented.__qualname__ = trainer_cls.__name__
    return Instrumented


class Run:
    """One trainer process's run of a job: open it with :meth:`open`, then go through the phases."""

    def __init__(self, config: TrainerConfig):
        self.config = config
        self.spec = config.spec
        self.work = Path(config.work_dir)
        self.started = time.time()
        self.world = distributed.World.from_env()
        self.telemetry = start_metrics(config, self.world)
        self.preemption = checkpointing.Preemption(save=self.spec.checkpoint.save_on_preemption, metrics=self.telemetry)
        self.status = StatusReporter.from_env() if self.world.is_main else None
        #: Where the model came from, once :meth:`model_source` resolved it (for the provenance).
        self.source: modeling.ModelSource | None = None
        #: The words spec.model.mineTokens added to the tokenizer (:meth:`tokenized`).
        self.mined_tokens: list[str] = []

    @classmethod
    @contextmanager
    def open(cls, config: TrainerConfig) -> Iterator[Run]:
        run = cls(config)
        run.preemption.install()
        try:
            yield run
        finally:
            run.preemption.in_training = False
            if run.status is not None:
                run.status.close()

    def read_data(self) -> pipeline.Checked:
        """Train, eval (the file, or ``evalSplit`` of train) and general-eval records, checked (skipped
        when a committed tokenized cache of the same data exists)."""
        return pipeline.check(self.config, self.world)

    def tokenized(self, checked: pipeline.Checked, tokenizer: Any) -> pipeline.PreparedData:
        """The token rows of the checked data (:func:`.data.pipeline.prepare`): after :meth:`prepare`,
        the tokenizer being a model file. The words ``spec.model.mineTokens`` mines are added to the
        tokenizer first (:mod:`.data.vocabulary`), identically on every rank."""
        from .data import vocabulary

        self.mined_tokens = vocabulary.extend(self.config, tokenizer, checked, self.world)
        return pipeline.prepare(self.config, tokenizer, world=self.world, checked=checked)

    def model_source(self) -> modeling.ModelSource:
        """``spec.model`` as ``from_pretrained`` takes it (a remote model downloaded into the work
        directory's cache once per node, by its local rank 0)."""
        self.source = self.resolve_model(self.spec.model, field="spec.model.uri", cache_dir=self.work / "cache")
        return self.source

    def resolve_model(self, model: ModelSpec, *, field: str, cache_dir: Path) -> modeling.ModelSource:
        """Any model of the spec (``field`` names it: the base model, a reward or reference model) as
        ``from_pretrained`` takes it; one taken from another job (``ftj://``, resolved by the operator or
        ``finetune run``) verified to be the very output it was resolved to."""
        source = modeling.resolve_source(model, base_dir=self.config.base_dir, cache_dir=cache_dir, world=self.world)
        expected = self.config.model_digests.get(model.uri)
        if expected is not None:
            modeling.verify_artifact(source, model.uri, expected, base_dir=self.config.base_dir, field=field)
        return source

    def prepare(
        self,
        *,
        has_eval: bool,
        args_class: type[TrainingArguments] = TrainingArguments,
        task_args: dict[str, Any] | None = None,
    ) -> Prepared:
        """Process group, TrainingArguments and the resume decision, before any model is loaded.
        ``args_class`` and ``task_args``: the recipe's arguments class (a trl trainer's config) and its
        task's fields (:func:`.training_args.training_arguments`)."""
        spec = self.spec
        distributed.init(self.world, spec.distributed.backend, deepspeed=spec.distributed.deepspeed is not None)
        store = checkpointing.open_store(self.config)
        args = training_arguments(
            spec,
            output_dir=self.work / "hf-checkpoints",
            base_dir=self.config.base_dir,
            has_eval=has_eval,
            args_class=args_class,
            task_args=task_args,
        )
        zero_stage = _zero_stage(args)
        plan = checkpointing.ResumePlan()
        resume_dir = None
        if store is not None:
            assert args.output_dir is not None
            # Rank 0 picks the newest committed checkpoint (refusing one of another spec); every node
            # downloads it into the local staging directory, where transformers restores from.
            plan = checkpointing.plan_resume(self.config, self.world, store, zero_stage)
            resume_dir = checkpointing.fetch(plan, store, Path(args.output_dir), self.world)
        if self.status is not None and plan.kept is not None:
            self.status.set_checkpoints(describe(plan.kept))
        rollbacks = checkpointing.rollbacks_after_resume(store, plan, self.world)
        if self.status is not None and rollbacks:
            self.status.set_rollbacks(rollbacks)
        return Prepared(self, args, store, plan, resume_dir, zero_stage, has_eval, rollbacks)


@dataclass
class Prepared:
    """A run whose arguments and resume point are known: the recipe loads its model, then asks for
    its :meth:`trainer`."""

    run: Run
    args: TrainingArguments
    store: CheckpointStore | None
    plan: checkpointing.ResumePlan
    resume_dir: str | None
    zero_stage: int | None
    has_eval: bool
    #: The divergences rolled back before this attempt (spec.training.onDivergence rollback), oldest first.
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

    def planned_steps(self, train_rows: int) -> int:
        return planned_steps(self.run.spec, train_rows, self.run.world.world_size)

    def trainer(
        self,
        trainer_cls: type[TrainerT],
        *,
        tokens: Counts,
        callbacks: Sequence[TrainerCallback] = (),
        **kwargs: Any,
    ) -> Training:
        """The recipe's Trainer, instrumented and with the shared callbacks. ``tokens`` counts the
        tokens and rows handed to the model (the collator); ``kwargs`` go to ``trainer_cls`` (model,
        datasets, collator, processing class, compute_metrics...)."""
        run, spec, world = self.run, self.run.spec, self.run.world
        status = run.status
        throughput = Throughput(tokens)
        reporter = ProgressReporter(
            world, throughput, run.work / "metrics.jsonl", sink=_status_sink(status) if status is not None else None
        )
        if self.plan.manifest is not None:
            reporter.last_checkpoint_step = self.plan.manifest.step
            if run.telemetry is not None:
                run.telemetry.committed(self.plan.manifest.step, self.plan.manifest.committed_at)

        def on_commit(manifest: Manifest, kept: list[Manifest]) -> None:
            reporter.last_checkpoint_step = manifest.step
            if status is not None:
                status.set_checkpoints(describe(kept))

        ranking = checkpointing.best_metric(spec, has_eval=self.has_eval)
        uploader = None
        if self.store is not None and world.is_local_main:
            uploader = checkpointing.Uploader(
                self.store,
                world=world,
                keep_last=spec.checkpoint.keep_last,
                best=ranking if spec.checkpoint.keep_best else None,
                zero_stage=self.zero_stage,
                metrics=run.telemetry,
                on_commit=on_commit if world.is_main else None,
            )
        loss_watch = checkpointing.LossWatch(LossFaults(rolled_back=bool(self.rollbacks)))
        checkpoints = checkpointing.CheckpointCallback(
            spec,
            world=world,
            store=self.store,
            uploader=uploader,
            preemption=run.preemption,
            best=ranking,
            keep_best_model=self.args.load_best_model_at_end,
            resumed=self.plan.manifest,
            best_so_far=self.plan.best,
            loss_watch=loss_watch,
            metrics=run.telemetry,
        )
        shared: list[TrainerCallback] = [throughput, reporter, checkpoints]  # throughput first: the others read it
        if self.rollbacks:
            scale = float(self.rollbacks[-1]["learning_rate_scale"])
            shared.append(checkpointing.LearningRateScale(scale, spec.training.learning_rate))
        if run.telemetry is not None:
            shared.append(TelemetryCallback(run.telemetry, throughput))
        if spec.training.early_stopping is not None and self.args.load_best_model_at_end:
            shared.append(
                EarlyStoppingCallback(
                    early_stopping_patience=spec.training.early_stopping.patience,
                    early_stopping_threshold=spec.training.early_stopping.threshold,
                )
            )
        trainer = instrumented(trainer_cls)(
            args=self.args,
            callbacks=[*shared, *callbacks],
            loss_watch=loss_watch,
            telemetry=run.telemetry,
            **kwargs,
        )
        trainer.remove_callback(PrinterCallback)  # the ProgressReporter prints instead
        return Training(self, trainer, reporter, uploader)


@dataclass
class Training:
    """The recipe's Trainer with the run around it."""

    prepared: Prepared
    trainer: Trainer
    reporter: ProgressReporter
    uploader: checkpointing.Uploader | None
    summary: dict[str, Any] = field(default_factory=dict)

    def train(self, evaluate: Callable[[Trainer], dict[str, Any]]) -> dict[str, Any]:
        """Evaluate, train (resuming where the plan says), evaluate again; return the summary.
        ``evaluate`` is the recipe's before/after evaluation (its metrics, on its eval sets, and what
        else an evaluation shows: a classifier's confusion matrix)."""
        run, trainer, plan = self.prepared.run, self.trainer, self.prepared.plan
        spec = run.spec
        self.summary = {
            "job": run.config.job.model_dump(),
            "method": spec.method.type,
            "task": spec.task.type,
            "world_size": run.world.world_size,
        }
        if spec.model.mine_tokens is not None:
            self.summary["mined_tokens"] = run.mined_tokens
        if self.prepared.rollbacks:
            self.summary["rollbacks"] = self.prepared.rollbacks
        before: dict[str, Any] = {}
        deepspeed = bool(self.prepared.args.deepspeed)
        if not deepspeed and run.world.world_size == 1:
            before = evaluate(trainer)
        elif plan.manifest is None:
            # Under DeepSpeed, transformers cannot evaluate before training (ZeRO 0-2 refuse an
            # inference engine; ZeRO-3's leaves none to train with). Under DDP, an evaluation before
            # training marks the model as prepared by accelerate, whose prepare() then leaves it
            # without its DistributedDataParallel wrapper: every rank would train on its own. Both
            # evaluate once training begins: the model is prepared (wrapped, DeepSpeed's engine
            # built) and no step is taken yet.
            trainer.add_callback(_AtTrainBegin(lambda: before.update(evaluate(trainer))))
        else:
            # When training begins, the checkpoint's weights are loaded already.
            where = "under DeepSpeed" if deepspeed else f"on {run.world.world_size} ranks"
            print(f"resumed {where}: no evaluation of the starting weights", flush=True)
        result = trainer.train(resume_from_checkpoint=self.prepared.resume_dir)
        run.preemption.in_training = False  # from here on SIGTERM exits at once: the last checkpoint is committed
        if self.uploader is not None:
            self.uploader.wait()
        distributed.barrier()
        after = evaluate(trainer)
        model = trainer.model
        assert model is not None
        self.summary.update(
            train_loss=result.training_loss,
            steps=trainer.state.global_step,
            resumed_from_step=plan.manifest.step if plan.manifest else None,
            last_checkpoint=(self.uploader.committed.uri if self.uploader and self.uploader.committed else None),
            before=before,
            after=after,
            tokens_per_second=self.reporter.latest.get("tokens_per_second"),
            trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            best_checkpoint=trainer.state.best_model_checkpoint,
            zero3_partitioned_parameters=sum(1 for p in model.parameters() if hasattr(p, "ds_id") and p.numel() == 0),
            optimizer=_optimizer_name(trainer),
        )
        return self.summary

    def save_outputs(self, tokenizer: Any, *, model: Any = None) -> dict[str, Any]:
        """The spec's outputs (rank 0 writes; ZeRO-3 gathers the full weights first) and summary.json.
        ``model``: what to save when the Trainer's model is a training wrapper around it (PPO's policy
        and value head: the policy); the Trainer's model otherwise."""
        run, trainer = self.prepared.run, self.trainer
        spec, work, config = run.spec, run.work, run.config
        if spec.distributed.deepspeed is not None and spec.distributed.deepspeed.zero_stage == 3:
            trainer.save_model(str(work / "zero3-gathered"))
        if run.world.is_main:
            staging = (
                work / "output-staging"
                if storage.is_remote(config.output_dir)
                else Path(storage.local_path(config.output_dir))
            )
            # The config goes along: what the outputs are (task, labels, format, base model) for
            # `finetune predict`, and how they were made; the evaluations before and after training
            # (with what a metric line cannot hold, e.g. a confusion matrix) for `finetune report`.
            (work / TRAINER_CONFIG_FILE).write_text(config.dumps(), encoding="utf-8")
            evaluation = {k: self.summary.get(k) for k in ("task", "steps", "before", "after")}
            (work / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2, default=float), encoding="utf-8")
            if model is None:
                model = trainer.accelerator.unwrap_model(trainer.model)
            committed = self.uploader.committed if self.uploader is not None else None
            assert run.source is not None  # the recipe resolved it to load the model
            made_by = provenance.collect(
                config,
                source=run.source,
                model_config=model.config,
                tokenizer=tokenizer,
                checkpoint_sha256=hashlib.sha256(committed.to_json().encode()).hexdigest() if committed else None,
            )
            artifacts = save_outputs(
                model,
                tokenizer,
                spec,
                staging=staging,
                destination=config.output_dir,
                run_files=[
                    work / "metrics.jsonl",
                    work / TRAINER_CONFIG_FILE,
                    work / EVALUATION_FILE,
                    work / SAMPLES_FILE,  # written by the generation metrics, when asked for
                    provenance.write(made_by, work / provenance.PROVENANCE_FILE),
                ],
            )
            self.summary["artifacts"] = [a.__dict__ for a in artifacts]
            self.summary["provenance"] = made_by.model_dump(by_alias=True, mode="json", exclude_none=True)
            if run.status is not None:
                run.status.set_outputs([_artifact(a) for a in artifacts], made_by)
            self.summary["runtime_seconds"] = time.time() - run.started
            (work / "summary.json").write_text(json.dumps(self.summary, indent=2, default=float), encoding="utf-8")
            _print_summary(self.summary)
        distributed.barrier()
        return self.summary


class _AtTrainBegin(TrainerCallback):
    """Calls ``action`` when training begins: the model is prepared (wrapped, DeepSpeed's engine
    built) and no step is taken yet."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.action()


def _artifact(artifact: SavedArtifact) -> Artifact:
    """An :class:`~.outputs.Artifact` as status.artifacts holds it."""
    return Artifact.model_validate(
        {"kind": artifact.kind, "uri": artifact.uri, "sha256": artifact.sha256, "bytes": artifact.bytes}
    )


def _zero_stage(args: TrainingArguments) -> int | None:
    ds = args.deepspeed
    if isinstance(ds, dict):
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        return int(stage) if isinstance(stage, int) else None
    return None


def _status_sink(status: StatusReporter) -> Callable[[dict[str, Any]], None]:
    def sink(record: dict[str, Any]) -> None:
        # The progress record's keys that are status.progress fields have their snake_case names.
        status.update(**{k: v for k, v in record.items() if k in Progress.model_fields and v is not None})

    return sink


def _optimizer_name(trainer: Trainer) -> str:
    """The class of the optimizer that steps the weights (DeepSpeed's own, e.g. its CPU Adam under
    ZeRO-Offload, rather than the ZeRO wrapper; torch's rather than accelerate's wrapper)."""
    optimizer = getattr(trainer.deepspeed, "basic_optimizer", None) or trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return type(optimizer).__name__


def _print_summary(summary: dict[str, Any]) -> None:
    lines = [f"done: {summary['steps']} steps, train loss {summary['train_loss']:.4f}"]
    for key in sorted(k for k in summary["before"] if k in summary["after"]):
        if key.endswith(("_perplexity", "_accuracy", "_f1", "_exact_match", "_bleu", "_rougeL", "_agreement")):
            lines.append(f"{key}: {summary['before'][key]:.3f} -> {summary['after'][key]:.3f}")
    for artifact in summary.get("artifacts", []):
        lines.append(
            f"{artifact['kind']}: {artifact['uri']} (sha256 {artifact['sha256'][:12]}…, {artifact['bytes']:,} B)"
        )
    print("\n".join(lines), flush=True)
