"""Recipe: logit distillation (``distill``) — a student causal LM taught by a frozen teacher's logits.

The student is ``spec.model`` trained by ``spec.method`` (every method but the prompt-learning ones);
the teacher is ``spec.task.distill.teacher``, any model URI (``ftj://NAME``, another job's merged
output, included), resolved and verified like every model of the spec (:meth:`..harness.Run.resolve_model`).
The data is any causal-LM format (``promptCompletion``, ``chat``, ``text``; packing allowed), tokenized
as :mod:`.causal_lm` tokenizes it.

**The objective**, over the positions the labels train (those SFT trains on: ``labels != -100``,
shifted as for a causal LM — the logits at position i predict the label at i + 1):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

(Hinton et al.'s distillation loss: T^2 keeps the KL term's gradients at the scale of the
cross-entropy's as T changes.) Both terms are sums over the positions divided by their number — as
transformers normalizes a causal LM's loss, by the trained positions of the whole accumulated batch
(``num_items_in_batch``) in training, so gradient accumulation and ranks weigh every position alike.
:func:`distillation_loss` is the pure function.

**The teacher** must have the student's vocabulary (the same tokens with the same ids: a KL between
distributions over different ids compares nothing): a ConfigError naming ``spec.task.distill.teacher``
otherwise, here and in the preflight. It is loaded as the student is (``spec.model.dtype``, attention,
trustRemoteCode, added tokens), or quantized to 4 bits (``teacherQuantization``); frozen
(``requires_grad`` off), in eval mode (no dropout), run under ``torch.no_grad``. DDP and ZeRO 1-2:
a whole copy on every rank. ZeRO-3: partitioned over the ranks as the student is (loaded under
DeepSpeed's ``zero.Init``, wrapped in an inference engine by trl's ``prepare_deepspeed``, as trl does
for DPO's reference model).

**Metrics**: training logs ``kd_loss`` (the T^2-scaled KL term) and ``ce_loss`` (the cross-entropy)
next to ``loss``, averaged over the trained positions since the last log on all ranks. Every
evaluation (the eval data, and ``forgetting.generalEval``'s general text with the prefix ``general``)
reports ``loss`` (the objective), ``kd_loss``, ``ce_loss``, ``perplexity`` (exp of the cross-entropy:
the student's perplexity on the labels) and ``agreement`` (the fraction of positions where the
student's most likely token is the teacher's), all weighed by position over the evaluated rows of
every rank; ``training.evaluation.metrics`` can leave perplexity and agreement out of the eval data's.

:func:`predict` (``finetune predict``) is the causal-LM recipe's: greedy completions after each prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import DistillParams, FineTuneJobSpec, ModelSpec
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import EvalLoopOutput

from .. import harness, methods, modeling
from ..data.collate import CausalLMCollator
from ..data.pipeline import TokenRows
from ..errors import ConfigError
from . import causal_lm
from .causal_lm import ROW_KEYS

#: The label of positions that train nothing (transformers' ignore index).
IGNORE = -100

#: What ``finetune predict`` runs on a distilled student: the causal-LM recipe's greedy completions.
predict = causal_lm.predict

#: 4-bit teacher: the dtype its matmuls dequantize to, by spec.model.dtype (bf16 for auto).
COMPUTE_DTYPES = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DistillLoss:
    """One batch's distillation loss and its parts (sums over the trained positions, for metrics)."""

    #: ``(alpha * kd_sum + (1 - alpha) * ce_sum) / normalizer``: what is differentiated.
    loss: torch.Tensor
    #: Sum over the positions of ``T^2 * KL(teacher_T || student_T)`` (detached).
    kd_sum: torch.Tensor
    #: Sum over the positions of the student's cross-entropy on the labels (detached).
    ce_sum: torch.Tensor
    #: Positions where the student's top-1 token is the teacher's (detached).
    agree: torch.Tensor
    #: Trained positions of the batch.
    positions: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> DistillLoss:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``
    over the positions whose shifted label is not :data:`IGNORE` (the logits at position i against the
    label at i + 1), both terms summed over the positions and divided by ``num_items_in_batch`` (the
    trained positions of the whole accumulated batch, as transformers counts them) or, unset, by this
    batch's. Logits are ``(..., sequence, vocabulary)``, in any float dtype (computed in fp32 at least)."""
    shifted = labels[..., 1:]
    mask = shifted != IGNORE
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # 16-bit logits computed in fp32
    student = student_logits[..., :-1, :][mask].to(dtype)  # (positions, vocabulary)
    teacher = teacher_logits[..., :-1, :][mask].to(dtype)
    targets = shifted[mask]
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    # KL(p || q) per position: sum_v p_v (log p_v - log q_v).
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    kd_sum = temperature**2 * kl.sum()
    ce_sum = F.cross_entropy(student, targets, reduction="sum")
    positions = mask.sum()
    normalizer = positions.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = (alpha * kd_sum + (1 - alpha) * ce_sum) / normalizer
    agree = (student.argmax(-1) == teacher.argmax(-1)).sum()
    return DistillLoss(loss, kd_sum.detach(), ce_sum.detach(), agree, positions)


