"""Online RL (``spec.task.type: rl``): GRPO and RLOO through ``finetune run``, on the tiny model.

The toy task: the tiny model, asked about a fruit, starts its answer with " is" about half of the time
(" is red and sweet...") and otherwise with a fruit or color word; a ``regex`` reward ``^ is`` scores
the first kind 1. GRPO's per-step loss, reward and KL equal a plain trl GRPOTrainer script's on the same
seed (sampling is seeded: trl reseeds every rank before training, and both runs draw the same random
numbers in the same order), and the mean reward rises. A reward that never varies within a group gives
every completion zero advantage: with klCoef 0 the loss and the gradients of a full fine-tuning are
exactly 0. RLOO trains (full fine-tuning: trl loads the reference model beside the policy) on chat
records against a reward model (a ``reward`` job's merged output) plus verifiable rewards; a
reward model with another tokenizer (a tiny LlamaForSequenceClassification built here) is refused
naming the field. Under torchrun, two ranks with ZeRO-2: a rank killed with SIGKILL, the same
command resumes from the last checkpoint and ends at the same step count, every step's prompts those
the interrupted run drew for it, none repeated.
"""

from __future__ import annotations

import json
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
from runs import RunResult
from tiny import job_manifest, read_metrics, write_jsonl

SEED = 7
STEPS = 12
BATCH = 8
GENERATIONS = 4
NEW_TOKENS = 8
LR = 3e-3
KL = 0.1  # not the default (0.04): the comparison would not notice it ignored
TEMPERATURE = 0.9
PATTERN = "^ is"
FINETUNE = str(Path(sys.executable).with_name("finetune"))


