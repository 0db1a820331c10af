"""Recipe: causal-LM fine-tuning — supervised fine-tuning (``sft``) and continual pre-training (``pretrain``).

Supports every method (full/freeze, LoRA, QLoRA, prefix, prompt, IA3, AdaLoRA), the
``promptCompletion``, ``chat`` and ``text`` formats, packing, DDP under torchrun, DeepSpeed ZeRO 1-3,
evaluation every N steps (the loss, and perplexity unless ``training.evaluation.metrics`` leaves it
out; BLEU and ROUGE of completions generated after the eval prompts when it lists ``bleu`` or ``rouge``,
:mod:`..generation`), early stopping with the best model loaded at the end, perplexity on
general text before and after training (``training.forgetting.generalEval``), EWC and replay against
forgetting (:mod:`..forgetting`), and the output
contract (adapter and/or merged model with a sha256 manifest).

What is particular to the task lives here: records become token sequences (packed or not), the model
is a causal LM with the method applied, the collator pads (or keeps packed rows apart), and the
Trainer reports perplexity next to the loss. Everything else — data checks before the model loads,
resume, checkpoints, preemption, telemetry, status, outputs — is the :mod:`..harness`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.api.tasks import GENERATION_METRICS
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import DataSpec, FineTuneJobSpec
from transformers import Trainer, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import EvalLoopOutput

from .. import forgetting, harness, methods, modeling
from ..data import chat, prompt_completion
from ..data.collate import CausalLMCollator
from ..data.pipeline import TokenRows
from ..data.records import Record
from ..errors import ConfigError
from ..generation import GenerationEval, complete, stop_ids
from ..scoring.generation import generation_metrics

if TYPE_CHECKING:
    from ..predict import Predictions, SavedOutput

#: The columns of a row the causal-LM collator takes (``position_ids`` in packed rows only).
ROW_KEYS = ("input_ids", "labels", "position_ids")

#: The generation metrics' keys in an evaluation's metrics (:mod:`..scoring.generation`).
GENERATION_KEYS = ("_bleu", "_rouge1", "_rouge2", "_rougeL")

#: The formats whose records have a prompt to generate after: (prompt tokens, reference) of a record.
PROMPTS: dict[str, Callable[[Record, Any, DataSpec], tuple[list[int], str]]] = {
    "promptCompletion": prompt_completion.prompt,
    "chat": chat.prompt,
}


class CausalLMTrainer(forgetting.ForgettingTrainer):
    """transformers' Trainer, reporting perplexity (exp of the loss) next to the loss of the
    evaluations named ``perplexity_for``, and the eval data's generation metrics (``generation``)."""

    def __init__(
        self, *args: Any, perplexity_for: frozenset[str], generation: GenerationEval | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.perplexity_for = perplexity_for
        self.generation = generation

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        loss = (output.metrics or {}).get(f"{prefix}_loss")
        if output.metrics is not None and loss is not None and prefix in self.perplexity_for:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
        if output.metrics is not None and self.generation is not None and prefix == "eval":
            model, step = self.accelerator.unwrap_model(self.model), self.state.global_step
            # ZeRO-3: every forward pass gathers the weights from every rank, which must all take part.
            synced = bool(is_deepspeed_zero3_enabled())  # type: ignore[no-untyped-call]  # unannotated
            output.metrics.update(self.generation.evaluate(model, prefix=prefix, step=step, synced_gpus=synced))
        return output


def perplexity_for(spec: FineTuneJobSpec) -> frozenset[str]:
    """The evaluations that report perplexity: general text's always (it is what it measures), the
    eval data's unless ``training.evaluation.metrics`` leaves it out (early stopping can watch only
    a listed metric)."""
    metrics = spec.training.evaluation.metrics
    return frozenset({"eval", "general"} if metrics is None or "perplexity" in metrics else {"general"})


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval)

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        # General text is plain text whatever the task's format (the pipeline tokenizes it so).
        data = run.tokenized(checked, tokenizer)
        train = TokenRows(data.train, ROW_KEYS)
        mixed = forgetting.mix(spec, data, train, ROW_KEYS)  # with the replay rows under forgetting.replay
        held_out = TokenRows(data.eval, ROW_KEYS) if data.eval is not None else None
        general = TokenRows(data.general, ROW_KEYS) if data.general is not None else None

        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=prepared.planned_steps(mixed.rows))
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
        tuned = methods.apply(model, ctx)
        collator = CausalLMCollator.for_attention(tokenizer.pad_token_id, attention)

        training = prepared.trainer(
            CausalLMTrainer,
            tokens=collator,
            callbacks=[*methods.callbacks(tuned, ctx), *mixed.callbacks],
            model=tuned,
            train_dataset=mixed.dataset,
            eval_dataset=held_out,
            data_collator=collator,
            processing_class=tokenizer,
            perplexity_for=perplexity_for(spec),
            generation=GenerationEval.for_run(
                spec,
                data.eval_prompts,
                tokenizer,
                world=run.world,
                batch_size=prepared.args.per_device_eval_batch_size,
                work_dir=run.work,
            ),
        )

        forgetting.attach(
            training, mixed, run=run, checked=checked, data=data, general=general, train=train, keys=ROW_KEYS
        )

        def evaluate(trainer: Trainer) -> dict[str, float]:
            out: dict[str, float] = {}
            if held_out is not None:
                out.update(trainer.evaluate())
            if general is not None:
                out.update(trainer.evaluate(eval_dataset=general, metric_key_prefix="general"))
                forgetting.report_general(run, trainer, out)
            return {k: v for k, v in out.items() if k.endswith(("_loss", "_perplexity", *GENERATION_KEYS))}

        training.train(evaluate)
        return training.save_outputs(tokenizer)


def predict(
    saved: SavedOutput, records: list[Record], out: Predictions, *, cache_dir: Path, max_new_tokens: int
) -> dict[str, float]:
    """Generate each record's completion greedily after its prompt (``promptCompletion``: the prompt;
    ``chat``: the conversation before its last assistant turn), as the evaluation's generation metrics
    do (batched, stopping at the end of text or turn); the reference is the record's own. Return the
    BLEU and ROUGE of the completions against the references (the ``bleu``, ``rouge1``, ``rouge2`` and
    ``rougeL`` of :mod:`..scoring.generation`)."""
    data = saved.config.spec.data
    if data.format not in PROMPTS:
        raise ConfigError(f"spec.data.format {data.format}: records without a prompt have nothing to complete")
    tokenizer = saved.tokenizer()
    model = saved.model(modeling.load_causal_lm, tokenizer, cache_dir)

    prompts = [PROMPTS[data.format](record, tokenizer, data) for record in records]
    completions = complete(
        model,
        [ids for ids, _ in prompts],
        pad_token_id=tokenizer.pad_token_id,
        stop=stop_ids(tokenizer, model, data.format),
        max_new_tokens=max_new_tokens,
        batch_size=saved.config.spec.training.per_device_batch_size,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    references = [reference for _, reference in prompts]

    def predictions() -> Iterator[dict[str, Any]]:
        for record, text, reference in zip(records, texts, references, strict=True):
            yield {"where": record.where, "prediction": text, "reference": reference}

    out.write(predictions())
    scores, _ = generation_metrics(texts, references, GENERATION_METRICS)
    return scores