def params_of(spec: FineTuneJobSpec) -> DistillParams:
    # The API requires spec.task.distill for task distill.
    assert spec.task.distill is not None, "spec.task.distill is required for task distill"
    return spec.task.distill


def teacher_spec(spec: FineTuneJobSpec) -> ModelSpec:
    """``spec.model`` with the teacher's URI: loaded as the student is (dtype, attention,
    trustRemoteCode, added tokens, chat template), without the student's Hub revision or GGUF file."""
    return spec.model.model_copy(update={"uri": params_of(spec).teacher, "revision": None, "gguf_file": None})


def check_vocabulary(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, spec: FineTuneJobSpec) -> None:
    """A ConfigError naming ``spec.task.distill.teacher`` when the teacher's tokens or their ids are
    not the student's (after both added spec.model.addTokens)."""
    if teacher.get_vocab() != student.get_vocab():
        theirs, ours = teacher.get_vocab(), student.get_vocab()
        differ = sorted(t for t in set(theirs) ^ set(ours))[:5] or sorted(t for t in ours if theirs[t] != ours[t])[:5]
        raise ConfigError(
            f"spec.task.distill.teacher: {params_of(spec).teacher} has another vocabulary than spec.model.uri "
            f"{spec.model.uri} ({len(teacher)} vs {len(student)} tokens; e.g. {differ} differ): distillation "
            "compares the two models' distributions over the same token ids, so the teacher needs the student's "
            "tokenizer"
        )


def load_teacher(
    run: harness.Run, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[PreTrainedModel, modeling.ModelSource]:
    """The frozen teacher in eval mode (under ZeRO-3 partitioned at load, as the student is), after
    checking its vocabulary."""
    spec = run.spec
    params = params_of(spec)
    model_spec = teacher_spec(spec)
    source = run.resolve_model(model_spec, field="spec.task.distill.teacher", cache_dir=run.work / "cache")
    check_vocabulary(modeling.load_tokenizer(source, model_spec), tokenizer, spec)
    extra: dict[str, Any] = {}
    if params.teacher_quantization != "none":
        extra = {
            # transformers leaves BitsAndBytesConfig.__init__ unannotated.
            "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True,
                bnb_4bit_quant_type=params.teacher_quantization,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=COMPUTE_DTYPES[spec.model.dtype],
            ),
            "device_map": {"": str(device)},
        }
    set_seed(spec.training.seed)  # added tokens' rows drawn as the student's were
    teacher = modeling.load_causal_lm(source, model_spec, dtype=modeling.model_dtype(spec.model.dtype), **extra)
    teacher.config.use_cache = False
    modeling.grow_embeddings(teacher, tokenizer)
    teacher.requires_grad_(False)
    teacher.train(False)  # dropout off: the teacher is evaluated, never trained
    return teacher, source


def _zero3() -> bool:
    """Whether the run's DeepSpeed config is ZeRO-3 (models loaded now are partitioned at load)."""
    return bool(is_deepspeed_zero3_enabled())  # type: ignore[no-untyped-call]  # transformers leaves it unannotated


class _Sums:
    """Per-rank sums of the loss's parts over micro-batches, reduced over the ranks when read."""

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None  # kd_sum, ce_sum, agree, positions

    def add(self, part: DistillLoss) -> None:
        row = torch.stack([part.kd_sum, part.ce_sum, part.agree.to(part.kd_sum), part.positions.to(part.kd_sum)])
        self.values = row if self.values is None else self.values + row

    def take(self, trainer: Trainer) -> tuple[float, float, float, float] | None:
        """(kd, ce, agreement, positions) averaged over the positions of every rank, and reset."""
        values, self.values = self.values, None
        if values is None:
            values = torch.zeros(4, device=trainer.args.device)
        if trainer.accelerator.num_processes > 1:
            values = trainer.accelerator.reduce(values, reduction="sum")
        kd, ce, agree, positions = (float(v) for v in values)
        if positions == 0:
            return None
        return kd / positions, ce / positions, agree / positions, positions


