"""Recipe: causal-LM fine-tuning — supervised fine-tuning (``sft``) and continual pre-training (``pretrain``).

Supports every method (full/freeze, LoRA, QLoRA, prefix, prompt, IA3, AdaLoRA), the
``promptCompletion``, ``chat`` and ``text`` formats, packing, DDP under torchrun, DeepSpeed ZeRO 1-3,
evaluation (loss and perplexity) every N steps, early stopping with the best model loaded at the end,
perplexity on general text before and after training (``training.forgetting.generalEval``), and the
output contract (adapter and/or merged model with a sha256 manifest).

The order matters: data is read and checked first (no accelerator memory is touched before every
record is known to be good), then the TrainingArguments are built (ZeRO-3 must exist before the model
is instantiated), then the resume decision is taken (a checkpoint of another spec fails the run before
any model is loaded), then the model is loaded and the method applied.

Around the training: Prometheus metrics on every rank (``telemetry``), SIGTERM handling, periodic
checkpoints to the store and automatic resume (``checkpointing``), and progress into the FineTuneJob's
status from rank 0 when running in a cluster (``status``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from finetune_operator.api.v1alpha1 import DataSpec
from finetune_operator.api.trainer_config import TrainerConfig
from transformers import PrinterCallback, Trainer, set_seed
from transformers.trainer_utils import EvalLoopOutput

from .. import checkpointing, distributed, methods, modeling, storage
from ..causal_lm_data import (
    CausalLMCollator,
    Example,
    ExampleDataset,
    build_examples,
    pack,
    pack_documents,
    split_eval,
)
from ..checkpoint_store import Manifest, describe
from ..faults import LossFaults
from ..outputs import save_outputs
from ..progress import ProgressReporter
from ..records import Record, load_checked
from ..status import StatusReporter
from ..telemetry import TelemetryCallback, TrainingMetrics, metrics_port
from ..training_args import training_arguments


class CausalLMTrainer(Trainer):
    """transformers' Trainer, with perplexity reported next to every evaluation loss and timed saves."""

    telemetry: TrainingMetrics | None = None
    faults = LossFaults()

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, *args, **kwargs)
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        if isinstance(result, tuple):
            return (self.faults.apply(result[0], step=step, training=model.training), *result[1:])
        return self.faults.apply(result, step=step, training=model.training)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.monotonic()
        super()._save_checkpoint(model, trial)
        if self.telemetry is not None:
            self.telemetry.observe_save(time.monotonic() - started)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
        return output


def _examples(records: list[Record], tokenizer: Any, data: DataSpec, *, for_training: bool) -> list[Example]:
    if for_training and data.packing:
        if data.format == "text":
            return pack_documents(records, tokenizer, data)
        return pack(build_examples(records, tokenizer, data), data.max_seq_length)
    return build_examples(records, tokenizer, data)


