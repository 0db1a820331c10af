"""Recipe: online RL with PPO (``spec.task.rl.algorithm: ppo``) — implemented here: trl ships no PPO trainer.

**One rollout batch, several updates.** Every ``spec.task.rl.ppo.epochs`` optimizer steps, each rank
samples ``spec.training.perDeviceBatchSize`` completions per micro-batch (``numGenerations`` of each of
its prompts) from the policy, for the ``gradientAccumulationSteps`` micro-batches of a step, and keeps
them with what they need for training (the *rollout*):

1. the *score* of each completion: the reward model's output (weight 1) plus each verifiable reward
   times its weight (:mod:`..rewards`), as GRPO's;
2. the log-probability of each completion token under the rollout policy (``old``) and under the
   reference — the starting model: the policy with its adapter disabled under a PEFT method, a frozen
   copy under ``full`` (none when ``klCoef`` is 0) — and the value head's estimate of each token's
   state;
3. the per-token reward (reward shaping, as InstructGPT and trl's last PPO trainer did): ``-klCoef *
   (log pi_old - log pi_ref)`` at every token, plus the score at the completion's last token (its
   end-of-sequence token, or the last of ``maxNewTokens``);
4. the advantages, by generalised advantage estimation (:func:`gae`: ``gamma``, ``gaeLambda``) over the
   completion's tokens, whitened per micro-batch (``whitenAdvantages``), and the returns (advantage +
   value) the value head learns.

The ``epochs`` optimizer steps on a rollout batch each minimise, per micro-batch, the clipped surrogate
(:func:`policy_loss`: the probability ratio of the current to the rollout policy clipped to ``1 +-
clipRange``) plus ``valueCoef`` times the clipped value loss (:func:`value_loss`: ``valueClipRange``),
averaged over the completion tokens; AdaLoRA's orthogonality penalty is added as in DPO. The first of
them starts at ratio 1; later ones move away from the rollout policy, which is what clipping bounds.

**The value head** is one linear layer on the policy's last hidden state (:class:`PolicyAndValue`),
zero-initialised (it predicts 0 until it learns), trained with the policy (its gradients reach the
shared trunk, the adapter under PEFT), checkpointed with the trainable weights and resumed with them; it
is not part of the outputs (the adapter and/or merged model are the policy's alone).

**The prompts** (the rows of :mod:`..data.rl`) are drawn in a seeded shuffle, each rollout batch
``epochs`` times in a row (:class:`RolloutSampler`): an epoch of the run is every prompt's completions
trained ``epochs`` times, and ``spec.training.maxSteps`` counts every update. A run resumed between two
updates of one rollout batch samples that batch's completions again (the rollout is not checkpointed):
the same prompts, new completions.

**Knobs**: ``spec.task.rl`` — ``numGenerations`` (1 is allowed: PPO needs no group), ``maxNewTokens``,
``temperature`` (sampling, and the log-probabilities as trl computes them: logits over temperature),
``klCoef``, ``rewardModel``, ``rewards``; ``spec.task.rl.ppo`` — ``epochs``, ``clipRange``,
``valueClipRange``, ``valueCoef``, ``gamma``, ``gaeLambda``, ``whitenAdvantages``. Learning rate,
scheduler, optimizer, seed, batch and accumulation, checkpoints and resume are the harness's. Methods:
the rl task's row (full/freeze, LoRA, QLoRA, IA3, AdaLoRA). DDP under torchrun and DeepSpeed ZeRO 1-2
(ZeRO-3 is refused at admission). Dropout is the model's (``spec.training.dropout``): rollouts are taken
in eval mode, updates in train mode, so dropout adds noise to the ratio; leave it at 0 for PPO.

**Logged** every ``logEverySteps`` (metrics.jsonl, the names GRPO's trl metrics use where they mean the
same): ``loss``; ``reward``, ``reward_std`` and ``rewards/<name>/mean`` (over the rollout batch's
completions, every rank's); ``kl`` (the mean per-token ``log pi_old - log pi_ref``, the KL estimate the
penalty uses); ``entropy`` of the sampling distribution; ``completions/mean_length``, ``/min_length``,
``/max_length``, ``/clipped_ratio`` (no end-of-sequence within maxNewTokens);
``generation_tokens_per_second``; and PPO's ``policy_loss``, ``value_loss``, ``clip_fraction`` (tokens
whose ratio was clipped), ``value_clip_fraction``, ``approx_kl`` (half the mean squared log-ratio to the
rollout policy) and ``returns``. Rollouts (step, prompts by ``file:line``, each group's mean score) go to
``rollouts.jsonl`` as GRPO's. Evaluations (before and after, and every ``evaluation.everySteps``) sample
the eval prompts' completions as training does and report ``eval_reward`` (and ``eval_rewards/<name>``)
and ``eval_loss``, the PPO loss of those rollouts (ratio 1: mostly the value head's error).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import PPOParams, RLParams
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, Trainer, set_seed
from trl.data_utils import apply_chat_template, is_conversational, maybe_apply_chat_template
from trl.models.utils import unwrap_model_for_generation

from .. import harness, methods, modeling, rewards
from .dpo import adalora_penalty
from .rl import ROLLOUTS_FILE, RolloutCounts, gathered, load_reward_model, params

SAFE_WEIGHTS_NAME = "model.safetensors"


# --- The arithmetic of PPO, on [batch, completion tokens] tensors with a 0/1 mask of the real tokens ---------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is 1 (0 for an empty mask)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` shifted to mean 0 and scaled to variance 1 over the masked positions (0 elsewhere)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def token_rewards(
    scores: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * (old - ref)`` at every completion token, plus the completion's score
    at its last token."""
    rewards = torch.zeros_like(old_logprobs)
    if ref_logprobs is not None and kl_coef:
        rewards = -kl_coef * (old_logprobs - ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=scores.device)
    return rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015) over each completion's tokens, the mask a
    prefix of 1s: ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` 0 past the last token) and ``A_t = delta_t +
    gamma lam A_{t+1}``. Returns the advantages and the returns ``A + V`` (both 0 past the last token)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        following = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate ``max(-A r, -A clip(r, 1 - clip, 1 + clip))``, ``r = exp(logp - old)``, averaged
    over the tokens; with the fraction of tokens where the clipped term was taken and the approximate KL to
    the rollout policy (half the mean squared log-ratio)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss ``0.5 max((V - R)^2, (V_clip - R)^2)``, ``V_clip = old + clip(V - old, +-clip)``,
    averaged over the tokens; with the fraction of tokens where the clipped term was taken."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).to(values.dtype), mask).detach()


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """1 for each completion token up to and including its first end-of-sequence token, 0 after it."""
    length = completion_ids.shape[1]
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= completion_ids == eos
    first = torch.where(
        is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first.unsqueeze(1)).to(torch.long)


# --- The model: the policy and its value head -----------------------------------------------------------------


class PolicyAndValue(nn.Module):
    """The policy (a causal LM, or its peft model) and a value head on its last hidden state. The
    Trainer's model: one module, so that DDP and DeepSpeed reduce and step both."""

    def __init__(self, policy: Any, hidden_size: int):
        super().__init__()
        self.policy: Any = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the value of every position."""
        out = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``ids`` under ``logits`` over ``temperature`` (the positions that predict them),
    and the entropy of each position's distribution."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


# --- The prompts: each rollout batch drawn epochs times ---------------------------------------------------------


class RolloutSampler(torch.utils.data.Sampler[int]):
    """Indices of the prompt rows for the Trainer's DataLoader: a seeded shuffle per epoch, cut into rollout
    batches of ``prompts_per_batch`` prompts (the last one filled from the start of the shuffle), each
    prompt ``generations`` times in a row, and each rollout batch ``repeats`` times in a row."""

    def __init__(self, rows: int, *, prompts_per_batch: int, generations: int, repeats: int, seed: int):
        self.rows, self.per_batch, self.generations, self.repeats, self.seed = (
            rows,
            prompts_per_batch,
            generations,
            repeats,
            seed,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> int:
        return math.ceil(self.rows / self.per_batch)

    def __len__(self) -> int:
        return self.batches() * self.per_batch * self.generations * self.repeats

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.rows, generator=generator).tolist()
        order += order[: self.batches() * self.per_batch - self.rows]
        for start in range(0, len(order), self.per_batch):
            batch = [i for i in order[start : start + self.per_batch] for _ in range(self.generations)]
            for _ in range(self.repeats):
                yield from batch


# --- The trainer ------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One micro-batch of sampled completions with what the updates need (module docstring)."""

    input_ids: torch.Tensor  # prompt (left-padded) + completion
    attention_mask: torch.Tensor
    mask: torch.Tensor  # the completion's real tokens, [batch, completion tokens]
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # the weighted sum of per_function
    per_function: list[torch.Tensor]  # each reward function's scores


def _rows(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DataLoader's collator: the prompt rows as they are (the trainer samples their completions)."""
    return features


class PPOTrainer(Trainer):
    """transformers' Trainer whose micro-batches are rollouts (module docstring); ``model`` is a
    :class:`PolicyAndValue`."""

    def __init__(
        self,
        *,
        model: PolicyAndValue,
        processing_class: PreTrainedTokenizerBase,
        rl: RLParams,
        reward_funcs: list[Any],
        reward_tokenizer: PreTrainedTokenizerBase | None,
        reference: nn.Module | None,
        counts: RolloutCounts,
        rollouts: Path,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model=model,
            processing_class=processing_class,
            data_collator=_rows,  # type: ignore[arg-type]  # rows, not tensors: rollout() samples their completions
            **kwargs,
        )
        self.rl = rl
        self.ppo: PPOParams = rl.ppo or PPOParams()
        self.reward_funcs = reward_funcs
        self.reward_tokenizer = reward_tokenizer
        self.reference = reference
        self.counts = counts
        self.rollouts = rollouts
        self.tokenizer = processing_class
        self.reward_names = ["reward_model" if isinstance(f, nn.Module) else f.__name__ for f in reward_funcs]
        weights = iter(r.weight for r in rl.rewards)
        self.reward_weights = [1.0 if isinstance(f, nn.Module) else next(weights) for f in reward_funcs]
        eos = processing_class.eos_token_id
        self.eos_token_ids = [eos] if eos is not None else []
        self.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=True,
            temperature=rl.temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=rl.max_new_tokens,
            pad_token_id=processing_class.pad_token_id,
            eos_token_id=eos,
            bos_token_id=processing_class.bos_token_id,
        )
        self._buffer: dict[int, Rollout] = {}
        self._micro_batch: int | None = None
        self._metrics: dict[str, list[float]] = {}
        self._generation_seconds = 0.0
        self._generated_tokens = 0

    # The prompts and the rollout schedule.

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler[int]:
        dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        completions = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return RolloutSampler(
            len(dataset),
            prompts_per_batch=completions // self.rl.num_generations,
            generations=self.rl.num_generations,
            repeats=self.ppo.epochs,
            seed=args.seed,
        )

    def _prepare_inputs(self, inputs: Any) -> Any:
        """A training micro-batch's rollout: sampled at the first update of its rollout batch, kept for the
        others (sampled again after a resume between them)."""
        accumulation = self.args.gradient_accumulation_steps
        if self._micro_batch is None:
            self._micro_batch = self.state.global_step * accumulation
        position = self._micro_batch % (accumulation * self.ppo.epochs)
        self._micro_batch += 1
        slot = position % accumulation
        if position < accumulation or slot not in self._buffer:
            self._buffer[slot] = self.rollout(inputs, training=True)
        return self._buffer[slot]

    # Sampling and scoring.

    def _unwrapped(self) -> PolicyAndValue:
        unwrapped: PolicyAndValue = self.accelerator.unwrap_model(self.model)
        return unwrapped

    @torch.no_grad()
    def rollout(self, rows: list[dict[str, Any]], *, training: bool) -> Rollout:
        """Sample, score and evaluate the completions of ``rows`` (module docstring, steps 1-4). When
        ``training``, the step's metrics are recorded (every rank's completions: a collective)."""
        device = self.args.device
        tokenizer = self.tokenizer
        texts = [maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer)["prompt"] for row in rows]
        prompt = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        prompt_ids, prompt_mask = prompt["input_ids"].to(device), prompt["attention_mask"].to(device)
        wrapper = self._unwrapped()
        started = time.perf_counter()
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            generated = unwrapped.policy.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
            )
            unwrapped.train(was_training)
        elapsed = time.perf_counter() - started
        width = prompt_ids.shape[1]
        completion_ids = generated[:, width:]
        mask = completion_mask(completion_ids, self.eos_token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad))
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)

        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        ids_lists = [row[m.bool()].tolist() for row, m in zip(completion_ids, mask, strict=True)]
        per_function = self._score(rows, completions, ids_lists)
        scores = torch.zeros(len(rows), device=device)
        for weight, column in zip(self.reward_weights, per_function, strict=True):
            scores += weight * column

        was_training = wrapper.training
        wrapper.eval()
        logits, values = wrapper(input_ids, attention_mask)
        old_logprobs, entropy = token_logprobs(logits[:, width - 1 : -1], completion_ids, self.rl.temperature)
        old_values = values[:, width - 1 : -1].float() * mask
        ref_logprobs = self._reference_logprobs(input_ids, attention_mask, completion_ids, width)
        wrapper.train(was_training)

        fmask = mask.to(old_logprobs.dtype)
        rewards_t = token_rewards(scores, old_logprobs, ref_logprobs, fmask, self.rl.kl_coef)
        advantages, returns = gae(rewards_t, old_values, fmask, gamma=self.ppo.gamma, lam=self.ppo.gae_lambda)
        if self.ppo.whiten_advantages:
            advantages = whiten(advantages, fmask)

        if training:
            generated_tokens = int(mask.sum())
            self.counts.samples += len(rows)
            # A completion that fills maxNewTokens without an end-of-sequence token was cut.
            ended = torch.isin(completion_ids[:, -1], torch.tensor(self.eos_token_ids, device=device))
            cut = (mask.sum(dim=1) == mask.shape[1]) & ~ended
            self._record_rollout(rows, scores, per_function, fmask, old_logprobs, ref_logprobs, entropy, returns, cut)
            both = self.accelerator.gather(torch.tensor([[float(generated_tokens), elapsed]], device=device))
            seconds = float(both[:, 1].max())
            if seconds > 0:
                self._metric("generation_tokens_per_second", float(both[:, 0].sum()) / seconds)
        return Rollout(
            input_ids, attention_mask, fmask, old_logprobs, old_values, advantages, returns, scores, per_function
        )

    def _score(self, rows: list[dict[str, Any]], completions: list[str], ids: list[list[int]]) -> list[torch.Tensor]:
        """Each reward function's scores of the completions."""
        device = self.args.device
        references = [row["reference"] for row in rows]
        out: list[torch.Tensor] = []
        for function in self.reward_funcs:
            if isinstance(function, nn.Module):
                out.append(self._reward_model_scores(function, rows, completions))
            else:
                values = function(completions=completions, completion_ids=ids, reference=references)
                out.append(torch.tensor(values, dtype=torch.float32, device=device))
        return out

    def _reward_model_scores(
        self, model: nn.Module, rows: list[dict[str, Any]], completions: list[str]
    ) -> torch.Tensor:
        """The reward model's score of prompt + completion, rendered as trl's GRPO renders it."""
        tokenizer = self.reward_tokenizer
        assert tokenizer is not None
        if is_conversational({"prompt": rows[0]["prompt"]}):
            texts = [
                apply_chat_template({"messages": [*row["prompt"], {"role": "assistant", "content": c}]}, tokenizer)[
                    "text"
                ]
                for row, c in zip(rows, completions, strict=True)
            ]
        else:
            texts = [row["prompt"] + c for row, c in zip(rows, completions, strict=True)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        encoded = {k: v.to(self.args.device) for k, v in encoded.items()}
        scores: torch.Tensor = model(**encoded).logits[:, 0].float()
        return scores

    def _reference_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_ids: torch.Tensor, width: int
    ) -> torch.Tensor | None:
        if not self.rl.kl_coef:
            return None
        if self.reference is not None:
            logits = self.reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        else:
            policy = self._unwrapped().policy
            with policy.disable_adapter():
                logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_logprobs(logits[:, width - 1 : -1], completion_ids, self.rl.temperature)[0]

    def _record_rollout(
        self,
        rows: list[dict[str, Any]],
        scores: torch.Tensor,
        per_function: list[torch.Tensor],
        mask: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        entropy: torch.Tensor,
        returns: torch.Tensor,
        cut: torch.Tensor,
    ) -> None:
        all_scores = self.accelerator.gather(scores)
        self._metric("reward", float(all_scores.mean()))
        self._metric("reward_std", float(all_scores.std()) if len(all_scores) > 1 else 0.0)
        for name, column in zip(self.reward_names, per_function, strict=True):
            self._metric(f"rewards/{name}/mean", float(self.accelerator.gather(column).mean()))
        lengths = self.accelerator.gather(mask.sum(dim=1))
        self._metric("completions/mean_length", float(lengths.mean()))
        self._metric("completions/min_length", float(lengths.min()))
        self._metric("completions/max_length", float(lengths.max()))
        self._metric("completions/clipped_ratio", float(self.accelerator.gather(cut.float()).mean()))
        self._metric("entropy", float(masked_mean(entropy, mask)))
        self._metric("returns", float(masked_mean(returns, mask)))
        if ref_logprobs is not None:
            self._metric("kl", float(masked_mean(old_logprobs - ref_logprobs, mask)))
        wheres = gathered([row["where"] for row in rows])
        group_scores = all_scores.tolist()
        if self.accelerator.is_main_process:
            n = self.rl.num_generations
            record = {
                "step": self.state.global_step + 1,
                "prompts": [wheres[i] for i in range(0, len(wheres), n)],
                "group_rewards": [sum(group_scores[i : i + n]) / n for i in range(0, len(group_scores), n)],
            }
            with self.rollouts.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    # The updates.

    def compute_loss(  # type: ignore[override]  # the inputs are a Rollout (_prepare_inputs)
        self, model: nn.Module, inputs: Rollout, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The PPO loss of one micro-batch's rollout under the current policy and value head."""
        loss, parts = self._ppo_loss(model, inputs)
        for name, value in parts.items():
            self._metric(name, value)
        self.counts.tokens += int(inputs.attention_mask.sum())
        return (loss, None) if return_outputs else loss

    def _ppo_loss(self, model: nn.Module, r: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        width = r.input_ids.shape[1] - r.mask.shape[1]
        logits, values = model(r.input_ids, r.attention_mask)
        logprobs, _ = token_logprobs(logits[:, width - 1 : -1], r.input_ids[:, width:], self.rl.temperature)
        values = values[:, width - 1 : -1].float()
        pg, clip_fraction, approx_kl = policy_loss(logprobs, r.old_logprobs, r.advantages, r.mask, self.ppo.clip_range)
        vf, value_clip_fraction = value_loss(values, r.old_values, r.returns, r.mask, self.ppo.value_clip_range)
        loss = pg + self.ppo.value_coef * vf
        penalty = adalora_penalty(self._unwrapped().policy) if model.training else None
        if penalty is not None:
            loss = loss + penalty
        return loss, {
            "policy_loss": float(pg.detach()),
            "value_loss": float(vf.detach()),
            "clip_fraction": float(clip_fraction),
            "value_clip_fraction": float(value_clip_fraction),
            "approx_kl": float(approx_kl),
        }

    # Metrics.

    def _metric(self, name: str, value: float) -> None:
        self._metrics.setdefault(name, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            names = sorted(self._metrics)
            means = torch.tensor(
                [sum(self._metrics[n]) / len(self._metrics[n]) for n in names], device=self.args.device
            )
            # The loss-side metrics are each rank's: their mean over ranks (the rollout-side ones are equal).
            means = self.accelerator.reduce(means, reduction="mean")
            logs = {**logs, **dict(zip(names, means.tolist(), strict=True))}
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Completions of the eval prompts sampled as in training (each rank its share): the mean score
        (``eval_reward``, ``eval_rewards/<name>``) and the PPO loss of those rollouts (``eval_loss``)."""
        dataset: Any = eval_dataset if eval_dataset is not None else self.eval_dataset
        assert dataset is not None
        world, rank = self.args.world_size, self.args.process_index
        mine = [dataset[i] for i in range(rank, len(dataset), world)]
        batch = self.args.per_device_eval_batch_size
        names = ["reward", *(f"rewards/{n}" for n in self.reward_names), "loss"]
        sums = torch.zeros(len(names) + 1, device=self.args.device)  # the last: completions
        model = self._unwrapped()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(mine), batch):
                rows = [r for r in mine[start : start + batch] for _ in range(self.rl.num_generations)]
                r = self.rollout(rows, training=False)
                loss, _ = self._ppo_loss(model, r)
                n = len(rows)
                sums[0] += r.scores.sum()
                for i, column in enumerate(r.per_function, start=1):
                    sums[i] += column.sum()
                sums[len(names) - 1] += loss * n
                sums[-1] += n
        model.train(was_training)
        sums = self.accelerator.reduce(sums, reduction="sum")
        count = float(sums[-1]) or 1.0
        metrics = {f"{metric_key_prefix}_{name}": float(sums[i]) / count for i, name in enumerate(names)}
        self.log(dict(metrics))  # transformers adds the epoch to what it logs
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # Checkpoints: the trainable weights (the adapter or the whole policy, and the value head).

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        out = output_dir if output_dir is not None else self.args.output_dir
        assert out is not None
        os.makedirs(out, exist_ok=True)
        model = self._unwrapped()
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        full = state_dict if state_dict is not None else model.state_dict()
        kept = {name: full[name].detach().contiguous().cpu() for name in trainable if name in full}
        safetensors.torch.save_file(kept, os.path.join(out, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(out, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The trainable weights back from ``_save``'s file (DeepSpeed resumes through its own engine). The
        frozen rest is the base model as loaded; a trainable weight the file lacks, or a weight it holds that
        is not trainable here, means the checkpoint is not this run's: refused rather than half loaded."""
        del model  # the Trainer passes its wrapper; the weights are named as in the unwrapped model
        target = self._unwrapped()
        saved = safetensors.torch.load_file(os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME))
        trainable = {name for name, p in target.named_parameters() if p.requires_grad}
        if set(saved) != trainable:
            raise RuntimeError(
                f"checkpoint {resume_from_checkpoint} holds other trainable weights than this run: "
                f"missing {sorted(trainable - set(saved))[:5]}, unexpected {sorted(set(saved) - trainable)[:5]}"
            )
        target.load_state_dict(saved, strict=False)


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    rl = params(spec)
    ppo = rl.ppo or PPOParams()
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval)

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        data = run.tokenized(checked, tokenizer)
        train = data.train.select_columns(["prompt", "reference", "where"])
        held_out = data.eval.select_columns(["prompt", "reference", "where"]) if data.eval is not None else None

        functions: list[Any] = []
        reward_tokenizer = None
        if rl.reward_model is not None:
            reward_model, reward_tokenizer = load_reward_model(rl.reward_model, spec, tokenizer, run)
            functions.append(reward_model.to(prepared.args.device))
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        functions.extend(rewards.verifiable_rewards(rl.rewards, eos_token_ids=eos))

        steps = prepared.planned_steps(len(train) * rl.num_generations * ppo.epochs)
        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=steps)
        set_seed(spec.training.seed)  # the same initial adapter (and value head) on every rank and every run
        model = modeling.load_causal_lm(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
            **methods.load_kwargs(ctx),
        )
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        reference: Any = None
        if rl.kl_coef and spec.method.type == "full":  # PEFT methods disable the adapter instead
            reference = copy.deepcopy(model).requires_grad_(False)
            reference.to(prepared.args.device)
            reference.train(False)
        tuned = methods.apply(model, ctx)
        wrapper = PolicyAndValue(tuned, model.config.get_text_config().hidden_size)
        counts = RolloutCounts()

        training = prepared.trainer(
            PPOTrainer,
            tokens=counts,
            callbacks=methods.callbacks(tuned, ctx),
            model=wrapper,
            processing_class=tokenizer,
            train_dataset=train,
            eval_dataset=held_out,
            rl=rl,
            reward_funcs=functions,
            reward_tokenizer=reward_tokenizer,
            reference=reference,
            counts=counts,
            rollouts=run.work / ROLLOUTS_FILE,
        )

        def evaluate(trainer: Trainer) -> dict[str, float]:
            return trainer.evaluate() if held_out is not None else {}

        summary = training.train(evaluate)
        logged = [m for m in training.trainer.state.log_history if "reward" in m]
        last = logged[-1] if logged else {}
        summary.update(
            algorithm=rl.algorithm,
            trainer=type(training.trainer).__name__,
            ppo=ppo.model_dump(by_alias=True),
            reward_first=logged[0]["reward"] if logged else None,
            reward_last=last.get("reward"),
            reward_mean_first_half=_mean([m["reward"] for m in logged[: len(logged) // 2]]),
            reward_mean_second_half=_mean([m["reward"] for m in logged[len(logged) // 2 :]]),
            generation_tokens_per_second=_mean(
                [m["generation_tokens_per_second"] for m in logged if m.get("generation_tokens_per_second")]
            ),
            reward_std_last=last.get("reward_std"),
            kl_last=last.get("kl"),
            kl_max=max((m["kl"] for m in logged if "kl" in m), default=None),
            entropy_last=last.get("entropy"),
            clip_fraction_last=last.get("clip_fraction"),
            value_loss_last=last.get("value_loss"),
            completion_length_mean=_mean(
                [m["completions/mean_length"] for m in logged if m.get("completions/mean_length") is not None]
            ),
        )
        return training.save_outputs(tokenizer, model=tuned)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