class DistillTrainer(Trainer):
    """transformers' Trainer with the distillation loss against a frozen teacher, logging ``kd_loss``
    and ``ce_loss`` in training and reporting perplexity and agreement in evaluations (module docstring)."""

    def __init__(
        self,
        *args: Any,
        teacher: PreTrainedModel,
        temperature: float,
        alpha: float,
        eval_metrics: frozenset[str],
        vocabulary: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.alpha = alpha
        self.eval_metrics = eval_metrics
        #: Logit columns compared when teacher and student heads differ in width (padded embeddings).
        self.vocabulary = vocabulary
        self.teacher: Any = teacher
        if _zero3():
            from trl.models.utils import prepare_deepspeed

            self.teacher = prepare_deepspeed(teacher, self.accelerator)  # partitioned: gathered per layer
        elif not getattr(teacher, "is_quantized", False):  # a 4-bit teacher is loaded on its device
            self.teacher = teacher.to(self.args.device)  # type: ignore[arg-type]  # transformers' .to wrapper
        #: The teacher's parameters this rank holds a shard of when training starts (ZeRO-3; 0 otherwise).
        #: DeepSpeed gathers a layer's for its forward and keeps those it will reuse within
        #: stage3_max_reuse_distance parameters: a small teacher may stay gathered after its first forward.
        self.teacher_partitioned = sum(1 for p in teacher.parameters() if hasattr(p, "ds_id") and p.numel() == 0)
        self._train_sums = _Sums()
        self._eval_sums = _Sums()

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        from .dpo import adalora_penalty

        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features)
        with torch.no_grad():
            teacher_logits = self.teacher(**features).logits
        student_logits = outputs.logits
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            student_logits = student_logits[..., : self.vocabulary]
            teacher_logits = teacher_logits[..., : self.vocabulary]
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer divides a per-batch mean by the accumulation steps
        part = distillation_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            num_items_in_batch=num_items_in_batch,
        )
        loss = part.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # Normalized by the positions of every rank: the ranks' gradients are averaged (as Trainer does).
            loss = loss * self.accelerator.num_processes
        if model.training:
            penalty = adalora_penalty(self.accelerator.unwrap_model(model))  # peft adds it to a labels loss only
            if penalty is not None:
                loss = loss + penalty
        (self._train_sums if model.training else self._eval_sums).add(part)
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        self._eval_sums = _Sums()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        means = self._eval_sums.take(self)
        if output.metrics is not None and means is not None:
            kd, ce, agreement, _ = means
            output.metrics[f"{prefix}_kd_loss"] = kd
            output.metrics[f"{prefix}_ce_loss"] = ce
            every = prefix != "eval"  # general text reports everything: it is what it measures
            if every or "perplexity" in self.eval_metrics:
                output.metrics[f"{prefix}_perplexity"] = math.exp(min(ce, 50.0))
            if every or "agreement" in self.eval_metrics:
                output.metrics[f"{prefix}_agreement"] = agreement
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (every rank logs it: the reduction is collective)
            means = self._train_sums.take(self)
            if means is not None:
                logs["kd_loss"], logs["ce_loss"] = means[0], means[1]
        super().log(logs, start_time)


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    params = params_of(spec)
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval)  # before the models: ZeRO-3 partitions at load

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        teacher, _ = load_teacher(run, tokenizer, prepared.args.device)
        data = run.tokenized(checked, tokenizer)
        train = TokenRows(data.train, ROW_KEYS)
        held_out = TokenRows(data.eval, ROW_KEYS) if data.eval is not None else None
        general = TokenRows(data.general, ROW_KEYS) if data.general is not None else None

        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=prepared.planned_steps(len(train)))
        set_seed(spec.training.seed)  # the same initial adapter weights on every rank and every run
        model = modeling.load_causal_lm(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
            **methods.load_kwargs(ctx),
        )
        model.config.use_cache = False
        attention = getattr(model.config, "_attn_implementation", None)
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        tuned = methods.apply(model, ctx)
        collator = CausalLMCollator.for_attention(tokenizer.pad_token_id, attention)

        training = prepared.trainer(
            DistillTrainer,
            tokens=collator,
            callbacks=methods.callbacks(tuned, ctx),
            model=tuned,
            train_dataset=train,
            eval_dataset=held_out,
            data_collator=collator,
            processing_class=tokenizer,
            teacher=teacher,
            temperature=params.temperature,
            alpha=params.alpha,
            eval_metrics=frozenset(spec.eval_metrics()),
            vocabulary=len(tokenizer),
        )

        def evaluate(trainer: Trainer) -> dict[str, float]:
            out: dict[str, float] = {}
            if held_out is not None:
                out.update(trainer.evaluate())
            if general is not None:
                out.update(trainer.evaluate(eval_dataset=general, metric_key_prefix="general"))
            return {k: v for k, v in out.items() if k.endswith(("_loss", "_perplexity", "_agreement"))}

        summary = training.train(evaluate)
        summary["teacher"] = {
            "model": params.teacher,
            "quantization": params.teacher_quantization,
            "partitioned_parameters": cast(DistillTrainer, training.trainer).teacher_partitioned,
            "temperature": params.temperature,
            "alpha": params.alpha,
        }
        return training.save_outputs(tokenizer)
