"""Recipe: online reinforcement learning (``rl``) — GRPO and RLOO, with trl's GRPOTrainer and RLOOTrainer.

Each training step samples ``spec.task.rl.numGenerations`` completions (the group) of every prompt from
the policy, scores each with the rewards, turns the scores into advantages and takes one policy-gradient
step on them:

* ``algorithm: grpo`` — the advantage is the completion's reward less its group's mean, over the
  group's standard deviation (a group with no spread in reward has zero advantage: it teaches nothing);
  the loss is trl 1.16's default ``dapo`` (token losses over all completion tokens of the step) plus
  ``klCoef`` times the KL to the reference policy;
* ``algorithm: rloo`` — the advantage is the reward (less ``klCoef`` times the sequence's KL to the
  reference) less the mean reward of the prompt's other completions;
* ``algorithm: ppo`` — trained by :mod:`.ppo` (implemented there: trl ships no PPO trainer); this
  module's :func:`run` hands it over, and :func:`predict` serves its outputs too.

The knobs: ``spec.task.rl.numGenerations`` (trl's ``num_generations``), ``maxNewTokens``
(``max_completion_length``), ``temperature`` (sampling temperature; also the temperature the
log-probabilities are computed at, as trl does), ``klCoef`` (trl's ``beta``; 0 loads no reference
model; under a PEFT method the reference is the policy with its adapter disabled — no second copy),
``rewardModel`` and ``rewards`` (:mod:`..rewards`; the reward model weighs 1, each verifiable reward its
``weight``: trl's ``reward_weights``). ``spec.training.perDeviceBatchSize`` counts completions (a
multiple of numGenerations, by the API's rules), so a step trains on perDeviceBatchSize x
gradientAccumulationSteps x ranks / numGenerations prompts; learning rate, scheduler, optimizer,
seed, maxSteps or epochs (over the prompts), checkpoints and resume are the harness's as for every task.
Methods: the task's row (full/freeze, LoRA, QLoRA, IA3, AdaLoRA; the tests train LoRA and full). Formats:
``promptCompletion`` and ``chat`` (:mod:`..data.rl`: the prompt, and the reference answer the
``exactMatch`` and ``contains`` rewards compare with). DDP and DeepSpeed ZeRO 1-3 under torchrun, as trl runs them.

What is logged every ``logEverySteps`` (metrics.jsonl, trl's names): ``loss``, ``reward`` and
``reward_std`` (the weighted sum of the rewards: mean and standard deviation over the step's
completions), ``rewards/<name>/mean`` and ``/std`` per reward (``reward_model``, and each verifiable
reward by its type), ``frac_reward_zero_std`` (groups without spread), ``kl`` (mean per-token KL to
the reference; when klCoef > 0), ``entropy``, ``completions/mean_length`` (and min, max, clipped
ratio), and ``generation_tokens_per_second`` (the job's completion tokens over the time spent
generating them). Every generation's prompts, by ``file:line``, go to ``rollouts.jsonl`` in the work
directory (step, the prompts of its groups, each group's mean reward). The summary adds the trainer,
the first and last steps' rewards, the mean reward of each half of the run, the generation rate, the
last step's reward spread, KL and entropy, and the mean completion length.
With eval data, the evaluations before and after training report trl's ``eval_reward`` (completions
of the eval prompts, sampled as in training) and ``eval_loss``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, ModelSpec, RLParams
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase, Trainer, set_seed
from trl.trainer.grpo_config import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_config import RLOOConfig
from trl.trainer.rloo_trainer import RLOOTrainer

from .. import harness, methods, modeling, rewards
from ..data.records import Record
from ..errors import ConfigError
from .causal_lm import PROMPTS

if TYPE_CHECKING:
    from ..predict import Predictions, SavedOutput

#: The columns of an RL row trl reads (``prompt``) and hands to the reward functions.
ROW_COLUMNS = ["prompt", "reference", "where"]
ROLLOUTS_FILE = "rollouts.jsonl"


def params(spec: FineTuneJobSpec) -> RLParams:
    assert spec.task.rl is not None  # the API requires it for spec.task.type rl
    return spec.task.rl


def reward_weights(rl: RLParams) -> list[float]:
    """trl's ``reward_weights``: the reward model's 1 first, then each verifiable reward's weight."""
    return ([1.0] if rl.reward_model is not None else []) + [r.weight for r in rl.rewards]


