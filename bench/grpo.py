"""GRPO generation tokens/s: our recipe (``finetune run``, ``spec.task.type: rl``, ``algorithm: grpo``) ÷ a
plain trl GRPOTrainer script's.

Both train the same LoRA (r 16, alpha 32, all-linear; the KL reference: trl's frozen copy of the
starting adapter) on the same model (built here, a few million parameters, as bench/dpo.py's), prompts
(tests/trainer/tiny.py's fruit questions), seed, batch (completions per step), numGenerations,
maxNewTokens, temperature and klCoef (trl's ``beta``), with the reward ``^ is`` (our ``regex``
reward; the plain script's function), each in its own process, alternating for ``--rounds`` rounds.
The plain script is tests/trainer/test_rl.py's ``plain_trl_grpo``: AutoModelForCausalLM wrapped by
get_peft_model, a prompt dataset, GRPOConfig and GRPOTrainer, CPU and fp32.

What is compared: completion tokens generated over the time spent generating them, in training
steps after ``--warmup``. trl 1.16 logs no generation rate (its ``profiling_context`` timings go to
wandb/mlflow only), so the plain script times ``GRPOTrainer._generate`` (tokenizing the prompts,
``model.generate``, cutting each completion at its EOS, decoding) in a subclass and counts the
completion tokens it returns: exactly the span and the count our recipe's ``Rollouts._generate``
(finetune_trainer/recipes/rl.py) measures and logs as ``generation_tokens_per_second``, one value a
step here (one generation a step, a log line a step, one rank). Our step's tokens are its
``completions/mean_length`` x batch. A run's rate is the median of its steps' rates (a step's tokens
over its seconds: the median, as bench/dpo.py's step time, so that a step slowed by another job on
the box's cores does not move it); a round's ratio is its two runs' (back to back); the figures are
the median of the rounds' ratios and the overall ratio (the median rate of every round's steps, each
side). Both sides draw the same samples (same seed, same random numbers in the same order: the
correctness test compares their completion lengths), so the token counts printed should be equal.
Goal: ratio >= 0.98.

    .venv/bin/python bench/grpo.py [--steps 30] [--warmup 3] [--rounds 3] [--max-new-tokens 32]
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

BATCH, GENERATIONS, LR, SEED, KL, TEMPERATURE = 8, 4, 3e-3, 7, 0.1, 0.9
LORA_R, LORA_ALPHA = 16, 32

#: (completion tokens, seconds) of one training step's generation.
Sample = tuple[int, float]


def plain(model_dir: Path, train: Path, steps: int, new_tokens: int, out: Path) -> list[Sample]:
    """A practitioner's trl GRPO script; returns each training generation's tokens and seconds."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear"
        ),
    )
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})
    samples: list[Sample] = []

    def starts_with_is(completions: list[str], **_: Any) -> list[float]:
        return [1.0 if c.startswith(" is") else 0.0 for c in completions]

    class Timed(GRPOTrainer):
        def _generate(self, prompts: list[Any]) -> Any:
            started = time.perf_counter()
            output = super()._generate(prompts)
            elapsed = time.perf_counter() - started
            if self.model.training:
                samples.append((sum(len(ids) for ids in output[1]), elapsed))
            return output

    args = GRPOConfig(
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
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        num_generations=GENERATIONS,
        max_completion_length=new_tokens,
        beta=KL,
        temperature=TEMPERATURE,
    )
    trainer = Timed(
        model=model, reward_funcs=starts_with_is, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return samples


def ours(model_dir: Path, train: Path, steps: int, new_tokens: int, workdir: Path) -> list[Sample]:
    rl = {
        "algorithm": "grpo",
        "numGenerations": GENERATIONS,
        "maxNewTokens": new_tokens,
        "temperature": TEMPERATURE,
        "klCoef": KL,
        "rewards": [{"type": "regex", "pattern": "^ is"}],
    }
    manifest = tiny.job_manifest(
        "bench-grpo",
        model_dir,
        train,
        task={"type": "rl", "rl": rl},
        method={
            "type": "lora",
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "targetModules": ["all-linear"]},
        },
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
    samples: list[Sample] = []
    for m in tiny.read_metrics(workdir):
        if "loss" in m and m.get("generation_tokens_per_second"):
            tokens = round(m["completions/mean_length"] * BATCH)
            samples.append((tokens, tokens / m["generation_tokens_per_second"]))
    if len(samples) != steps:
        raise SystemExit(f"{workdir}: {len(samples)} logged generations, expected {steps} (one a step)")
    return samples


def rates(samples: list[Sample]) -> list[float]:
    return [tokens / seconds for tokens, seconds in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="first steps' generations left out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="spec.task.rl.maxNewTokens")
    parser.add_argument("--plain-child", nargs=3, metavar=("MODEL", "TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    if args.plain_child:
        model, train, out = map(Path, args.plain_child)
        print(json.dumps(plain(model, train, args.steps, args.max_new_tokens, out)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model_dir = build_model(root / "model")
    train = tiny.write_jsonl(root / "prompts.jsonl", tiny.prompt_completion_rows(256, seed=1))
    ours_steps: list[list[Sample]] = []
    plain_steps: list[list[Sample]] = []
    for r in range(args.rounds):
        ours_steps.append(ours(model_dir, train, args.steps, args.max_new_tokens, root / f"ours-{r}")[args.warmup :])
        child = ["--steps", str(args.steps), "--max-new-tokens", str(args.max_new_tokens)]
        child += ["--plain-child", str(model_dir), str(train), str(root / f"plain-{r}")]
        proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the plain trl script failed:\n{proc.stderr[-4000:]}")
        theirs = [(int(t), float(s)) for t, s in json.loads(proc.stdout.strip().splitlines()[-1])]
        if len(theirs) != args.steps:
            raise SystemExit(f"the plain trl script generated {len(theirs)} times, expected {args.steps}")
        plain_steps.append(theirs[args.warmup :])
        mine, other = statistics.median(rates(ours_steps[-1])), statistics.median(rates(plain_steps[-1]))
        print(
            f"round {r + 1}: ours {mine:.1f} tok/s, plain trl {other:.1f} tok/s, ratio {mine / other:.3f} "
            f"(completion tokens: ours {sum(t for t, _ in ours_steps[-1])}, "
            f"plain {sum(t for t, _ in plain_steps[-1])})",
            flush=True,
        )
    # Each round's two runs are back to back: their ratio is the one a change in the machine's load
    # (other jobs on its cores) moves least.
    paired = statistics.median(
        statistics.median(rates(o)) / statistics.median(rates(p)) for o, p in zip(ours_steps, plain_steps, strict=True)
    )
    ours_rate = statistics.median(rate for run in ours_steps for rate in rates(run))
    plain_rate = statistics.median(rate for run in plain_steps for rate in rates(run))
    print(
        f"grpo (maxNewTokens {args.max_new_tokens}, batch {BATCH}, numGenerations {GENERATIONS}): "
        f"ours / plain trl GRPOTrainer generation tokens/s = {paired:.3f} (median of the rounds' ratios), "
        f"{ours_rate / plain_rate:.3f} (overall: {ours_rate:.1f} / {plain_rate:.1f} tok/s, every round's steps) "
        "(goal >= 0.98)"
    )


if __name__ == "__main__":
    main()
