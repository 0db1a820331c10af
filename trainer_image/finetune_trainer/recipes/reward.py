"""Recipe: a reward model trained on pairwise preferences (``task.type: reward``, format ``preference``).

Supports:

- any base the loader supports, with a reward head (:func:`..modeling.load_reward_model`: a
  sequence-classification head with one output, the scalar reward; for Llama-family and other causal
  LMs the ``score`` layer reads the last token that is not the pad token). The config's
  ``pad_token_id`` is the tokenizer's pad token, and a tokenizer without one pads with its EOS (as
  the classification recipe does, :func:`..modeling.load_tokenizer`): a base whose config has no pad
  token still scores each sequence at its last real token, also in the output it saves;
- the methods of the task table: ``full`` (also ``freeze``; ``headOnly`` trains only ``score``),
  LoRA, QLoRA, IA3 and AdaLoRA, which train the ``score`` layer in full and save it with the adapter
  (peft's ``SEQ_CLS`` task type puts it in ``modules_to_save``); a merged output holds it too and
  loads with ``AutoModelForSequenceClassification``, the model a later ``rl`` job names as
  ``task.rl.rewardModel``;
- the loss of trl's ``RewardTrainer`` (trl computes it: this recipe gives it the rows and the model),
  the Bradley-Terry pairwise loss ``-log sigmoid(r_chosen - r_rejected)`` averaged over a batch's
  pairs, plus with ``task.reward.centerRewardsCoefficient`` (``c``) the centring term
  ``c * mean((r_chosen + r_rejected) ** 2)`` that keeps rewards near zero (trl's
  ``center_rewards_coefficient``);
- sequences cut to ``data.maxSeqLength``: each pair is scored as ``prompt + chosen`` and ``prompt +
  rejected`` (the tokens of :mod:`..data.preference`), each cut to its first ``maxSeqLength``
  tokens (the start is kept, so a long response is scored on its beginning). trl's own ``max_length``
  would instead drop every pair with a side longer than it from the data; it is not used (None: trl
  drops nothing) and the collator (:class:`PairCollator`) cuts. ``finetune plan`` counts the pairs
  that lose tokens; a pair whose two cut sequences are identical (a prompt at least as long as
  ``maxSeqLength``, or responses that part only after it) teaches nothing, and the run says how many
  there are;
- at every evaluation and before/after training: ``eval_loss``, the pairwise ``eval_accuracy`` (the
  fraction of eval pairs whose chosen response gets the higher reward) and ``eval_margin`` (the mean
  of ``r_chosen - r_rejected``), exact over the whole eval set on every rank (trl's own per-batch
  means of the two give way to them), with trl's ``eval_mean_reward``, ``eval_min_reward`` and
  ``eval_max_reward`` (the means over the eval batches of each batch's mean, minimum and maximum
  reward); ``training.evaluation.metrics: [loss]`` leaves accuracy and margin out. Early stopping
  on ``accuracy`` or ``evalLoss``, with the best model loaded at the end;
- dropout as the spec sets it (the model's, ``training.dropout``, LoRA's): trl's ``disable_dropout``
  is off;
- DDP under torchrun and DeepSpeed ZeRO (the harness's; tested here: ZeRO-2 on two ranks, the eval
  pairs gathered from both, each once); :func:`predict` for ``finetune predict``, writing each
  pair's two rewards.

Everything else — data checks before the model loads, resume, checkpoints, preemption, telemetry,
status, outputs — is the :mod:`..harness`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, RewardParams
from transformers import EvalPrediction, Trainer, set_seed
from trl.trainer.reward_config import RewardConfig
from trl.trainer.reward_trainer import RewardTrainer

from .. import harness, methods, modeling
from ..data import preference
from ..data.collate import pad_right

if TYPE_CHECKING:
    import datasets

    from ..data.records import Record
    from ..predict import Predictions, SavedOutput

#: Keys of transformers' evaluation results that are timings, not metrics.
_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")
#: trl's evaluation figures that this recipe computes exactly itself, or that are not the evaluation's
#: (``num_tokens``: the tokens trained on so far).
_TRL_EVAL_KEYS = ("accuracy", "margin", "num_tokens")


def task_arguments(spec: FineTuneJobSpec) -> dict[str, Any]:
    """RewardConfig's fields of the task (see the module docstring)."""
    params = spec.task.reward or RewardParams()
    return {
        "center_rewards_coefficient": params.center_rewards_coefficient,
        # Pairs are cut to maxSeqLength by PairCollator; trl's max_length would drop the long ones.
        "max_length": None,
        "disable_dropout": False,
    }


