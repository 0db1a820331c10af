"""Recipe: Direct Preference Optimization (``dpo``) — a causal LM taught to prefer the chosen response.

Trains with trl's ``DPOTrainer`` (trl 1.16) on ``preference`` records (a prompt, a chosen and a
rejected response; text or chat), with every method but the prompt-learning ones (full/freeze, LoRA,
QLoRA, IA3, AdaLoRA), DDP under torchrun, DeepSpeed ZeRO 1-3, evaluation every N steps and early
stopping on ``accuracy`` (or the loss) with the best model loaded at the end, and the output contract
(adapter and/or merged model).

**The objective** is ``spec.task.dpo.lossType`` (trl's ``loss_type``: ``sigmoid``, ``ipo``,
``hinge``, ``robust``, ``exo_pair``, ``bco_pair``, ``nca_pair``, ``sppo_hard``, ``apo_zero``,
``apo_down``, ``sigmoid_norm``) with ``beta`` and, for ``robust`` and ``exoPair``,
``labelSmoothing`` (``exoPair`` needs it above 0: EXO divides by it; trl's paper value is 1e-3).

**The reference** (``spec.task.dpo.referenceModel``):

- unset, PEFT methods: the policy with its adapter disabled — no second copy. (trl, given a model
  that is already a peft model, would add a second adapter ``ref``, a copy of the policy's: a
  freshly initialised adapter equals the disabled one, AdaLoRA refuses a second trainable adapter,
  and the copy would be saved and counted with the trained one. :func:`_without_reference_adapter`
  keeps trl from adding it.)
- unset, ``full``: a frozen copy of the base model, loaded as the policy is (same dtype, added
  tokens, dropout);
- a model URI: that model, loaded as ``spec.model`` is (same dtype, attention, quantization,
  trustRemoteCode), after checking that its tokenizer has the policy's vocabulary (a ConfigError
  naming ``spec.task.dpo.referenceModel`` otherwise: log-probabilities over other token ids compare
  nothing).

With ``precomputeReferenceLogProbs`` the reference's log-probabilities of every train and eval pair
are computed once before training (trl's ``precompute_ref_log_probs``; ``full`` without a reference
URI uses the policy before its first step, the base model) and no reference stays in memory while
training: a loaded reference is dropped once they are computed (``summary.json``'s ``reference``
says what the reference was and whether one is still held). On one node only: trl writes them into a
file beside the token rows on global rank 0's node, which the ranks of other nodes would not find.

**Rows** are the data pipeline's (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, tokenized as
trl tokenizes; :mod:`..data.preference`): trl's own tokenization (``_prepare_dataset``) is skipped.
Its collator keeps the start of ``prompt + response`` up to ``spec.data.maxSeqLength`` tokens
(``max_length``), and, as trl does, a pair whose prompt alone fills ``maxSeqLength`` is dropped
(every response token would be cut: nothing to learn); the run prints how many were.

**Dropout**: trl's ``disable_dropout`` (on by default) zeroes every dropout module, the adapters'
included, whatever the spec says. It is off here: ``spec.training.dropout`` sets the model's
dropout as in every recipe, and unset it is 0 (trl's DPO default: the reference log-probabilities
of a PEFT policy come from the same modules in training mode); ``spec.method.lora.dropout`` is the
adapter's. AdaLoRA's orthogonality penalty (``orthRegWeight``), which peft adds to a loss computed
from labels, is added to the DPO loss of every training step (:func:`adalora_penalty`).

**Metrics** (``metrics.jsonl``, the status, ``summary.json``'s before and after): trl's loss,
``rewards/chosen``, ``rewards/rejected`` (beta times the log-ratio of policy and reference),
``rewards/margins``, ``rewards/accuracies`` (the fraction of pairs whose chosen reward is higher),
log-probabilities and logits; ``kl`` (the implicit KL: the mean log-ratio ``log pi/pi_ref`` of the
chosen and rejected responses, 0 while policy and reference agree); and in evaluations
``eval_accuracy``, the reward accuracy, which ``earlyStopping.metric: accuracy`` watches (unless
``training.evaluation.metrics`` leaves accuracy out).

:func:`predict` (``finetune predict``) generates each record's response after its prompt.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow.compute as pc
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import DPOParams, FineTuneJobSpec
from peft import PeftModel
from peft.tuners.adalora import AdaLoraModel
from peft.utils.integrations import gather_params_ctx
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

from .. import harness, methods, modeling
from ..data import preference
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..data.records import Record
    from ..predict import Predictions, SavedOutput

#: The columns of a row trl's collator takes.
ROW_KEYS = ["prompt_ids", "chosen_ids", "rejected_ids"]

#: spec.task.dpo.lossType -> trl's loss_type.
LOSS_TYPES = {
    "sigmoid": "sigmoid",
    "ipo": "ipo",
    "hinge": "hinge",
    "robust": "robust",
    "exoPair": "exo_pair",
    "bcoPair": "bco_pair",
    "ncaPair": "nca_pair",
    "sppoHard": "sppo_hard",
    "apoZero": "apo_zero",
    "apoDown": "apo_down",
    "sigmoidNorm": "sigmoid_norm",
}

#: Keys of an evaluation's results that are not its metrics: transformers' timings, trl's count of
#: the tokens trained on so far.
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "_num_tokens")


def params_of(spec: FineTuneJobSpec) -> DPOParams:
    return spec.task.dpo or DPOParams()


def task_arguments(spec: FineTuneJobSpec) -> dict[str, Any]:
    """DPOConfig's task fields from ``spec.task.dpo`` and ``spec.data.maxSeqLength`` (see the module
    docstring for dropout)."""
    params = params_of(spec)  # exoPair's labelSmoothing is above 0: the API requires it (EXO divides by it)
    return {
        "beta": params.beta,
        "loss_type": [LOSS_TYPES[params.loss_type]],
        "label_smoothing": params.label_smoothing or 0.0,
        "precompute_ref_log_probs": params.precompute_reference_log_probs,
        "max_length": spec.data.max_seq_length,
        "truncation_mode": "keep_start",
        "disable_dropout": False,
    }


def keep_learnable(rows: datasets.Dataset, max_length: int) -> tuple[datasets.Dataset, int]:
    """The pairs whose prompt is shorter than ``max_length`` tokens (trl's rule: the collator keeps the
    first ``max_length`` tokens of prompt + response, so a longer prompt leaves no response token),
    and how many were dropped."""
    rows = rows.select_columns(ROW_KEYS)
    lengths = pc.list_value_length(rows.with_format("arrow")[:].column("prompt_ids")).to_numpy()
    keep = (lengths < max_length).nonzero()[0]
    if len(keep) == len(rows):
        return rows, 0
    return rows.select(keep.tolist()), len(rows) - len(keep)


class PreferenceCollator:
    """trl's preference collator (chosen rows then rejected rows, right-padded, cut to
    ``max_length``), counting the real tokens and the pairs it hands out for throughput reporting."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.collate = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length)
        self.tokens = 0
        self.samples = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.collate(features)
        self.samples += len(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


@contextmanager
def _without_reference_adapter(model: Any) -> Iterator[None]:
    """While trl's DPOTrainer is built on a peft model without a reference model, keep it from adding
    the adapter ``ref`` (see the module docstring): trl 1.16 calls ``model.add_adapter("ref", ...)``,
    then walks ``model.named_parameters()`` once to copy the policy's adapter into it. Here that call
    adds nothing and that walk sees no parameters; every other call is the model's own."""
    skipped = False

    def add_adapter(adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal skipped
        if adapter_name != "ref":
            return type(model).add_adapter(model, adapter_name, *args, **kwargs)
        skipped = True
        return None

    def named_parameters(*args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
        nonlocal skipped
        if skipped:
            skipped = False
            return iter(())
        parameters: Iterator[tuple[str, torch.nn.Parameter]] = type(model).named_parameters(model, *args, **kwargs)
        return parameters

    model.add_adapter, model.named_parameters = add_adapter, named_parameters
    try:
        yield
    finally:
        del model.add_adapter, model.named_parameters


def adalora_penalty(model: Any) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty of ``model`` times ``orthRegWeight``, computed as peft's
    ``AdaLoraModel.forward`` computes it; None for another method or a weight of 0. peft adds it to
    the loss the model computes from its labels, which DPO's loss does not use: the recipe adds it
    to the DPO loss of a training step instead."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AdaLoraModel):
        return None
    adapter = tuner.trainable_adapter_name
    weight = float(getattr(tuner.peft_config[adapter], "orth_reg_weight", 0.0))  # an AdaLoraConfig
    if not weight:
        return None
    total: torch.Tensor | None = None
    count = 0
    for name, p in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            if p.shape == torch.Size([0]):  # partitioned by ZeRO-3: gathered, as peft does
                with gather_params_ctx(p, fwd_module=tuner):
                    cov = p @ p.T if "lora_A" in name else p.T @ p
            else:
                cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    return None if total is None else weight * total / count


class DPORecipeTrainer(DPOTrainer):
    """trl's DPOTrainer on the pipeline's token rows (its tokenization skipped), without a reference
    adapter, dropping a precomputed-for reference, and logging ``kl`` and ``eval_accuracy``."""

    def __init__(self, model: Any, *, report_accuracy: bool, **kwargs: Any) -> None:
        self.report_accuracy = report_accuracy
        peft = isinstance(model, PeftModel)
        with _without_reference_adapter(model) if peft and kwargs.get("ref_model") is None else _nothing():
            super().__init__(model, **kwargs)
        if self.precompute_ref_logps and self.ref_model is not None:
            # The log-probabilities are in the datasets: the reference is not needed again.
            self.accelerator._models = [m for m in self.accelerator._models if m is not self.ref_model]
            self.ref_model = None
        self._precompute_engine = None  # DeepSpeed's inference engine of a precompute, done

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        result = super().compute_loss(  # type: ignore[no-untyped-call]  # trl leaves it unannotated
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        penalty = adalora_penalty(self.accelerator.unwrap_model(model)) if model.training else None
        if penalty is None:
            return result
        if isinstance(result, tuple):
            return (result[0] + penalty, *result[1:])
        return result + penalty

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # tokenized and filtered by the recipe (keep_learnable)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model is not None and self.model.training else "eval"
        seen = self._metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        if seen.get("rewards/chosen") and seen.get("rewards/rejected"):
            chosen = sum(seen["rewards/chosen"]) / len(seen["rewards/chosen"])
            rejected = sum(seen["rewards/rejected"]) / len(seen["rewards/rejected"])
            logs[f"{prefix}kl"] = (chosen + rejected) / (2 * self.beta)
        if mode == "eval" and self.report_accuracy and seen.get("rewards/accuracies"):
            logs["eval_accuracy"] = sum(seen["rewards/accuracies"]) / len(seen["rewards/accuracies"])
        super().log(logs, start_time)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _reference_spec(spec: FineTuneJobSpec, uri: str) -> Any:
    return spec.model.model_copy(update={"uri": uri, "revision": None, "gguf_file": None})


def load_reference(
    run: harness.Run, tokenizer: PreTrainedTokenizerBase, ctx: methods.MethodContext
) -> tuple[PreTrainedModel | None, str]:
    """The reference model to load (None: the policy is its own, adapter disabled or before its first
    step) and what it is, for the summary."""
    spec = run.spec
    params = params_of(spec)
    peft = spec.method.type != "full"
    if params.reference_model is None:
        if peft:
            return None, "the base model (the policy with its adapter disabled)"
        if params.precompute_reference_log_probs:
            return None, "the base model (the policy before its first step)"
        source, model_spec = run.model_source(), spec.model
        what = "the base model (a frozen copy)"
    else:
        model_spec = _reference_spec(spec, params.reference_model)
        source = run.resolve_model(model_spec, field="spec.task.dpo.referenceModel", cache_dir=run.work / "cache")
        theirs = modeling.load_tokenizer(source, model_spec)
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"spec.task.dpo.referenceModel: {params.reference_model} has another vocabulary than "
                f"spec.model.uri {spec.model.uri} ({len(theirs)} vs {len(tokenizer)} tokens, or other ids): "
                "DPO compares the two models' log-probabilities of the same token ids"
            )
        what = params.reference_model
    set_seed(spec.training.seed)  # added tokens' rows drawn as the policy's were
    reference = modeling.load_causal_lm(
        source,
        model_spec,
        dtype=modeling.model_dtype(spec.model.dtype),
        overrides=modeling.dropout_overrides(source, model_spec, spec.training.dropout or 0.0),
        **methods.load_kwargs(ctx),
    )
    reference.config.use_cache = False
    modeling.grow_embeddings(reference, tokenizer)
    reference.requires_grad_(False)
    reference.train(False)  # dropout off: the reference is evaluated, never trained
    return reference, what


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    params = params_of(spec)
    task_args = task_arguments(spec)
    max_length = spec.data.max_seq_length
    # precomputeReferenceLogProbs is on one node only (the API refuses more): trl writes the log-probabilities
    # into a file beside the rows on global rank 0's node, and every rank reads it back.
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval, args_class=DPOConfig, task_args=task_args)

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        data = run.tokenized(checked, tokenizer)
        train, dropped = keep_learnable(data.train, max_length)
        held_out, dropped_eval = keep_learnable(data.eval, max_length) if data.eval is not None else (None, 0)
        if dropped or dropped_eval:
            print(
                f"dpo: {dropped} training and {dropped_eval} eval pairs dropped: their prompt alone fills "
                f"spec.data.maxSeqLength {max_length} (no response token would be left)",
                flush=True,
            )
        if not len(train):
            raise ConfigError(f"spec.data.maxSeqLength {max_length}: every training prompt fills it")

        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=prepared.planned_steps(len(train)))
        set_seed(spec.training.seed)  # the same initial adapter weights on every rank and every run
        model = modeling.load_causal_lm(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout or 0.0),
            **methods.load_kwargs(ctx),
        )
        model.config.use_cache = False
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        tuned = methods.apply(model, ctx)
        reference, what = load_reference(run, tokenizer, ctx)
        loaded = weakref.ref(reference) if reference is not None else None
        collator = PreferenceCollator(tokenizer.pad_token_id, max_length)

        training = prepared.trainer(
            DPORecipeTrainer,
            tokens=collator,
            callbacks=methods.callbacks(tuned, ctx),
            model=tuned,
            ref_model=reference,
            train_dataset=train,
            eval_dataset=held_out,
            data_collator=collator,
            processing_class=tokenizer,
            report_accuracy="accuracy" in spec.eval_metrics(),
        )
        del reference
        gc.collect()

        def evaluate(trainer: Trainer) -> dict[str, float]:
            if held_out is None:
                return {}
            return {
                k: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and not k.endswith(_NOT_METRICS)
            }

        summary = training.train(evaluate)
        gc.collect()
        summary["reference"] = {
            "model": what,
            "precomputed": params.precompute_reference_log_probs,
            "in_memory": loaded is not None and loaded() is not None,
            "dropped_pairs": {"train": dropped, "eval": dropped_eval},
        }
        return training.save_outputs(tokenizer)