def planned_steps(config: TrainerConfig, rows: int, world_size: int) -> int:
    """Optimizer steps the run will take, computed as transformers' Trainer does."""
    t = config.spec.training
    if t.max_steps is not None:
        return t.max_steps
    per_rank = math.ceil(rows / world_size)
    batches = math.ceil(per_rank / t.per_device_batch_size)
    per_epoch = max(batches // t.gradient_accumulation_steps, 1)
    assert t.epochs is not None
    return math.ceil(t.epochs * per_epoch)


def start_metrics(config: TrainerConfig, world: distributed.World) -> TrainingMetrics | None:
    if not config.spec.metrics.enabled:
        return None
    metrics = TrainingMetrics(namespace=config.job.namespace, job=config.job.name, rank=world.rank)
    metrics.serve(metrics_port(config.spec.metrics.port, world.local_rank))
    return metrics


def _zero_stage(args: Any) -> int | None:
    ds = args.deepspeed
    if isinstance(ds, dict):
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        return int(stage) if isinstance(stage, int) else None
    return None


def _status_sink(status: StatusReporter) -> Any:
    def sink(record: dict[str, Any]) -> None:
        status.update(
            step=record.get("step"),
            totalSteps=record.get("total_steps"),
            epoch=record.get("epoch"),
            loss=record.get("loss"),
            evalLoss=record.get("eval_loss"),
            learningRate=record.get("learning_rate"),
            tokensPerSecond=record.get("tokens_per_second"),
            etaSeconds=record.get("eta_seconds"),
            lastCheckpointStep=record.get("last_checkpoint_step"),
        )

    return sink


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    world = distributed.World.from_env()
    telemetry = start_metrics(config, world)
    preemption = checkpointing.Preemption(save=config.spec.checkpoint.save_on_preemption, metrics=telemetry)
    preemption.install()
    status = StatusReporter.from_env() if world.is_main else None
    try:
        return _run(config, world, telemetry, preemption, status)
    finally:
        preemption.in_training = False
        if status is not None:
            status.close()


def _run(
    config: TrainerConfig,
    world: distributed.World,
    telemetry: TrainingMetrics | None,
    preemption: checkpointing.Preemption,
    status: StatusReporter | None,
) -> dict[str, Any]:
    spec = config.spec
    work = Path(config.work_dir)
    started = time.time()

    # 1. Data, checked before anything heavy happens.
    data = spec.data
    train_records = load_checked(data.train, data.format, data.columns, base_dir=config.base_dir)
    if data.eval is not None:
        eval_records = load_checked(data.eval, data.format, data.columns, base_dir=config.base_dir)
    else:
        train_records, eval_records = split_eval(train_records, data.eval_split, spec.training.seed)
    general = spec.training.forgetting.general_eval if spec.training.forgetting else None
    general_records = load_checked(general, "text", data.columns, base_dir=config.base_dir) if general else []

    # 2. Process group and TrainingArguments before the model (ZeRO-3 partitions at load time).
    distributed.init(world, spec.distributed.backend, deepspeed=spec.distributed.deepspeed is not None)
    store = checkpointing.open_store(config)
    args = training_arguments(
        spec,
        output_dir=work / "hf-checkpoints",
        base_dir=config.base_dir,
        has_eval=bool(eval_records),
        checkpoint_store=store is not None,
    )

    # 3. Resume: rank 0 picks the newest committed checkpoint (refusing one of another spec); every
    # node downloads it into the local staging directory, where transformers restores from.
    zero_stage = _zero_stage(args)
    plan = checkpointing.plan_resume(config, world, store, zero_stage) if store else checkpointing.ResumePlan()
    resume_dir = checkpointing.fetch(plan, store, Path(args.output_dir), world) if store else None
    if status is not None and plan.kept is not None:
        status.set_checkpoints(describe(plan.kept))

    # 4. Tokenizer, examples, model, method.
    source = modeling.resolve_source(spec.model, base_dir=config.base_dir, cache_dir=work / "cache", world=world)
    tokenizer = modeling.load_tokenizer(source, spec.model)
    train_examples = _examples(train_records, tokenizer, data, for_training=True)
    eval_examples = _examples(eval_records, tokenizer, data, for_training=False)
    # General text is plain text whatever the task's format.
    general_data = data.model_copy(update={"format": "text"})
    general_examples = _examples(general_records, tokenizer, general_data, for_training=False)
    total_steps = planned_steps(config, len(train_examples), world.world_size)

    ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=total_steps)
    set_seed(spec.training.seed)  # the same initial adapter weights on every rank and every run
    model = modeling.load_causal_lm(
        source,
        spec.model,
        dtype=modeling.model_dtype(spec.model.dtype),
        overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
        **methods.load_kwargs(ctx),
    )
    model.config.use_cache = False  # no KV cache in training (it would also disable packed-sequence masks)
    attention = getattr(model.config, "_attn_implementation", None)  # as resolved by transformers
    ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
    model = methods.apply(model, ctx)

    collator = CausalLMCollator.for_attention(tokenizer.pad_token_id, attention)
    reporter = ProgressReporter(
        world, collator, work / "metrics.jsonl", sink=_status_sink(status) if status is not None else None
    )
    if plan.manifest is not None:
        reporter.last_checkpoint_step = plan.manifest.step
        if telemetry is not None:
            telemetry.committed(plan.manifest.step, plan.manifest.committed_at)
    best = checkpointing.best_metric(spec, has_eval=bool(eval_examples))
    holder: dict[str, Trainer] = {}

    def on_commit(manifest: Manifest, kept: list[Manifest]) -> None:
        reporter.last_checkpoint_step = manifest.step
        if status is not None:
            status.set_checkpoints(describe(kept))

    uploader = None
    if store is not None and world.is_local_main:
        uploader = checkpointing.Uploader(
            store,
            world=world,
            keep_last=spec.checkpoint.keep_last,
            best=best,
            zero_stage=zero_stage,
            metrics=telemetry,
            on_commit=on_commit if world.is_main else None,
            protected=lambda: {holder["trainer"].state.best_model_checkpoint} if "trainer" in holder else set(),
        )
    checkpoint_callback = checkpointing.CheckpointCallback(
        spec,
        world=world,
        store=store,
        uploader=uploader,
        preemption=preemption,
        best=best,
        resumed=plan.manifest,
        best_so_far=plan.best,
        metrics=telemetry,
    )
    callbacks: list[Any] = [reporter, checkpoint_callback, *methods.callbacks(model, ctx)]
    if telemetry is not None:
        callbacks.append(TelemetryCallback(telemetry, collator))
    if spec.training.early_stopping is not None and args.load_best_model_at_end:
        from transformers import EarlyStoppingCallback

        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=spec.training.early_stopping.patience,
                early_stopping_threshold=spec.training.early_stopping.threshold,
            )
        )
    trainer = CausalLMTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_examples),
        eval_dataset=ExampleDataset(eval_examples) if eval_examples else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    trainer.remove_callback(PrinterCallback)  # our ProgressReporter prints instead
    trainer.telemetry = telemetry
    checkpoint_callback.trainer = trainer
    holder["trainer"] = trainer

    # 5. Train, measuring held-out and general perplexity before and after.
    summary: dict[str, Any] = {
        "job": config.job.model_dump(),
        "method": spec.method.type,
        "task": spec.task.type,
        "world_size": world.world_size,
    }
    before = _evaluate(trainer, eval_examples, general_examples)
    result = trainer.train(resume_from_checkpoint=resume_dir)
    preemption.in_training = False  # from here on SIGTERM exits at once: the final checkpoint is committed
    if uploader is not None:
        uploader.wait()
    distributed.barrier()
    after = _evaluate(trainer, eval_examples, general_examples)
    summary.update(
        train_loss=result.training_loss,
        steps=trainer.state.global_step,
        resumed_from_step=plan.manifest.step if plan.manifest else None,
        last_checkpoint=(uploader.committed.uri if uploader and uploader.committed else None),
        before=before,
        after=after,
        tokens_per_second=reporter.latest.get("tokens_per_second"),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        best_checkpoint=trainer.state.best_model_checkpoint,
        zero3_partitioned_parameters=sum(1 for p in model.parameters() if hasattr(p, "ds_id") and p.numel() == 0),
        optimizer=_optimizer_name(trainer),
    )

    # 6. Outputs (rank 0 writes; ZeRO-3 gathers the full weights first).
    if spec.distributed.deepspeed is not None and spec.distributed.deepspeed.zero_stage == 3:
        trainer.save_model(str(work / "zero3-gathered"))
    if world.is_main:
        staging = (
            work / "output-staging"
            if storage.is_remote(config.output_dir)
            else Path(storage.local_path(config.output_dir))
        )
        artifacts = save_outputs(
            trainer.accelerator.unwrap_model(trainer.model),
            tokenizer,
            spec,
            staging=staging,
            destination=config.output_dir,
            run_files=[work / "metrics.jsonl"],
        )
        summary["artifacts"] = [a.__dict__ for a in artifacts]
        summary["runtime_seconds"] = time.time() - started
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
        _print_summary(summary)
    distributed.barrier()
    return summary


