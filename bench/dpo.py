"""DPO step time: our recipe (``finetune run``, ``spec.task.type: dpo``) ÷ a plain trl DPOTrainer script's.

Both train the same LoRA (the reference: the policy with its adapter disabled) on the same model
(built here, a few million parameters), preference records (tests/trainer/tiny.py's fruit colors),
seed and hyperparameters, each in its own process, alternating for ``--rounds`` rounds. The plain
script is what a practitioner writes: AutoModelForCausalLM, a LoraConfig handed to DPOTrainer,
DPOConfig with the same batch, learning rate and ``max_length``, gradient checkpointing and bf16 off
as in the spec (CPU, fp32). Step time is the median gap between consecutive step ends after
``--warmup`` steps; the figures are the ratio of the medians and the median of each round's ratio
(its two runs back to back). Goal: ratio ≤ 1.02.

    .venv/bin/python bench/dpo.py [--steps 40] [--rounds 2] [--loss-type sigmoid]
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

BATCH, LR, SEED, MAX_LEN = 8, 1e-4, 3, 256


def plain(model_dir: Path, train: Path, steps: int, out: Path, loss_type: str) -> list[float]:
    """A practitioner's trl script; returns the wall time at the end of each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            stamps.append(time.time())

    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        seed=SEED,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        max_length=MAX_LEN,
        loss_type=[loss_type],
    )
    DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Stamp()],
        peft_config=LoraConfig(
            task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"
        ),
    ).train()
    return stamps


def ours(model_dir: Path, train: Path, steps: int, workdir: Path, loss_type: str) -> list[float]:
    manifest = tiny.job_manifest(
        "bench-dpo",
        model_dir,
        train,
        task={"type": "dpo", "dpo": {"lossType": loss_type}},
        method={"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}},
        data={"train": {"uri": str(train)}, "format": "preference", "maxSeqLength": MAX_LEN},
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
    parser.add_argument(
        "--loss-type", default="sigmoid", help="spec.task.dpo.lossType (trl's name for the plain script)"
    )
    parser.add_argument("--plain-child", nargs=4, metavar=("MODEL", "TRAIN", "OUT", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        model, train, out = map(Path, args.plain_child[:3])
        print(json.dumps(plain(model, train, args.steps, out, args.plain_child[3])))
        return
    from finetune_trainer.recipes.dpo import LOSS_TYPES

    root = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model_dir = build_model(root / "model")
    train = tiny.write_jsonl(root / "pairs.jsonl", tiny.preference_rows(2000, seed=1))
    ours_times: list[float] = []
    plain_times: list[float] = []
    for r in range(args.rounds):
        ours_times.append(
            step_time(ours(model_dir, train, args.steps, root / f"ours-{r}", args.loss_type), args.warmup)
        )
        child = ["--steps", str(args.steps), "--plain-child", str(model_dir), str(train), str(root / f"plain-{r}")]
        child.append(LOSS_TYPES[args.loss_type])
        proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=True)
        plain_times.append(step_time(json.loads(proc.stdout.strip().splitlines()[-1]), args.warmup))
        print(
            f"round {r + 1}: ours {ours_times[-1] * 1000:.1f} ms/step, plain trl {plain_times[-1] * 1000:.1f} ms/step",
            flush=True,
        )
    ratio = statistics.median(ours_times) / statistics.median(plain_times)
    # Each round's two runs are back to back: their ratio is the one a change in the machine's load
    # (other jobs on its cores) moves least.
    paired = statistics.median(o / p for o, p in zip(ours_times, plain_times, strict=True))
    print(
        f"dpo ({args.loss_type}): ours / plain trl DPOTrainer step time = {ratio:.3f} (medians), "
        f"{paired:.3f} (median of the rounds' ratios) (goal <= 1.02)"
    )


if __name__ == "__main__":
    main()