def task_args(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The GRPOConfig / RLOOConfig fields the spec sets beside the training fields (module docstring)."""
    rl = params(spec)
    # trl loads the reference model of a full fine-tuning itself, from the policy's path: with these, as
    # the policy was loaded (the Hub revision, a GGUF file, the model's own code).
    reference: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if spec.model.revision:
        reference["revision"] = spec.model.revision
    if spec.model.gguf_file:
        reference["gguf_file"] = spec.model.gguf_file
    return {
        "num_generations": rl.num_generations,
        "max_completion_length": rl.max_new_tokens,
        "temperature": rl.temperature,
        "beta": rl.kl_coef,
        "reward_weights": reward_weights(rl),
        "trust_remote_code": spec.model.trust_remote_code,
        "model_init_kwargs": reference,
    }


class RolloutCounts:
    """What the policy generated and trained on: prompt + completion tokens and completions
    (the harness's :class:`~..throughput.Counts`)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.samples = 0


def rollout_trainer(trainer_cls: type[Trainer]) -> type[Trainer]:
    """``trainer_cls`` (GRPOTrainer or RLOOTrainer) counting and timing its generations and writing
    every generation's prompts to the rollouts file."""

    class Rollouts(trainer_cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, counts: RolloutCounts, rollouts: Path, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # trl names a reward model after its directory; ours is `reward_model` in the metrics.
            names: list[str] = self.reward_func_names  # type: ignore[has-type]
            self.reward_func_names = [
                "reward_model" if isinstance(f, torch.nn.Module) else name
                for f, name in zip(self.reward_funcs, names, strict=True)
            ]
            self.counts = counts
            self.rollouts = rollouts

        def _generate(self, prompts: list[Any]) -> Any:
            started = time.perf_counter()
            out = super()._generate(prompts)
            elapsed = time.perf_counter() - started
            prompt_ids, completion_ids = out[0], out[1]
            generated = sum(len(ids) for ids in completion_ids)
            mode = "train" if self.model.training else "eval"
            if mode == "train":
                self.counts.tokens += generated + sum(len(ids) for ids in prompt_ids)
                self.counts.samples += len(completion_ids)
            # The job's rate: every rank's tokens over the slowest rank's time (they generate at once).
            both = self.accelerator.gather(torch.tensor([[float(generated), elapsed]], device=self.accelerator.device))
            seconds = float(both[:, 1].max())
            if seconds > 0:
                self._metrics[mode]["generation_tokens_per_second"].append(float(both[:, 0].sum()) / seconds)
            return out

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = super()._generate_and_score_completions(inputs)
            wheres = gathered([x["where"] for x in inputs])
            if self.accelerator.is_main_process and self.model.training:
                n = self.num_generations
                rewards = self._logs_group_rewards(len(wheres))
                record = {
                    "step": self.state.global_step + 1,
                    "prompts": [wheres[i] for i in range(0, len(wheres), n)],
                    "group_rewards": rewards,
                }
                with self.rollouts.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            return out

        def _logs_group_rewards(self, count: int) -> list[float] | None:
            # trl keeps the last generation batch's per-function rewards (gathered) in self._logs.
            columns = [list(v)[-count:] for v in self._logs["rewards"].values()]
            if not columns or any(len(c) != count for c in columns):
                return None
            weights = self.reward_weights.tolist()
            totals = [sum(w * c[i] for w, c in zip(weights, columns, strict=True)) for i in range(count)]
            n = self.num_generations
            return [sum(totals[i : i + n]) / n for i in range(0, count, n)]

    Rollouts.__name__ = Rollouts.__qualname__ = trainer_cls.__name__
    return Rollouts


def gathered(values: list[str]) -> list[str]:
    """Every rank's ``values``, in rank order (a collective: every rank calls it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [value for part in parts for value in (part or [])]


def load_reward_model(
    uri: str, spec: FineTuneJobSpec, policy_tokenizer: PreTrainedTokenizerBase, run: harness.Run
) -> tuple[Any, PreTrainedTokenizerBase]:
    """``spec.task.rl.rewardModel`` as a sequence-classification model with one output, in eval mode,
    and its tokenizer, which must be the policy's (ConfigError naming the field otherwise)."""
    model_spec = ModelSpec(uri=uri, trust_remote_code=spec.model.trust_remote_code)
    source = run.resolve_model(
        model_spec, field="spec.task.rl.rewardModel", cache_dir=run.work / "cache" / "reward-model"
    )
    with modeling.spec_errors(model_spec):
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=model_spec.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            source.path,
            trust_remote_code=model_spec.trust_remote_code,
            dtype=modeling.model_dtype(spec.model.dtype),
        )
    if model.config.num_labels != 1:
        raise ConfigError(
            f"spec.task.rl.rewardModel {uri} has {model.config.num_labels} outputs: a reward model has one "
            "(the output of a reward job)"
        )
    if not rewards.same_tokenizer(policy_tokenizer, tokenizer):
        raise ConfigError(
            f"spec.task.rl.rewardModel {uri} has another tokenizer than spec.model.uri: the reward model must "
            "read text as the policy's tokenizer writes it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _prompts(dataset: datasets.Dataset | None) -> datasets.Dataset | None:
    return dataset.select_columns(ROW_COLUMNS) if dataset is not None else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    rl = params(spec)
    if rl.algorithm == "ppo":
        from . import ppo

        return ppo.run(config)
    trainer_cls, args_class = (GRPOTrainer, GRPOConfig) if rl.algorithm == "grpo" else (RLOOTrainer, RLOOConfig)
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval, args_class=args_class, task_args=task_args(spec))

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        data = run.tokenized(checked, tokenizer)
        train = _prompts(data.train)
        assert train is not None
        held_out = _prompts(data.eval)

        functions: list[Any] = []
        processing: list[Any] = []
        if rl.reward_model is not None:
            reward_model, reward_tokenizer = load_reward_model(rl.reward_model, spec, tokenizer, run)
            functions.append(reward_model)
            processing.append(reward_tokenizer)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for function in rewards.verifiable_rewards(rl.rewards, eos_token_ids=eos):
            functions.append(function)
            processing.append(None)

        steps = prepared.planned_steps(len(train) * rl.num_generations)
        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=steps)
        set_seed(spec.training.seed)  # the same initial adapter weights on every rank and every run
        model = modeling.load_causal_lm(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
            **methods.load_kwargs(ctx),
        )
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        tuned = methods.apply(model, ctx)
        counts = RolloutCounts()
        rollouts = run.work / ROLLOUTS_FILE

        training = prepared.trainer(
            rollout_trainer(trainer_cls),
            tokens=counts,
            callbacks=methods.callbacks(tuned, ctx),
            model=tuned,
            reward_funcs=functions,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            reward_processing_classes=processing,
            counts=counts,
            rollouts=rollouts,
        )

        def evaluate(trainer: Trainer) -> dict[str, float]:
            if held_out is None:
                return {}
            out = trainer.evaluate()
            keep = ("eval_loss", "eval_reward", "eval_reward_std", "eval_completions/mean_length")
            return {k: v for k, v in out.items() if k in keep or k.startswith("eval_rewards/")}

        summary = training.train(evaluate)
        policy = training.trainer.accelerator.unwrap_model(training.trainer.model)
        if "ref" in getattr(policy, "peft_config", {}):
            # trl's frozen copy of the starting adapter (the reference under klCoef > 0) is no output.
            policy.delete_adapter("ref")
        logged = [m for m in training.trainer.state.log_history if "reward" in m]
        summary.update(
            algorithm=rl.algorithm,
            trainer=type(training.trainer).__name__,
            reward_first=logged[0]["reward"] if logged else None,
            reward_last=logged[-1]["reward"] if logged else None,
            reward_mean_first_half=_mean([m["reward"] for m in logged[: len(logged) // 2]]),
            reward_mean_second_half=_mean([m["reward"] for m in logged[len(logged) // 2 :]]),
            generation_tokens_per_second=_mean(
                [m["generation_tokens_per_second"] for m in logged if m.get("generation_tokens_per_second")]
            ),
            # The last logged step's spread, KL and entropy, and the mean completion length of the run.
            reward_std_last=logged[-1].get("reward_std") if logged else None,
            kl_last=logged[-1].get("kl") if logged else None,
            entropy_last=logged[-1].get("entropy") if logged else None,
            completion_length_mean=_mean(
                [m["completions/mean_length"] for m in logged if m.get("completions/mean_length") is not None]
            ),
        )
        return training.save_outputs(tokenizer)


def predict(
    saved: SavedOutput, records: list[Record], out: Predictions, *, cache_dir: Path, max_new_tokens: int
) -> dict[str, float]:
    """Generate each record's completion greedily after its prompt (as in training: the prompt, or the
    conversation before its last assistant turn, rendered with the generation prompt), with the
    record's reference; score every completion with the job's verifiable rewards (``rewards/<name>``:
    their unweighted mean over the records; the reward model is not loaded)."""
    spec = saved.config.spec
    data = spec.data
    rl = params(spec)
    tokenizer = saved.tokenizer()
    model = saved.model(modeling.load_causal_lm, tokenizer, cache_dir)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    functions = rewards.verifiable_rewards(rl.rewards, eos_token_ids=eos)
    totals = {f.__name__: 0.0 for f in functions}

    def predictions() -> Iterator[dict[str, Any]]:
        for record in records:
            ids, reference = PROMPTS[data.format](record, tokenizer, data)
            completion_ids = modeling.greedy_completion(model, tokenizer, ids, max_new_tokens)
            text = tokenizer.decode(completion_ids, skip_special_tokens=True)
            scores = {
                f.__name__: f(completions=[text], completion_ids=[completion_ids], reference=[reference])[0]
                for f in functions
            }
            for name, score in scores.items():
                totals[name] += score
            yield {"where": record.where, "prediction": text, "reference": reference, "rewards": scores}

    out.write(predictions())
    return {f"rewards/{name}": total / len(records) for name, total in totals.items()} if records else {}