def sequences(row: dict[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    """A preference row's two scored sequences, ``prompt + chosen`` and ``prompt + rejected``, each
    cut to its first ``max_length`` tokens."""
    prompt = row["prompt_ids"]
    return (prompt + row["chosen_ids"])[:max_length], (prompt + row["rejected_ids"])[:max_length]


def pairs_without_difference(rows: datasets.Dataset, max_length: int) -> int:
    """How many rows' two sequences are identical once cut to ``max_length`` tokens."""
    long = rows.filter(lambda length: length > max_length, input_columns="length", keep_in_memory=True)
    count = 0
    for row in long:
        chosen, rejected = sequences(row, max_length)
        count += chosen == rejected
    return count


class PairCollator:
    """A batch of preference rows as trl's reward trainer takes it: ``input_ids`` of the batch's
    chosen sequences, then its rejected ones (``prompt + response`` cut to ``max_length``), padded on
    the right with the pad token, with their attention mask (trl's ``DataCollatorForPreference`` of
    the cut sequences).

    Counts the real tokens of both sequences and the pairs it hands out, for throughput reporting.
    """

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.tokens = 0
        self.samples = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cut = [sequences(f, self.max_length) for f in features]
        rows = [{"input_ids": chosen} for chosen, _ in cut] + [{"input_ids": rejected} for _, rejected in cut]
        input_ids, mask = pad_right(rows, self.pad_token_id)
        self.samples += len(features)
        self.tokens += int(mask.sum())
        return {"input_ids": input_ids, "attention_mask": mask}


def pairwise_scores(chosen: np.ndarray[Any, Any], rejected: np.ndarray[Any, Any]) -> dict[str, float]:
    """``accuracy``: the fraction of pairs whose chosen response has the higher reward (a tie is not
    a win); ``margin``: the mean of ``chosen - rejected``."""
    if len(chosen) == 0:
        return {"accuracy": 0.0, "margin": 0.0}
    return {"accuracy": float(np.mean(chosen > rejected)), "margin": float(np.mean(chosen - rejected))}


class PairwiseRewardTrainer(RewardTrainer):
    """trl's RewardTrainer whose evaluation hands each pair's two rewards to ``compute_metrics``
    (trl's keeps only per-batch means), and whose trainable parameters keep the dtypes the method
    gave them (trl casts a 4-bit model's to bf16; QLoRA's ``computeDtype`` decides)."""

    def __init__(self, **kwargs: Any) -> None:
        model = kwargs["model"]
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(**kwargs)
        for name, param in model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            # trl leaves compute_loss unannotated.
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)  # type: ignore[no-untyped-call]
        if prediction_loss_only:
            return loss.detach(), None, None
        chosen, rejected = outputs.logits.detach().float().squeeze(-1).chunk(2)
        # One row per pair: (chosen reward, rejected reward); its label, 0, says the first is preferred.
        return loss.detach(), torch.stack([chosen, rejected], dim=1), torch.zeros_like(chosen, dtype=torch.long)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model is not None and not self.model.training:
            for key in _TRL_EVAL_KEYS:
                self._metrics["eval"].pop(key, None)
        super().log(logs, start_time)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """The Trainer's ``compute_metrics``: :func:`pairwise_scores` of the eval pairs' rewards (the
    predictions of :meth:`PairwiseRewardTrainer.prediction_step`)."""
    rewards = prediction.predictions
    rewards = rewards[0] if isinstance(rewards, tuple) else rewards
    assert isinstance(rewards, np.ndarray)
    return pairwise_scores(rewards[:, 0], rewards[:, 1])


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval, args_class=RewardConfig, task_args=task_arguments(spec))

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        data = run.tokenized(checked, tokenizer)
        max_length = spec.data.max_seq_length
        if run.world.is_main:
            blind = pairs_without_difference(data.train, max_length)
            if blind:
                print(
                    f"{blind} of {len(data.train)} training pairs have identical chosen and rejected sequences "
                    f"once cut to data.maxSeqLength {max_length} tokens: they teach nothing",
                    flush=True,
                )

        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=prepared.planned_steps(len(data.train)))
        set_seed(spec.training.seed)  # the same initial head and adapter weights on every rank and every run
        model = modeling.load_reward_model(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            pad_token_id=tokenizer.pad_token_id,
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
            **methods.load_kwargs(ctx),
        )
        model.config.use_cache = False
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        tuned = methods.apply(model, ctx)
        collator = PairCollator(tokenizer.pad_token_id, max_length)

        training = prepared.trainer(
            PairwiseRewardTrainer,
            tokens=collator,
            callbacks=methods.callbacks(tuned, ctx),
            model=tuned,
            # The pipeline's memory-mapped rows (prompt_ids, chosen_ids, rejected_ids): trl takes
            # them as tokenized and leaves them whole (max_length None); PairCollator cuts.
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=compute_metrics if "accuracy" in spec.eval_metrics() else None,
        )

        def evaluate(trainer: Trainer) -> dict[str, Any]:
            if data.eval is None:
                return {}
            return {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and not k.endswith(_TIMINGS)}

        training.train(evaluate)
        return training.save_outputs(tokenizer)