def predict(
    saved: SavedOutput, records: list[Record], out: Predictions, *, cache_dir: Path, max_new_tokens: int
) -> dict[str, float]:
    """Generate each record's response greedily after its prompt (tokenized as in training: the
    prompt's text, or the conversation with the generation prompt); the reference is the chosen
    response. No scores: comparing generated text with references is not part of this task's
    evaluation (its evaluation is the reward accuracy, against a reference model)."""
    data = saved.config.spec.data
    columns = data.columns
    tokenizer = saved.tokenizer()
    model = saved.model(modeling.load_causal_lm, tokenizer, cache_dir)

    def chosen_text(record: Record) -> str:
        chosen = record.data[columns.chosen]
        if isinstance(chosen, str):
            return chosen
        return "\n".join(m["content"] for m in chosen)

    def predictions() -> Iterator[dict[str, Any]]:
        for record in records:
            one = {
                "prompt": [record.data[columns.prompt]],
                "chosen": [record.data[columns.chosen]],
                "rejected": [record.data[columns.rejected]],
            }
            ids = preference.tokenize(one, tokenizer, data)["prompt_ids"][0]
            text = tokenizer.decode(
                modeling.greedy_completion(model, tokenizer, ids, max_new_tokens), skip_special_tokens=True
            )
            yield {"where": record.where, "prediction": text, "reference": chosen_text(record)}

    out.write(predictions())
    return {}
