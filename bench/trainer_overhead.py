"""Trainer overhead: our step time ÷ the textbook HF Trainer + peft step time, on the same run.

Both train the same LoRA on the same model (built here, a few million parameters), data, seed and
hyperparameters, each in its own process, alternating for ``--rounds`` rounds. Step time is the median
gap between consecutive step ends after ``--warmup`` steps. Goal: ratio ≤ 1.02 for each task.

Tasks (``--task``): ``causal-lm`` (continual pre-training on text: AutoModelForCausalLM +
DataCollatorForLanguageModeling) and ``classification`` (AutoModelForSequenceClassification with a
LoRA of task type SEQ_CLS + DataCollatorWithPadding, imbalanced labels as tests/trainer/tiny.py makes
them).

    .venv/bin/python bench/trainer_overhead.py [--task all|causal-lm|classification] [--steps 40] [--rounds 2]
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
from typing import Any

from _common import build_model, finetune_run, tiny

BATCH, LR, SEED, MAX_LEN = 8, 1e-3, 3, 256
TASKS = ("causal-lm", "classification")


def plain(task: str, model_dir: Path, train: Path, steps: int, out: Path) -> list[float]:
    """The textbook recipe; returns the wall time at the end of each step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    collator: Any
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(tiny.COLORS), pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
        )
        peft_task = "SEQ_CLS"
        dataset: list[Any] = [
            {**tokenizer(r["text"], truncation=True, max_length=MAX_LEN), "labels": tiny.COLORS.index(r["label"])}
            for r in rows
        ]
        collator = DataCollatorWithPadding(tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_task = "CAUSAL_LM"
        dataset = [tokenizer(r["text"] + tokenizer.eos_token, truncation=True, max_length=MAX_LEN) for r in rows]
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = get_peft_model(
        model, LoraConfig(task_type=peft_task, r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
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
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Stamp()], data_collator=collator).train()
    return stamps


def ours(task: str, model_dir: Path, train: Path, steps: int, workdir: Path) -> list[float]:
    if task == "classification":
        spec: dict[str, Any] = {
            "task": {
                "type": "classification",
                "classification": {"numLabels": len(tiny.COLORS), "labels": list(tiny.COLORS)},
            },
            "data": {"train": {"uri": str(train)}, "format": "classification", "maxSeqLength": MAX_LEN},
        }
    else:
        spec = {
            "data": {
                "train": {"uri": str(train)},
                "format": "text",
                "maxSeqLength": MAX_LEN,
            }
        }
    manifest = tiny.job_manifest(
        f"overhead-{task}",
        model_dir,
        train,
        method={"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}},
        training={
            "maxSteps": steps,
            "learningRate": LR,
            "scheduler": "constant",
            "perDeviceBatchSize": BATCH,
            "logEverySteps": 1,
            "seed": SEED,
        },
        **spec,
    )
    finetune_run(manifest, workdir)
    return [m["time"] for m in tiny.read_metrics(workdir) if "loss" in m]


def step_time(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]
    return statistics.median(gaps)


def data(task: str, root: Path) -> Path:
    if task == "classification":
        return tiny.write_jsonl(root / "classification.jsonl", tiny.classification_rows(2000, seed=1))
    return tiny.write_jsonl(root / "text.jsonl", tiny.text_rows(2000, seed=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plain-child", nargs=4, metavar=("TASK", "MODEL", "TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        task, *paths = args.plain_child
        model, train, out = map(Path, paths)
        print(json.dumps(plain(task, model, train, args.steps, out)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model_dir = build_model(root / "model")
    ratios = {}
    for task in TASKS if args.task == "all" else (args.task,):
        train = data(task, root)
        ours_times, plain_times = [], []
        for r in range(args.rounds):
            ours_stamps = ours(task, model_dir, train, args.steps, root / f"ours-{task}-{r}")
            ours_times.append(step_time(ours_stamps, args.warmup))
            out = root / f"plain-{task}-{r}"
            child = ["--steps", str(args.steps), "--plain-child", task, str(model_dir), str(train), str(out)]
            proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=True)
            plain_times.append(step_time(json.loads(proc.stdout.strip().splitlines()[-1]), args.warmup))
            print(
                f"{task} round {r + 1}: ours {ours_times[-1] * 1000:.1f} ms/step, "
                f"plain HF {plain_times[-1] * 1000:.1f} ms/step",
                flush=True,
            )
        ratios[task] = statistics.median(ours_times) / statistics.median(plain_times)
    for task, ratio in ratios.items():
        print(f"trainer overhead, {task}: ours / plain HF Trainer+peft step time = {ratio:.3f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