def _optimizer_name(trainer: Trainer) -> str:
    """The class of the optimizer that steps the weights (DeepSpeed's own, e.g. its CPU Adam under
    ZeRO-Offload, rather than the ZeRO wrapper; torch's rather than accelerate's wrapper)."""
    optimizer = getattr(trainer.deepspeed, "basic_optimizer", None) or trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return type(optimizer).__name__


def _evaluate(trainer: Trainer, eval_examples: list[Example], general_examples: list[Example]) -> dict[str, float]:
    out: dict[str, float] = {}
    if eval_examples:
        out.update(trainer.evaluate())
    if general_examples:
        out.update(trainer.evaluate(eval_dataset=ExampleDataset(general_examples), metric_key_prefix="general"))
    return {k: v for k, v in out.items() if k.endswith(("_loss", "_perplexity"))}


def _print_summary(summary: dict[str, Any]) -> None:
    lines = [f"done: {summary['steps']} steps, train loss {summary['train_loss']:.4f}"]
    for key in ("eval_perplexity", "general_perplexity"):
        if key in summary["before"]:
            lines.append(f"{key}: {summary['before'][key]:.3f} -> {summary['after'][key]:.3f}")
    for artifact in summary.get("artifacts", []):
        lines.append(
            f"{artifact['kind']}: {artifact['uri']} (sha256 {artifact['sha256'][:12]}…, {artifact['bytes']:,} B)"
        )
    print("\n".join(lines), flush=True)