def rl_manifest(name: str, model: Path, train: Path, rl: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return job_manifest(
        name,
        model,
        train,
        task={"type": "rl", "rl": {"numGenerations": GENERATIONS, "maxNewTokens": NEW_TOKENS, **rl}},
        training__maxSteps=STEPS,
        training__perDeviceBatchSize=BATCH,
        training__learningRate=LR,
        training__seed=SEED,
        **overrides,
    )


def plain_trl_grpo(model_dir: Path, train: Path, out: Path) -> list[dict[str, Any]]:
    """GRPO as trl's documentation writes it: a LoRA model, a dataset with a prompt column, a reward
    function, GRPOConfig and GRPOTrainer; its log history."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})

    def starts_with_is(completions: list[str], **_: Any) -> list[float]:
        return [1.0 if c.startswith(" is") else 0.0 for c in completions]

    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=STEPS,
        logging_steps=1,
        seed=SEED,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        beta=KL,
        temperature=TEMPERATURE,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=starts_with_is, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def fruit_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rl-data") / "train.jsonl", tiny.prompt_completion_rows(96))


def test_grpo_matches_plain_trl_and_the_reward_rises(
    tiny_model: Path, fruit_prompts: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    job = rl_manifest(
        "grpo",
        tiny_model,
        fruit_prompts,
        {"klCoef": KL, "temperature": TEMPERATURE, "rewards": [{"type": "regex", "pattern": PATTERN}]},
    )
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    # An epoch is numGenerations completions of each prompt: the data's rows (and the preflight's steps).
    assert f"data: 96 training records, {96 * GENERATIONS} rows" in result.output, result.output[-3000:]
    ours = [m for m in read_metrics(result.workdir) if "loss" in m and "reward" in m]
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))

    plain = plain_trl_grpo(tiny_model, fruit_prompts, tmp_path / "plain")
    assert len(plain) == STEPS
    for mine, theirs in zip(ours, plain, strict=True):
        for key in ("loss", "reward", "reward_std", "kl", "entropy", "completions/mean_length"):
            assert abs(mine[key] - theirs[key]) < 1e-4, (mine["step"], key, mine[key], theirs[key])

    # What a run reports: trl's metrics, and the job's generation rate and throughput.
    last = ours[-1]
    for key in ("rewards/regex/mean", "reward_std", "kl", "entropy", "completions/mean_length"):
        assert key in last, sorted(last)
    assert last["generation_tokens_per_second"] > 0 and last["tokens_per_second"] > 0
    rewards = [m["reward"] for m in ours]
    first, second = sum(rewards[: STEPS // 2]) / (STEPS // 2), sum(rewards[STEPS // 2 :]) / (STEPS // 2)
    assert second > first + 0.15, rewards
    summary = result.summary()
    assert (summary["trainer"], summary["steps"]) == ("GRPOTrainer", STEPS)
    assert summary["reward_mean_second_half"] > summary["reward_mean_first_half"]
    assert summary["generation_tokens_per_second"] > 0
    assert (summary["kl_last"], summary["entropy_last"]) == (last["kl"], last["entropy"])
    assert summary["completion_length_mean"] == pytest.approx(sum(m["completions/mean_length"] for m in ours) / STEPS)
    # The adapter is the policy's alone (not trl's frozen reference copy).
    adapter = result.workdir / "storage" / "local" / "grpo" / "output" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    rollouts = [json.loads(line) for line in (result.workdir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == list(range(1, STEPS + 1))
    assert all(len(r["prompts"]) == BATCH // GENERATIONS for r in rollouts)

    # finetune predict: greedy completions of held-out prompts, scored by the job's verifiable rewards.
    held_out = write_jsonl(tmp_path / "held-out.jsonl", tiny.prompt_completion_rows(12, seed=5))
    lines = tmp_path / "predictions.jsonl"
    argv = [FINETUNE, "predict", str(adapter.parent), "--input", str(held_out), "--predictions", str(lines)]
    done = subprocess.run(
        [*argv, "--max-new-tokens", str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    predictions = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(predictions) == 12 and predictions[0]["where"] == f"{held_out}:1"
    scores = [p["rewards"]["regex"] for p in predictions]
    assert all(s == float(p["prediction"].startswith(" is")) for s, p in zip(scores, predictions, strict=True))
    mean = sum(scores) / len(scores)
    assert mean > 0.5, predictions  # the trained policy starts its answers with " is"
    assert f"rewards/regex: {mean:.4f}" in done.stderr, done.stderr[-2000:]


def test_a_group_without_reward_spread_has_zero_advantage(
    tiny_model: Path, fruit_prompts: Path, finetune_run: Callable[..., RunResult]
) -> None:
    # No completion of the fruit model is a JSON object: every reward is 0, every group without spread.
    job = rl_manifest(
        "flat", tiny_model, fruit_prompts, {"klCoef": 0, "rewards": [{"type": "jsonValid"}]}, method={"type": "full"}
    )
    job["spec"]["training"]["maxSteps"] = 3
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    steps = [m for m in read_metrics(result.workdir) if "loss" in m and "reward" in m]
    assert len(steps) == 3
    for m in steps:
        assert m["frac_reward_zero_std"] == 1.0 and m["reward_std"] == 0.0, m
        assert m["loss"] == 0.0 and m["grad_norm"] == 0.0, m
        assert "kl" not in m  # klCoef 0: no reference policy


def build_reward_model(directory: Path, *, tokenizer: Any | None = None) -> Path:
    """A tiny LlamaForSequenceClassification with one output, saved like a model (with its tokenizer)."""
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = tokenizer or tiny.build_tokenizer()
    torch.manual_seed(3)
    config = tiny.llama_config(tokenizer, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_reward_job(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult], *, chat: bool = False
) -> Path:
    """A reward job's merged output, as an RL job names it (preferences: a fruit's true color over a
    wrong one; 8 steps)."""
    preferences = write_jsonl(tmp_path / "preferences.jsonl", tiny.preference_rows(64, chat=chat))
    reward_job = job_manifest(
        "rm",
        tiny_model,
        preferences,
        task={"type": "reward"},
        data__format="preference",
        training__maxSteps=8,
        output={"save": "merged"},
    )
    trained = finetune_run(reward_job)
    assert trained.returncode == 0, trained.output[-5000:]
    return trained.workdir / "storage" / "local" / "rm" / "output" / "merged"


def test_rloo_trains_on_chat_against_a_reward_model(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    reward_model = train_reward_job(tiny_model, tmp_path, finetune_run, chat=True)
    chats = write_jsonl(tmp_path / "chat.jsonl", tiny.chat_rows(48))
    rl = {
        "algorithm": "rloo",
        "rewardModel": str(reward_model),
        "rewards": [
            {"type": "contains", "weight": 0.5},
            {"type": "length", "minTokens": 1, "maxTokens": 4, "weight": 0.25},
            {"type": "exactMatch", "weight": 2.0},
        ],
    }
    held_out = write_jsonl(tmp_path / "chat-eval.jsonl", tiny.chat_rows(8, seed=9))
    # Full fine-tuning: trl loads the reference model (klCoef 0.04 by default) beside the policy.
    job = rl_manifest(
        "rloo", tiny_model, chats, rl, data__format="chat", data__eval={"uri": str(held_out)}, method={"type": "full"}
    )
    job["spec"]["training"]["maxSteps"] = 4
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    steps = [m for m in read_metrics(result.workdir) if "loss" in m and "reward" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        parts = (
            m["rewards/reward_model/mean"]
            + 0.5 * m["rewards/contains/mean"]
            + 0.25 * m["rewards/length/mean"]
            + 2.0 * m["rewards/exactMatch/mean"]
        )
        assert abs(m["reward"] - parts) < 1e-4, m  # the reward model weighs 1, each reward its weight
        assert m["kl"] >= 0 and m["entropy"] > 0
    assert len({round(m["rewards/reward_model/mean"], 6) for m in steps}) > 1  # the model scores each rollout
    summary = result.summary()
    assert summary["trainer"] == "RLOOTrainer"
    # The evaluations before and after training: the eval prompts' completions, scored.
    for when in ("before", "after"):
        assert {"eval_loss", "eval_reward", "eval_rewards/reward_model/mean"} <= set(summary[when]), summary[when]

    # A reward model whose tokenizer is another one is refused before training, naming the field.
    other = tiny.build_tokenizer()
    other.add_tokens(["<extra>"])
    stranger = build_reward_model(tmp_path / "stranger", tokenizer=other)
    job = rl_manifest("rloo-stranger", tiny_model, chats, {**rl, "rewardModel": str(stranger)}, data__format="chat")
    refused = finetune_run(job)
    assert refused.returncode == 2, refused.output[-3000:]
    assert "spec.task.rl.rewardModel" in refused.output and "another tokenizer" in refused.output


def test_two_ranks_zero2_killed_then_resumed_draw_every_prompt_once(
    tiny_model: Path, fruit_prompts: Path, tmp_path: Path
) -> None:
    steps = 8
    job = rl_manifest(
        "rl-zero2",
        tiny_model,
        fruit_prompts,
        {"numGenerations": 2, "rewards": [{"type": "regex", "pattern": PATTERN}]},
        distributed__deepspeed={"zeroStage": 2},
        checkpoint={"everySteps": 2, "keepLast": 2},
    )
    job["spec"]["training"].update(maxSteps=steps, perDeviceBatchSize=4)
    store = tmp_path / f"run-{job['metadata']['name']}" / "storage" / "local" / "rl-zero2"

    def committed() -> list[int]:
        return sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in store.glob("checkpoint-*/manifest.json"))

    run = live.start(tmp_path, job, "--nproc", "2")
    try:
        ranks = run.ranks(2)
        live.wait_for("a checkpoint and training past it", lambda: committed() and run.logged_step() >= 3, timeout=240)
        ranks[1].send_signal(signal.SIGKILL)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    assert code == 128 + signal.SIGKILL, f"exit {code}: the kill landed after training ended?\n{run.output[-4000:]}"
    killed_at = run.logged_step()
    assert killed_at < steps
    newest = committed()[-1]
    rollouts = run.workdir / "rollouts.jsonl"
    before = [json.loads(line) for line in rollouts.read_text().splitlines()]

    rerun = live.start(tmp_path, job, "--nproc", "2", tag="rerun")
    assert rerun.wait(timeout=300) == 0, rerun.output[-5000:]
    assert re.search(rf"resuming from \S+checkpoint-{newest} \(step {newest}", rerun.output), rerun.output[-3000:]
    summary = json.loads((run.workdir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from_step"] == newest
    after = [json.loads(line) for line in rollouts.read_text().splitlines()][len(before) :]
    assert [r["step"] for r in after] == list(range(newest + 1, steps + 1))
    # The steps redone after the kill drew the prompts the interrupted run had drawn for them.
    drawn = {r["step"]: r["prompts"] for r in before}
    for r in after:
        if r["step"] in drawn:
            assert r["prompts"] == drawn[r["step"]], r["step"]
    final = {
        **{r["step"]: r["prompts"] for r in before if r["step"] <= newest},
        **{r["step"]: r["prompts"] for r in after},
    }
    assert sorted(final) == list(range(1, steps + 1))
    prompts = [p for step in sorted(final) for p in final[step]]
    assert len(prompts) == steps * 2 * 4 // 2  # 2 ranks x 4 completions / 2 per group, a step
    assert len(set(prompts)) == len(prompts), "a prompt was drawn twice within the epoch"
