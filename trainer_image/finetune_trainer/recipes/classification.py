"""Recipe: sequence classification (``task.type: classification``, format ``classification``).

Supports:

- any base the loader supports, with a sequence-classification head
  (:func:`..modeling.load_sequence_classification`): Llama-family and other causal LMs (the logits of
  the last token that is not padding; the pad token is set in the model config) and encoders;
- every method that makes sense: ``full``, ``freeze`` (``headOnly`` trains only the classification
  layer, ``score`` on Llama-family models), LoRA, QLoRA, IA3 and AdaLoRA, which train the
  classification layer in full and save it with the adapter (peft's ``SEQ_CLS`` task type puts it in
  ``modules_to_save``); a merged output holds it too;
- labels as names (``task.classification.labels``) or ids (:mod:`..data.classification`);
  single-label, trained with softmax cross entropy, and ``multiLabel``, trained with a sigmoid and a
  binary cross entropy per class (``problem_type: multi_label_classification``); a class is predicted
  when its probability is at least 0.5 (:mod:`..scoring.classification`);
- ``classWeights`` (in class-id order) and ``balanceClassWeights``, which weighs class ``c`` by
  ``N / (K * n_c)``: ``N`` training examples, ``K = numLabels`` classes, ``n_c`` training examples of
  class ``c`` (multi-label: that carry it), so the mean weight over the training examples is 1
  (scikit-learn's ``balanced``); a class with no training example gets 1. Single-label, the loss of a
  batch is ``sum(w[y_i] * CE_i) / sum(w[y_i])`` (torch's ``CrossEntropyLoss(weight=w)``);
  multi-label, each class's binary cross entropy term is multiplied by ``w[c]`` and the batch mean is
  over examples and classes (``BCEWithLogitsLoss(weight=w)``). Evaluation losses are weighted alike;
- ``resampling: oversample | undersample`` (single-label): class-balanced epochs, deterministic from
  the seed and the epoch, exactly resumable (:mod:`..data.sampling`);
- at every evaluation and before/after training: the loss, ``accuracy``, macro ``f1`` (the headline),
  ``precision_macro``, ``recall_macro`` and each class's ``precision_<name>``, ``recall_<name>``,
  ``f1_<name>`` (multi-label also the micro averages), as ``eval_*`` metrics;
  ``training.evaluation.metrics`` picks among them (``accuracy``; ``f1`` brings the precision,
  recall and per-class values along). The summary's ``before`` and ``after`` also hold the confusion
  matrix: ``eval_confusion_matrix``, a list of ``numLabels`` rows of ``numLabels`` counts (row: the
  true class, column: the predicted one, class-id order), or multi-label ``eval_confusion_matrices``,
  one ``[[tn, fp], [fn, tp]]`` per class;
- early stopping on ``f1``, ``accuracy`` or ``evalLoss``, with the best model loaded at the end; DDP
  under torchrun and DeepSpeed ZeRO (the harness's; tested here: ZeRO-2); :func:`predict` for
  ``finetune predict``.

Everything else — data checks before the model loads, resume, checkpoints, preemption, telemetry,
status, outputs — is the :mod:`..harness`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import TEST_HOOK_ENV_PREFIX, ClassificationParams, FineTuneJobSpec
from torch.nn import functional as F
from transformers import EvalPrediction, Trainer, set_seed

from .. import harness, methods, modeling
from ..data.classification import (
    ClassificationCollator,
    build_examples,
    class_names,
    classes_of,
)
from ..data.pipeline import TokenRows
from ..data.sampling import ClassBalancedSampler, EpochSetter
from ..scoring.classification import predict as predict_classes
from ..scoring.classification import score_multi_label, score_single_label

if TYPE_CHECKING:
    from ..data.records import Record
    from ..predict import Predictions, SavedOutput

#: Test hook (read from the process environment only, like :mod:`..faults`): append one JSON line per
#: training micro-batch to ``<path>.rank<N>``: the step, the targets and the rows' token ids.
BATCH_LOG = f"{TEST_HOOK_ENV_PREFIX}CLASSIFICATION_BATCH_LOG"

#: The columns of a row the collator takes.
ROW_KEYS = ("input_ids", "labels")

#: Keys of transformers' evaluation results that are timings, not metrics.
_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def class_weights(params: ClassificationParams, targets: Sequence[int | list[float]]) -> list[float] | None:
    """The loss weight of each class (see the module docstring) from the training examples' targets,
    or None for an unweighted loss."""
    if params.class_weights is not None:
        return list(params.class_weights)
    if not params.balance_class_weights:
        return None
    counts = [0] * params.num_labels
    for classes in classes_of(targets):
        for c in classes:
            counts[c] += 1
    n, k = len(targets), params.num_labels
    return [n / (k * count) if count else 1.0 for count in counts]


class ClassificationTrainer(Trainer):
    """transformers' Trainer with the classification loss (weighted or not; see the module docstring),
    the class-balanced sampler when resampling, and the test hook :data:`BATCH_LOG`."""

    #: The loss is each micro-batch's mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        loss_weights: list[float] | None,
        multi_label: bool,
        sampler: ClassBalancedSampler | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_weights = torch.tensor(loss_weights, dtype=torch.float32) if loss_weights is not None else None
        self.multi_label = multi_label
        self.sampler = sampler
        hook = os.environ.get(BATCH_LOG)
        self.batch_log = Path(f"{hook}.rank{self.args.process_index}") if hook else None

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler[int] | None:
        if self.sampler is not None:
            return self.sampler
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        weight = self.loss_weights.to(logits.device) if self.loss_weights is not None else None
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), weight=weight)
        else:
            loss = F.cross_entropy(logits, labels, weight=weight)
        if self.batch_log is not None and model.training:
            self._log_batch(inputs, labels)
        return (loss, outputs) if return_outputs else loss

    def _log_batch(self, inputs: dict[str, Any], labels: torch.Tensor) -> None:
        assert self.batch_log is not None
        rows = [
            ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
        ]
        line = {"step": self.state.global_step + 1, "labels": labels.tolist(), "rows": rows}
        with self.batch_log.open("a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")


class Scorer:
    """The Trainer's ``compute_metrics``: the spec's metrics of an evaluation's logits, keeping the
    last evaluation's confusion matrix for the summary."""

    def __init__(self, spec: FineTuneJobSpec):
        params = spec.task.classification
        assert params is not None
        self.names = class_names(params)
        self.multi_label = params.multi_label
        self.report = spec.eval_metrics()
        self.confusion: list[Any] = []

    def score(self, logits: np.ndarray[Any, Any], references: np.ndarray[Any, Any]) -> dict[str, float]:
        guesses = predict_classes(logits, multi_label=self.multi_label)
        if self.multi_label:
            scores = score_multi_label(references.astype(np.int64).tolist(), guesses.tolist(), self.names)
        else:
            scores = score_single_label(references.astype(np.int64).tolist(), guesses.tolist(), self.names)
        self.confusion = scores.confusion_matrix
        # Everything but accuracy is the F1 family (macro and per-class precision, recall, F1).
        return {
            name: value
            for name, value in scores.metrics.items()
            if (name == "accuracy" and "accuracy" in self.report) or (name != "accuracy" and "f1" in self.report)
        }

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        labels = prediction.label_ids
        labels = labels[0] if isinstance(labels, tuple) else labels
        assert isinstance(logits, np.ndarray) and isinstance(labels, np.ndarray)
        return self.score(logits, labels)

    @property
    def confusion_key(self) -> str:
        return "eval_confusion_matrices" if self.multi_label else "eval_confusion_matrix"


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    params = spec.task.classification
    assert params is not None  # required for classification by the API
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval)

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        data = run.tokenized(checked, tokenizer)
        train = TokenRows(data.train, ROW_KEYS)
        held_out = TokenRows(data.eval, ROW_KEYS) if data.eval is not None else None
        targets: list[int | list[float]] = list(data.train["labels"])
        sampler = None
        if params.resampling != "none":
            classes = [c for (c,) in classes_of(targets)]  # single-label: the API refuses multiLabel here
            sampler = ClassBalancedSampler(classes, params.resampling, seed=spec.training.seed)
        rows = len(sampler) if sampler is not None else len(train)

        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=prepared.planned_steps(rows))
        set_seed(spec.training.seed)  # the same initial head and adapter weights on every rank and every run
        model = modeling.load_sequence_classification(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            class_names=class_names(params),
            multi_label=params.multi_label,
            pad_token_id=tokenizer.pad_token_id,
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
            **methods.load_kwargs(ctx),
        )
        model.config.use_cache = False
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        tuned = methods.apply(model, ctx)
        collator = ClassificationCollator(tokenizer.pad_token_id)
        scorer = Scorer(spec)
        callbacks = methods.callbacks(tuned, ctx)
        if sampler is not None:
            callbacks.append(EpochSetter(sampler))

        training = prepared.trainer(
            ClassificationTrainer,
            tokens=collator,
            callbacks=callbacks,
            model=tuned,
            train_dataset=train,
            eval_dataset=held_out,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=scorer,
            loss_weights=class_weights(params, targets),
            multi_label=params.multi_label,
            sampler=sampler,
        )

        def evaluate(trainer: Trainer) -> dict[str, Any]:
            if held_out is None:
                return {}
            out: dict[str, Any] = {
                k: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and not k.endswith(_TIMINGS)
            }
            out[scorer.confusion_key] = scorer.confusion
            return out

        training.train(evaluate)
        return training.save_outputs(tokenizer)


