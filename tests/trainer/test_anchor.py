"""Correctness anchor: our LoRA SFT equals the textbook HF Trainer + peft recipe, step by step.

Same model, data, seed and hyperparameters, packing off and loss on all tokens: the per-step training
losses of `finetune run` and of a plain script (AutoModelForCausalLM + LoraConfig + Trainer +
DataCollatorForLanguageModeling) agree within 1e-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from runs import RunResult
from tiny import job_manifest, text_rows, write_jsonl
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

SEED, STEPS, LR, BATCH, MAX_LEN = 11, 20, 2e-3, 8, 64


def plain_hf_losses(model_dir: Path, train: Path, out: Path) -> list[float]:
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    dataset = [tokenizer(t + tokenizer.eos_token, truncation=True, max_length=MAX_LEN) for t in texts]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=STEPS,
        logging_steps=1,
        seed=SEED,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_lora_sft_matches_plain_hf_trainer(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    train = write_jsonl(tmp_path / "text.jsonl", text_rows(300, seed=4))
    manifest = job_manifest(
        "anchor",
        tiny_model,
        train,
        data={"train": {"uri": str(train)}, "format": "text", "maxSeqLength": MAX_LEN},
        training={
            "maxSteps": STEPS,
            "learningRate": LR,
            "scheduler": "constant",
            "perDeviceBatchSize": BATCH,
            "logEverySteps": 1,
            "seed": SEED,
        },
    )
    ours = finetune_run(manifest)
    assert ours.returncode == 0, ours.output[-5000:]
    reference = plain_hf_losses(tiny_model, train, tmp_path / "plain")
    assert len(ours.losses) == len(reference) == STEPS
    for step, (a, b) in enumerate(zip(ours.losses, reference, strict=True), start=1):
        assert abs(a - b) <= 1e-4, f"step {step}: ours {a:.6f} vs plain HF {b:.6f}"
