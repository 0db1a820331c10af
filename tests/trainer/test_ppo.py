"""PPO (``spec.task.rl.algorithm: ppo``, :mod:`finetune_trainer.recipes.ppo`): its arithmetic against
hand-computed values, and the recipe through ``finetune run`` on the tiny model.

The toy task is test_rl.py's: asked about a fruit, the tiny model starts its answer with " is" about half
of the time; a ``regex`` reward ``^ is`` scores that 1. PPO must raise the mean reward from there to at
least 0.8 while the KL to the reference stays bounded.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import live
import pytest
import tiny
import torch
from finetune_trainer import faults, telemetry
from finetune_trainer.recipes import ppo
from runs import RunResult
from test_rl import train_reward_job
from tiny import job_manifest, read_metrics, write_jsonl

SEED = 7
PATTERN = "^ is"
STEPS = 40
EPOCHS = 2
BATCH = 16
NEW_TOKENS = 8
KL = 0.05
FINETUNE = str(Path(sys.executable).with_name("finetune"))


# --- The arithmetic ------------------------------------------------------------------------------------------


def test_gae_matches_the_recursion_by_hand() -> None:
    # One completion of 3 tokens (then padding), gamma 0.9, lambda 0.8.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])  # the padded position's value must not count
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.3  # the last token: no next state
    d1 = -0.2 + 0.9 * 0.3 - 0.4
    d0 = 0.1 + 0.9 * 0.4 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    assert advantages.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert returns.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])
    # lambda 1, gamma 1: Monte-Carlo returns, the sum of the rewards still to come.
    _, mc = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert mc.tolist()[0] == pytest.approx([0.9, 0.8, 1.0, 0.0])


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_on_every_token() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = ppo.token_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.1)
    assert out.tolist()[0] == pytest.approx([-0.05, 0.1 + 2.0, 0.0])
    assert out.tolist()[1] == pytest.approx([0.0, 0.0, -1.0])
    assert ppo.token_rewards(torch.tensor([2.0, -1.0]), old, None, mask, kl_coef=0.1).tolist() == [
        [0.0, 2.0, 0.0],
        [0.0, 0.0, -1.0],
    ]


def test_the_clipped_surrogate_by_hand() -> None:
    old = torch.zeros(1, 4)
    # Ratios 1.5, 0.5, 1.1 and 0.7 (the last one padding).
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    advantages = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction, approx_kl = ppo.policy_loss(new, old, advantages, mask, clip=0.2)
    # A > 0, r 1.5: min(1.5, 1.2) = 1.2 (clipped); A > 0, r 0.5: min(0.5, 0.8) = 0.5; A < 0, r 1.1: -2 * 1.1.
    assert float(loss) == pytest.approx(-(1.2 + 0.5 - 2.2) / 3)
    assert float(clip_fraction) == pytest.approx(1 / 3)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert float(approx_kl) == pytest.approx(0.5 * sum(x * x for x in logs) / 3)
    # The gradient flows through the unclipped terms only.
    new.requires_grad_(True)
    ppo.policy_loss(new, old, advantages, mask, clip=0.2)[0].backward()
    assert new.grad is not None
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3, 2.2 / 3, 0.0])


def test_the_clipped_value_loss_by_hand() -> None:
    old = torch.tensor([[0.0, 0.0, 1.0]])
    returns = torch.tensor([[1.0, -1.0, 1.0]])
    values = torch.tensor([[0.5, 0.1, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, fraction = ppo.value_loss(values, old, returns, mask, clip=0.2)
    # Clipped predictions 0.2, 0.1, 1.2: the larger of the two errors of each token.
    errors = [max(0.25, 0.64), max(1.21, 1.21), max(4.0, 0.04)]
    assert float(loss) == pytest.approx(0.5 * sum(errors) / 3)
    assert float(fraction) == pytest.approx(1 / 3)


def test_the_completion_mask_keeps_the_first_end_of_sequence_token() -> None:
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert ppo.completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_whitened_advantages_have_mean_zero_and_unit_variance_over_the_real_tokens() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = ppo.whiten(values, mask)
    assert float(ppo.masked_mean(out, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(ppo.masked_mean(out**2, mask)) == pytest.approx(1.0, abs=1e-5)
    assert float(out[0, 3]) == 0.0


def test_the_sampler_repeats_each_rollout_batch_and_draws_every_prompt() -> None:
    sampler = ppo.RolloutSampler(10, prompts_per_batch=4, generations=2, repeats=3, seed=1)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 3 * 4 * 2 * 3  # 3 rollout batches (the last one filled)
    batches = [drawn[i : i + 8] for i in range(0, len(drawn), 8)]
    for b in range(0, len(batches), 3):
        assert batches[b] == batches[b + 1] == batches[b + 2]
        assert batches[b][0::2] == batches[b][1::2]  # each prompt's completions side by side
    assert set(drawn) == set(range(10))
    again = ppo.RolloutSampler(10, prompts_per_batch=4, generations=2, repeats=3, seed=1)
    assert list(again) == drawn
    again.set_epoch(1)
    assert list(again) != drawn


# --- The recipe ---------------------------------------------------------------------------------------------


def ppo_manifest(
    name: str, model: Path, train: Path, *, rl: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    return job_manifest(
        name,
        model,
        train,
        task={
            "type": "rl",
            "rl": {
                "algorithm": "ppo",
                "numGenerations": 2,
                "maxNewTokens": NEW_TOKENS,
                "temperature": 1.0,
                "klCoef": KL,
                "rewards": [{"type": "regex", "pattern": PATTERN}],
                "ppo": {"epochs": EPOCHS},
                **(rl or {}),
            },
        },
        training__maxSteps=STEPS,
        training__perDeviceBatchSize=BATCH,
        training__learningRate=3e-3,
        training__seed=SEED,
        training__logEverySteps=1,
        **overrides,
    )


@pytest.fixture(scope="module")
def fruit_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ppo-data") / "train.jsonl", tiny.prompt_completion_rows(96))


def rollout_steps(workdir: Path) -> list[dict[str, Any]]:
    """The logged steps that sampled a rollout (the first update of each rollout batch)."""
    return [m for m in read_metrics(workdir) if "loss" in m and "reward" in m]


def test_ppo_raises_the_reward_to_0_8_with_a_bounded_kl(
    tiny_model: Path, fruit_prompts: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    result = finetune_run(ppo_manifest("ppo", tiny_model, fruit_prompts))
    assert result.returncode == 0, result.output[-5000:]
    updates = [m for m in read_metrics(result.workdir) if "loss" in m]
    assert [m["step"] for m in updates] == list(range(1, STEPS + 1))
    rollouts = rollout_steps(result.workdir)
    # One rollout batch every EPOCHS steps, trained on EPOCHS times.
    assert [m["step"] for m in rollouts] == list(range(1, STEPS + 1, EPOCHS))
    rewards = [m["reward"] for m in rollouts]
    assert rewards[0] <= 0.6, rewards  # the starting policy: " is" about half of the time or less
    last = rewards[-5:]
    assert sum(last) / len(last) >= 0.8, rewards
    kls = [m["kl"] for m in rollouts]
    assert kls[0] == 0.0 and 0.0 < max(kls) < 1.0, kls  # the reference is the start; the penalty keeps it near
    for m in updates:
        for key in ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl"):
            assert key in m and math.isfinite(m[key]), (m["step"], key)
    # A rollout's first update is at ratio 1 (nothing clipped); its second moved away from the rollout policy.
    assert all(m["clip_fraction"] == 0.0 and m["approx_kl"] == 0.0 for m in rollouts)
    # Whitened advantages (the default) have mean 0: so has the policy loss at ratio 1.
    assert all(abs(m["policy_loss"]) < 1e-5 for m in rollouts), [m["policy_loss"] for m in rollouts]
    assert any(m["approx_kl"] > 0 for m in updates if m["step"] % EPOCHS == 0)
    # The value head learns: its error on the last rollouts is below the first ones'.
    values = [m["value_loss"] for m in rollouts]
    assert sum(values[-3:]) < sum(values[:3]), values
    for m in rollouts:
        assert m["rewards/regex/mean"] == m["reward"] and m["generation_tokens_per_second"] > 0
        assert set(telemetry.RL_LOGGED) <= set(m), set(telemetry.RL_LOGGED) - set(m)  # every RL gauge is fed
        assert m["completions/min_length"] <= m["completions/mean_length"] <= m["completions/max_length"] <= NEW_TOKENS

    summary = result.summary()
    assert (summary["trainer"], summary["algorithm"], summary["steps"]) == ("PPOTrainer", "ppo", STEPS)
    assert summary["ppo"]["epochs"] == EPOCHS and summary["ppo"]["clipRange"] == 0.2
    assert summary["reward_mean_second_half"] > summary["reward_mean_first_half"]
    assert summary["kl_max"] == max(kls) and summary["value_loss_last"] == rollouts[-1]["value_loss"]
    logged = [json.loads(line) for line in (result.workdir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [m["step"] for m in rollouts]
    assert all(len(r["prompts"]) == BATCH // 2 for r in logged)

    # The output is the policy's adapter alone: no value head in it.
    adapter = result.workdir / "storage" / "local" / "ppo" / "output" / "adapter"
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all("lora_" in n for n in names), names

    # finetune predict of the PPO output: greedy completions of held-out prompts, scored by its reward.
    held_out = write_jsonl(tmp_path / "held-out.jsonl", tiny.prompt_completion_rows(12, seed=5))
    lines = tmp_path / "predictions.jsonl"
    done = subprocess.run(
        [FINETUNE, "predict", str(adapter.parent), "--input", str(held_out), "--predictions", str(lines)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    scores = [json.loads(line)["rewards"]["regex"] for line in lines.read_text().splitlines()]
    assert sum(scores) / len(scores) > 0.5, scores


def test_a_reward_jobs_output_is_the_ppo_reward_model(
    tiny_model: Path, fruit_prompts: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    # The RLHF chain: a reward job's merged output scores PPO's rollouts (weight 1), plus a verifiable
    # reward at its weight.
    reward_model = train_reward_job(tiny_model, tmp_path, finetune_run)
    rl = {"rewardModel": str(reward_model), "rewards": [{"type": "regex", "pattern": PATTERN, "weight": 0.5}]}
    job = ppo_manifest("ppo-rm", tiny_model, fruit_prompts, rl=rl)
    job["spec"]["training"]["maxSteps"] = 4
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    rollouts = rollout_steps(result.workdir)
    assert [m["step"] for m in rollouts] == [1, 3]
    for m in rollouts:
        parts = m["rewards/reward_model/mean"] + 0.5 * m["rewards/regex/mean"]
        assert abs(m["reward"] - parts) < 1e-4, m
    assert len({round(m["rewards/reward_model/mean"], 6) for m in rollouts}) > 1  # the model scores each rollout


def test_full_ppo_against_a_reference_copy_with_eval_and_gradient_accumulation(
    tiny_model: Path, fruit_prompts: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    evals = write_jsonl(tmp_path / "eval.jsonl", tiny.prompt_completion_rows(8, seed=9))
    job = ppo_manifest("ppo-full", tiny_model, fruit_prompts, method={"type": "full"})
    job["spec"]["data"]["eval"] = {"uri": str(evals)}
    job["spec"]["training"].update(
        maxSteps=8, perDeviceBatchSize=8, gradientAccumulationSteps=2, learningRate=1e-4, evaluation={"everySteps": 4}
    )
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    metrics = read_metrics(result.workdir)
    rollouts = rollout_steps(result.workdir)
    assert [m["step"] for m in rollouts] == [1, 3, 5, 7]
    # Two micro-batches of 8 completions a step: the rollout metrics are over both.
    assert all(m["reward"] * 16 == pytest.approx(round(m["reward"] * 16)) for m in rollouts)
    assert rollouts[0]["kl"] == 0.0 and rollouts[-1]["kl"] > 0.0  # the frozen copy stays where the policy started
    evaluations = [m for m in metrics if "eval_reward" in m]
    # Before training, every 4 steps, and after training.
    assert [m["step"] for m in evaluations] == [0, 4, 8, 8], evaluations
    for m in evaluations:
        assert 0.0 <= m["eval_reward"] <= 1.0 and math.isfinite(m["eval_loss"])
        assert m["eval_rewards/regex"] == m["eval_reward"]
    summary = result.summary()
    assert set(summary["before"]) == {"eval_reward", "eval_rewards/regex", "eval_loss"}
    assert summary["after"]["eval_reward"] == evaluations[-1]["eval_reward"]
    merged = result.workdir / "storage" / "local" / "ppo-full" / "output"
    assert any(merged.rglob("model.safetensors"))


def test_every_ppo_knob_reaches_the_updates(
    tiny_model: Path, fruit_prompts: Path, finetune_run: Callable[..., RunResult]
) -> None:
    """Non-default knobs, each seen in what a run logs. Two runs differing only in the clip ranges: step 1 is
    the same rollout at ratio 1 in both; at steps 2 and 3 the small ranges clip and the large ones do not."""
    steps, epochs, coef, gamma, lam = 6, 3, 0.5, 0.9, 0.5
    knobs = {"epochs": epochs, "valueCoef": coef, "gamma": gamma, "gaeLambda": lam, "whitenAdvantages": False}

    def run(name: str, clip: float, value_clip: float) -> list[dict[str, Any]]:
        ppo_params = {**knobs, "clipRange": clip, "valueClipRange": value_clip}
        # Every completion is rewarded 1 (a length reward every length meets): step 1's returns are known.
        rewards = [{"type": "length", "maxTokens": NEW_TOKENS}]
        manifest = ppo_manifest(name, tiny_model, fruit_prompts, rl={"ppo": ppo_params, "rewards": rewards})
        manifest["spec"]["training"].update(maxSteps=steps, perDeviceBatchSize=4)
        result = finetune_run(manifest)
        assert result.returncode == 0, result.output[-5000:]
        assert result.summary()["ppo"] == ppo_params
        return [m for m in read_metrics(result.workdir) if "loss" in m]

    tight, loose = run("ppo-tight", 0.01, 0.001), run("ppo-loose", 10.0, 1000.0)
    for updates in (tight, loose):
        assert [m["step"] for m in updates if "reward" in m] == list(range(1, steps + 1, epochs))  # epochs
        for m in updates:  # valueCoef: the loss is the policy loss plus coef times the value loss
            assert m["loss"] == pytest.approx(m["policy_loss"] + coef * m["value_loss"], rel=1e-4, abs=1e-6)
        first = updates[0]
        # Step 1: the value head is 0 and the policy is the reference (no KL penalty), so a completion of L
        # tokens has returns gamma^k lam^k at the k-th token from its end (GAE): their mean over the tokens
        # is known when every completion has NEW_TOKENS tokens.
        assert first["reward"] == 1.0
        assert first["completions/min_length"] == NEW_TOKENS == first["completions/max_length"]
        decay = gamma * lam
        assert first["returns"] == pytest.approx((1 - decay**NEW_TOKENS) / (NEW_TOKENS * (1 - decay)), rel=1e-5)
        # Advantages not whitened: at ratio 1 the policy loss is minus their mean (= the returns, V being 0).
        assert first["policy_loss"] == pytest.approx(-first["returns"], rel=1e-5)
    assert tight[0]["loss"] == pytest.approx(loose[0]["loss"], rel=1e-6)
    # The first rollout's second and third updates: the small ranges clip, the large ones do not (later, the
    # unwhitened advantages can move a token's ratio past even 1 + 10).
    for step in (1, 2):
        assert tight[step]["clip_fraction"] > 0 and loose[step]["clip_fraction"] == 0, (tight[step], loose[step])
        assert tight[step]["value_clip_fraction"] > 0 and loose[step]["value_clip_fraction"] == 0


@pytest.mark.parametrize(
    "world",
    [
        pytest.param({"nproc": 1, "deepspeed": None}, id="one-process"),  # the Trainer's checkpoint (ppo._save)
        pytest.param({"nproc": 2, "deepspeed": {"zeroStage": 2}}, id="two-ranks-zero2"),  # DeepSpeed's
    ],
)
def test_killed_then_resumed_equals_an_uninterrupted_run(
    tiny_model: Path, fruit_prompts: Path, tmp_path: Path, world: dict[str, Any]
) -> None:
    steps, saved = 10, 6  # checkpoint 6: after a rollout with a reward, so the value head has moved
    nproc = str(world["nproc"])

    def job(name: str) -> dict[str, Any]:
        manifest = ppo_manifest(name, tiny_model, fruit_prompts, checkpoint={"everySteps": saved, "keepLast": 2})
        if world["deepspeed"]:
            manifest["spec"]["distributed"]["deepspeed"] = world["deepspeed"]
        manifest["spec"]["training"].update(maxSteps=steps, perDeviceBatchSize=4)
        return manifest

    whole = live.start(tmp_path, job("ppo-whole"), "--nproc", nproc)
    try:
        assert whole.wait(timeout=300) == 0, whole.output[-5000:]
    finally:
        whole.kill()
    store = tmp_path / "run-ppo-cut" / "storage" / "local" / "ppo-cut"

    def committed() -> list[int]:
        return sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in store.glob("checkpoint-*/manifest.json"))

    # kill -9 at the first micro-batch of step saved + 2 (the test hook: a kill from outside can land after
    # these fast steps have all run)
    cut = live.start(tmp_path, job("ppo-cut"), "--nproc", nproc, env={faults.KILL_AT_STEP: str(saved + 2)})
    try:
        code = cut.wait(timeout=300)
    finally:
        cut.kill()
    assert saved in committed()
    assert code == 128 + signal.SIGKILL, f"exit {code}: the kill landed after training ended?\n{cut.output[-4000:]}"
    assert cut.logged_step() < steps
    rerun = live.start(tmp_path, job("ppo-cut"), "--nproc", nproc, tag="rerun")
    try:
        assert rerun.wait(timeout=300) == 0, rerun.output[-5000:]
    finally:
        rerun.kill()
    assert re.search(rf"resuming from \S+checkpoint-{saved} \(step {saved}", rerun.output), rerun.output[-3000:]
    # From the checkpoint on (a rollout batch's boundary), the resumed run samples and trains as the whole run
    # did: its policy, value head, optimizer and random state were restored.
    resumed = {m["step"]: m for m in cut.metrics() if "loss" in m}
    uninterrupted = {m["step"]: m for m in whole.metrics() if "loss" in m}
    # The value head had gradients before the checkpoint: a resume that lost it would show in value_loss.
    assert any(uninterrupted[step]["value_loss"] > 0 for step in range(1, saved + 1))
    for step in range(saved + 1, steps + 1):
        for key in ("loss", "value_loss", "policy_loss", *(("reward",) if "reward" in uninterrupted[step] else ())):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], abs=1e-4), (step, key)
    summary = json.loads((cut.workdir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from_step"] == saved