def _columns(records: list[Record], spec: FineTuneJobSpec) -> dict[str, list[Any]]:
    names = spec.data.columns
    return {attr: [r.data[getattr(names, attr)] for r in records] for attr in preference.COLUMNS}


def predict(
    saved: SavedOutput, records: list[Record], out: Predictions, *, cache_dir: Path, max_new_tokens: int
) -> dict[str, float]:
    """Score each record's two responses with the saved reward model, cut to maxSeqLength as in
    training: one line with ``chosen_reward``, ``rejected_reward`` and ``preferred`` (``chosen`` when
    the chosen response gets the higher reward, else ``rejected``); return ``accuracy`` and
    ``margin`` over the records (:func:`pairwise_scores`)."""
    del max_new_tokens
    spec = saved.config.spec
    tokenizer = saved.tokenizer()
    if tokenizer.pad_token is None:  # saved by this recipe with one; as the training run's loader does
        tokenizer.pad_token = tokenizer.eos_token
    load = functools.partial(modeling.load_reward_model, pad_token_id=tokenizer.pad_token_id)
    model = saved.model(load, tokenizer, cache_dir)
    tokens = preference.tokenize(_columns(records, spec), tokenizer, spec.data)
    rows = [dict(zip(tokens, values, strict=True)) for values in zip(*tokens.values(), strict=True)]
    collator = PairCollator(tokenizer.pad_token_id, spec.data.max_seq_length)
    size = spec.training.per_device_batch_size
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(rows), size):
            batch = collator(rows[start : start + size])
            logits = model(
                input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
            ).logits
            first, second = logits.float().squeeze(-1).cpu().chunk(2)
            chosen.append(first)
            rejected.append(second)
    chosen_rewards = torch.cat(chosen).numpy() if chosen else np.zeros(0)
    rejected_rewards = torch.cat(rejected).numpy() if rejected else np.zeros(0)

    def lines() -> Iterator[dict[str, Any]]:
        for record, good, bad in zip(records, chosen_rewards.tolist(), rejected_rewards.tolist(), strict=True):
            yield {
                "where": record.where,
                "chosen_reward": good,
                "rejected_reward": bad,
                "preferred": "chosen" if good > bad else "rejected",
            }

    out.write(lines())
    return pairwise_scores(chosen_rewards, rejected_rewards)