def predict(
    saved: SavedOutput, records: list[Record], out: Predictions, *, cache_dir: Path, max_new_tokens: int
) -> dict[str, float]:
    """Classify each record with the saved model: one line with the predicted class name (a list of
    names, multi-label) and the record's own; return the scores over the records (every metric the
    evaluation reports, without the ``eval_`` prefix)."""
    spec = saved.config.spec
    params = spec.task.classification
    assert params is not None
    tokenizer = saved.tokenizer()
    load = functools.partial(
        modeling.load_sequence_classification,
        class_names=class_names(params),
        multi_label=params.multi_label,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = saved.model(load, tokenizer, cache_dir)
    examples = build_examples(records, tokenizer, spec.data, spec.task)
    collator = ClassificationCollator(tokenizer.pad_token_id)
    size = spec.training.per_device_batch_size
    logits = []
    with torch.no_grad():
        for start in range(0, len(examples), size):
            batch = collator([{"input_ids": e.input_ids, "labels": e.label} for e in examples[start : start + size]])
            output = model(
                input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
            )
            logits.append(output.logits.float().cpu())
    all_logits = torch.cat(logits).numpy()
    names = class_names(params)
    guesses = predict_classes(all_logits, multi_label=params.multi_label)

    def named(target: Any) -> Any:
        if isinstance(target, int):
            return names[target]
        return [names[i] for i, on in enumerate(target) if on]

    def lines() -> Iterator[dict[str, Any]]:
        for record, guess, example in zip(records, guesses, examples, strict=True):
            yield {"where": record.where, "prediction": named(guess.tolist()), "reference": named(example.label)}

    out.write(lines())
    return Scorer(spec).score(all_logits, np.array([e.label for e in examples]))
