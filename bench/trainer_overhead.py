"""Trainer overhead: our step time ÷ the textbook HF Trainer + peft step time, on the same run.

Both train the same LoRA on the same model (built here, a few million parameters), data, seed and
hyperparameters, each in its own process, alternating for ``--rounds`` rounds. Step time is the median
gap between consecutive step ends after ``--warmup`` steps. Goal: ratio ≤ 1.02.

    .venv/bin/python bench/trainer_overhead.py [--steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import build_model, finetune_run, tiny

BATCH, LR, SEED, MAX_LEN = 8, 1e-3, 3, 256


def plain(model_dir: Path, train: Path, steps: int, out: Path) -> list[float]:
    """The textbook recipe; returns the wall time at the end of each step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    dataset = [tokenizer(t + tokenizer.eos_token, truncation=True, max_length=MAX_LEN) for t in texts]
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            stamps.append(time.time())

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        seed=SEED,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[Stamp()],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    ).train()
    return stamps


def ours(model_dir: Path, train: Path, steps: int, workdir: Path) -> list[float]:
    manifest = tiny.job_manifest(
        "overhead",
        model_dir,
        train,
        method={"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}},
        data={"train": {"uri": str(train)}, "format": "text", "maxSeqLength": MAX_LEN, "completionOnlyLoss": False},
        training={
            "maxSteps": steps,
            "learningRate": LR,
            "scheduler": "constant",
            "perDeviceBatchSize": BATCH,
            "logEverySteps": 1,
            "seed": SEED,
        },
    )
    finetune_run(manifest, workdir)
    return [m["time"] for m in tiny.read_metrics(workdir) if "loss" in m]


def step_time(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plain-child", nargs=3, metavar=("MODEL", "TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        model, train, out = map(Path, args.plain_child)
        print(json.dumps(plain(model, train, args.steps, out)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model_dir = build_model(root / "model")
    train = tiny.write_jsonl(root / "train.jsonl", tiny.text_rows(2000, seed=1))
    ours_times, plain_times = [], []
    for r in range(args.rounds):
        ours_times.append(step_time(ours(model_dir, train, args.steps, root / f"ours-{r}"), args.warmup))
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--plain-child",
                str(model_dir),
                str(train),
                str(root / f"plain-{r}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        plain_times.append(step_time(json.loads(proc.stdout.strip().splitlines()[-1]), args.warmup))
        print(f"round {r + 1}: ours {ours_times[-1] * 1000:.1f} ms/step, plain HF {plain_times[-1] * 1000:.1f} ms/step")
    ratio = statistics.median(ours_times) / statistics.median(plain_times)
    print(f"trainer overhead: ours / plain HF Trainer+peft step time = {ratio:.3f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
