"""The reward recipe (``task.type: reward``): pairwise preferences, a scalar head, trl's RewardTrainer.

- Correctness anchor: `finetune run`'s per-step training losses equal a plain trl script's
  (RewardTrainer given the model's path, the raw records, a LoraConfig) within 1e-4 for 20 steps,
  with ``centerRewardsCoefficient`` set: trl's loss with the centring term, which changes the loss.
- A base whose config has no pad token: the output, loaded as a user loads it
  (AutoModelForSequenceClassification), has the tokenizer's pad token in its config and scores a
  sequence the same alone or padded in a batch (the last real token, not padding); trained on two
  ranks under ZeRO-2, pairwise accuracy on held-out pairs rises from chance to near 1, the loaded
  model scores them as the run's last evaluation did (every eval pair counted once), and
  `finetune predict` with the adapter writes each pair's rewards and the same accuracy.
- Every method of the task row trains the ``score`` layer and saves it (adapter and merged model),
  in process through the recipe's trainer; sequences are cut to maxSeqLength, never dropped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from finetune_operator.api.validation import validate_object
from finetune_trainer import methods, modeling
from finetune_trainer.data import preference
from finetune_trainer.distributed import World
from finetune_trainer.outputs import load_adapter_for_inference, save_outputs
from finetune_trainer.recipes import reward
from finetune_trainer.training_args import training_arguments
from peft import LoraConfig
from runs import RunResult
from tiny import QLORA, job_manifest, preference_rows, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import RewardConfig, RewardTrainer

SEED, STEPS, LR, BATCH, MAX_LEN = 11, 20, 2e-3, 8, 64
CENTER = 0.1
FINETUNE = str(Path(sys.executable).with_name("finetune"))


def manifest(name: str, model: Path, train: Path, *, eval_file: Path | None = None, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"train": {"uri": str(train)}, "format": "preference", "maxSeqLength": MAX_LEN}
    if eval_file is not None:
        data["eval"] = {"uri": str(eval_file)}
    overrides.setdefault("task", {"type": "reward"})
    return job_manifest(name, model, train, data=data, **overrides)


# --------------------------------------------------------------------------------------------------
# Correctness anchor
# --------------------------------------------------------------------------------------------------


def plain_trl_losses(model_dir: Path, train: Path, out: Path, center: float | None) -> list[float]:
    """The script a practitioner writes: trl's RewardTrainer on the model's path and the raw preference
    records, with a LoRA config (SEQ_CLS: the score layer trained in full)."""
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    args = RewardConfig(
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
        center_rewards_coefficient=center,
    )
    trainer = RewardTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_lora_reward_matches_plain_trl_reward_trainer_with_centred_rewards(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    records = preference_rows(300, seed=4, chat=True)
    for i, record in enumerate(records):  # questions of three lengths: the batches are padded
        record["prompt"][1]["content"] = "tell me " * (i % 3) + record["prompt"][1]["content"]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    training = {
        "maxSteps": STEPS,
        "learningRate": LR,
        "scheduler": "constant",
        "perDeviceBatchSize": BATCH,
        "logEverySteps": 1,
        "seed": SEED,
    }
    task = {"type": "reward", "reward": {"centerRewardsCoefficient": CENTER}}
    ours = finetune_run(manifest("anchor", tiny_model, train, task=task, training=training))
    assert ours.returncode == 0, ours.output[-5000:]
    reference = plain_trl_losses(tiny_model, train, tmp_path / "plain", CENTER)
    assert len(ours.losses) == len(reference) == STEPS
    worst = max(abs(a - b) for a, b in zip(ours.losses, reference, strict=True))
    print(f"max |our loss - plain trl loss| over {STEPS} steps: {worst:.2e}")
    for step, (a, b) in enumerate(zip(ours.losses, reference, strict=True), start=1):
        assert abs(a - b) <= 1e-4, f"step {step}: ours {a:.6f} vs plain trl {b:.6f}"
    # The centring term is in the loss: without it trl's first loss (same weights, same batch) differs.
    uncentred = plain_trl_losses(tiny_model, train, tmp_path / "plain-uncentred", None)
    assert abs(uncentred[0] - reference[0]) > 1e-4, (uncentred[0], reference[0])


# --------------------------------------------------------------------------------------------------
# A base without a pad token: training, evaluation, the output as a user loads it, finetune predict
# --------------------------------------------------------------------------------------------------


def without_pad_token(model_dir: Path, directory: Path) -> Path:
    """The tiny model saved with no pad token in its config (its tokenizer has one, ``<pad>``)."""
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["pad_token_id"] = None
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def rewards(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.squeeze(-1)


def test_a_base_without_pad_token_learns_the_preferences_and_its_output_scores_chosen_above_rejected(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    base = without_pad_token(tiny_model, tmp_path / "no-pad")
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(300, seed=1))
    held_out = preference_rows(41, seed=2)  # not a multiple of the 2 ranks' batches
    eval_file = write_jsonl(tmp_path / "eval.jsonl", held_out)
    job = manifest(
        "rm",
        base,
        train,
        eval_file=eval_file,
        training={
            "maxSteps": STEPS,
            "learningRate": 3e-3,
            "scheduler": "constant",
            "perDeviceBatchSize": BATCH,
            "logEverySteps": 5,
            "seed": SEED,
            "evaluation": {"everySteps": 10},
            "earlyStopping": {"metric": "accuracy", "patience": 5},
        },
        output={"save": "both"},
        distributed={"procsPerNode": 2, "deepspeed": {"zeroStage": 2}},
    )
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert summary["world_size"] == 2
    before, after = summary["before"], summary["after"]
    print(
        f"eval_accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, "
        f"eval_margin {before['eval_margin']:.3f} -> {after['eval_margin']:.3f}"
    )
    assert before["eval_accuracy"] <= 0.75 and after["eval_accuracy"] >= 0.9, (before, after)
    assert after["eval_margin"] > before["eval_margin"] + 0.5
    assert after["eval_loss"] < before["eval_loss"]
    assert f"eval_accuracy: {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}" in result.output

    # The merged output as a user loads it: its config has the tokenizer's pad token.
    merged_dir = result.workdir / "storage" / "local" / "rm" / "output" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")
    chosen, rejected = (
        [r["prompt"] + r[side] + tokenizer.eos_token for r in held_out] for side in ("chosen", "rejected")
    )
    # Padded in a batch or alone, a sequence gets the same reward: the head reads its last real token.
    # The pairs are all 11 tokens long; a text of two of them in the batch pads each to 22.
    batched = rewards(model, tokenizer, [*chosen, *rejected, chosen[0] + chosen[1]])[:-1]
    alone = torch.stack([rewards(model, tokenizer, [t])[0] for t in chosen + rejected])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    good, bad = batched.chunk(2)
    accuracy = (good > bad).float().mean().item()
    assert accuracy == pytest.approx(after["eval_accuracy"], abs=1e-6)
    assert (good - bad).mean().item() == pytest.approx(after["eval_margin"], abs=1e-4)

    # finetune predict with the adapter on the base: each pair's two rewards, the same accuracy.
    lines = tmp_path / "predictions.jsonl"
    output_dir = merged_dir.parent
    done = subprocess.run(
        [
            FINETUNE,
            "predict",
            str(output_dir),
            "--input",
            str(eval_file),
            "--artifact",
            "adapter",
            "--predictions",
            str(lines),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    predictions = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(predictions) == len(held_out)
    assert predictions[0]["where"] == f"{eval_file}:1"
    scored = torch.tensor([[p["chosen_reward"], p["rejected_reward"]] for p in predictions])
    torch.testing.assert_close(scored, torch.stack([good, bad], dim=1), atol=1e-4, rtol=0)
    assert all(
        p["preferred"] == ("chosen" if p["chosen_reward"] > p["rejected_reward"] else "rejected") for p in predictions
    )
    assert f"accuracy: {after['eval_accuracy']:.4f}" in done.stderr, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# Every method; sequences cut, not dropped
# --------------------------------------------------------------------------------------------------

METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": {"type": "full"}},
    "lora": {},
    "qlora": QLORA,
    "ia3": {"method": {"type": "ia3"}},
    "adalora": {
        "method": {
            "type": "adalora",
            "lora": {"alpha": 16, "dropout": 0.0},
            "adalora": {"initR": 8, "targetR": 4, "tinit": 1, "tfinal": 1, "deltaT": 1},
        }
    },
}
#: Each fruit conversation is 34 tokens (a 27-token prompt, then "the <fruit> is <color>", <|im_end|>
#: and a newline): cut to 32, its two sequences still differ at their last token, the color; cut to
#: 31 they are the same.
CUT = 32


def _rewards(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_the_score_layer_and_saves_it_with_pairs_cut_not_dropped(
    method: str, tiny_model: Path, tmp_path: Path
) -> None:
    """In process, through the recipe's trainer (trl's RewardTrainer) for 3 steps: the score layer
    is trained and saved (adapter and merged model), every pair is kept whole in the dataset and cut to
    maxSeqLength in the batch."""
    records = preference_rows(16, chat=True)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    save = {} if method == "full" else {"output__save": "both"}
    job = manifest(method, tiny_model, train, **save, **METHODS[method])
    job["spec"]["data"]["maxSeqLength"] = CUT
    job["spec"]["training"].update(maxSteps=3, perDeviceBatchSize=8)
    spec = validate_object(job).spec
    source = modeling.resolve_source(spec.model, base_dir=None, cache_dir=tmp_path, world=World(0, 0, 1, 1))
    tokenizer = modeling.load_tokenizer(source, spec.model)
    tokens = preference.tokenize({c: [r[c] for r in records] for c in preference.COLUMNS}, tokenizer, spec.data)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*tokens.values(), strict=True)]
    assert set(lengths) == {CUT + 2}
    rows = datasets.Dataset.from_dict({**tokens, "length": lengths})
    assert reward.pairs_without_difference(rows, CUT) == 0
    assert reward.pairs_without_difference(rows, CUT - 1) == len(records)
    ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=3)

    def load(seed: int) -> Any:
        set_seed(seed)
        return modeling.load_reward_model(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            pad_token_id=tokenizer.pad_token_id,
            **methods.load_kwargs(ctx),
        )

    tuned = methods.apply(load(0), ctx)
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    head = [n for n in trainable if ".score." in f".{n}"]
    assert head, f"{method}: the score layer is not trained: {sorted(trainable)}"
    dtypes = {n: p.dtype for n, p in trainable.items()}
    before = {n: trainable[n].detach().clone() for n in head}
    args = training_arguments(
        spec,
        output_dir=tmp_path / "hf",
        base_dir=None,
        has_eval=False,
        args_class=RewardConfig,
        task_args=reward.task_arguments(spec),
    )
    collator = reward.PairCollator(tokenizer.pad_token_id, CUT)
    trainer = reward.PairwiseRewardTrainer(
        model=tuned,
        args=args,
        train_dataset=rows,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=methods.callbacks(tuned, ctx),
    )
    assert len(trainer.train_dataset) == len(records)  # trl dropped no pair
    assert {n: p.dtype for n, p in tuned.named_parameters() if p.requires_grad} == dtypes
    trainer.train()
    # Every pair it handed out (3 steps of 8; the data loader reads ahead) is two sequences of CUT tokens.
    assert collator.samples >= 3 * 8 and collator.tokens == collator.samples * 2 * CUT
    assert all(not torch.equal(before[n], trainable[n]) for n in head)

    batch = collator([rows[i] for i in range(8)])
    assert batch["input_ids"].shape == (16, CUT)
    assert batch["input_ids"][0].tolist() == (tokens["prompt_ids"][0] + tokens["chosen_ids"][0])[:CUT]
    trained = _rewards(tuned, batch)
    out_dir = tmp_path / "output"
    kinds = {a.kind for a in save_outputs(tuned, tokenizer, spec, staging=out_dir, destination=str(out_dir))}
    assert kinds == ({"model"} if method == "full" else {"adapter", "merged"})
    if method != "full":
        adapter = load_adapter_for_inference(load(1), out_dir / "adapter")
        torch.testing.assert_close(_rewards(adapter, batch), trained, atol=5e-2 if method == "qlora" else 1e-5, rtol=0)
    merged = AutoModelForSequenceClassification.from_pretrained(out_dir / "merged", dtype=torch.float32)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    if method == "qlora":  # merged on the dequantized base: close, not bit-identical to the 4-bit model
        torch.testing.assert_close(_rewards(merged, batch), trained, atol=5e-2, rtol=0)
    else:
        torch.testing.assert_close(_rewards(merged, batch), trained, atol=1e-4, rtol=0)
