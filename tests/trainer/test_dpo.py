"""The DPO recipe (``spec.task.type: dpo``) against trl's DPOTrainer as a practitioner uses it.

- Anchor: `finetune run` and a plain trl script (AutoModelForCausalLM + LoraConfig + DPOConfig +
  DPOTrainer on the same records, seed, LoRA, learning rate and batch) log the same per-step losses
  (within 1e-4) for 20 steps, with the sigmoid and the IPO objective; the first step's loss is ln 2
  with zero margins (the policy is the reference) and it moves after.
- Every other ``lossType``: the recipe's trainer computes trl's loss of that name on the same batch
  (in process: a LoRA adapter initialised away from zero, so policy and reference differ), and the
  objectives differ from one another.
- QLoRA, IA3 and AdaLoRA (in process, the policy as the recipe builds it): no second adapter, the
  first loss ln 2 (plus AdaLoRA's orthogonality penalty, which peft computes and DPO's loss would drop).
- The reference: ``full`` trains against a frozen copy; precomputed log-probabilities give the same
  training and evaluations with no reference in memory; ``referenceModel`` is the model it names
  (another model with the same tokenizer: the first loss is no longer ln 2), refused with another
  vocabulary; ``eval_accuracy`` is the reward accuracy that early stopping watches.
- Two ranks under ZeRO-2: a rank killed with SIGKILL, the rerun resumes and ends as an
  uninterrupted run (losses within 1e-4), with the same trainable parameter count (one adapter).
"""

from __future__ import annotations

import json
import math
import shutil
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
from runs import RunResult

SEED, STEPS, LR, BATCH, MAX_LEN = 11, 20, 5e-3, 8, 64
LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}}


def dpo_job(
    name: str, model: Path, train: Path, *, dpo: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    overrides.setdefault("method", LORA)
    manifest = tiny.job_manifest(
        name,
        model,
        train,
        task={"type": "dpo", **({"dpo": dpo} if dpo else {})},
        training={
            "maxSteps": STEPS,
            "learningRate": LR,
            "scheduler": "constant",
            "perDeviceBatchSize": BATCH,
            "logEverySteps": 1,
            "seed": SEED,
        },
        **overrides,
    )
    manifest["spec"]["data"].update(format="preference", maxSeqLength=MAX_LEN)
    return manifest


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", tiny.preference_rows(240, seed=3))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("dpo") / "eval.jsonl", tiny.preference_rows(32, seed=4))


def plain_trl(model_dir: Path, train: Path, out: Path, *, loss_type: str, beta: float = 0.1) -> list[dict[str, Any]]:
    """A practitioner's script: trl's DPOTrainer on the records as they are, LoRA from a peft config."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    args = DPOConfig(
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
        gradient_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        max_length=MAX_LEN,
        beta=beta,
        loss_type=[loss_type],
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"
        ),
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_lora_dpo_matches_plain_trl(
    loss_type: str, tiny_model: Path, pairs: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    ours = finetune_run(dpo_job(f"anchor-{loss_type}", tiny_model, pairs, dpo={"lossType": loss_type}))
    assert ours.returncode == 0, ours.output[-5000:]
    reference = plain_trl(tiny_model, pairs, tmp_path / "plain", loss_type=loss_type)
    logged = [m for m in tiny.read_metrics(ours.workdir) if "loss" in m]
    assert len(logged) == len(reference) == STEPS
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(logged, reference, strict=True)]
    assert max(diffs) <= 1e-4, f"per-step |ours - trl|: {diffs}"
    for key in ("rewards/margins", "rewards/accuracies", "kl"):
        assert key in logged[-1], sorted(logged[-1])
    # Step 1: the adapter is zero, the policy is the reference.
    first = logged[0]
    step0 = math.log(2) if loss_type == "sigmoid" else (1 / (2 * 0.1)) ** 2
    assert abs(first["loss"] - step0) < 1e-6 and first["rewards/margins"] == 0.0 and first["kl"] == 0.0, first
    assert abs(logged[-1]["loss"] - step0) > 1e-2 and logged[-1]["rewards/margins"] > 0, logged[-1]
    summary = ours.summary()
    assert summary["reference"]["in_memory"] is False  # the adapter disabled, no copy
    print(f"anchor {loss_type}: max |ours - trl| {max(diffs):.2e}, step-1 loss {first['loss']:.6f}")


def test_every_loss_type_reaches_trl(tiny_model: Path, pairs: Path, tmp_path: Path) -> None:
    """The recipe's trainer and trl's own, both on a LoRA adapter initialised away from zero (the
    policy differs from the reference), compute the same loss of one batch for every lossType."""
    from datasets import Dataset
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec
    from finetune_trainer.data import preference
    from finetune_trainer.recipes import dpo
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:BATCH]
    spec = FineTuneJobSpec.model_validate(dpo_job("losses", tiny_model, pairs)["spec"])
    tokens = preference.tokenize(
        {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}, tokenizer, spec.data
    )
    ours_rows = Dataset.from_dict(tokens)
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    common = {"per_device_train_batch_size": BATCH, "seed": SEED, "report_to": "none", "use_cpu": True, "bf16": False}
    losses: dict[str, float] = {}
    for value, name in dpo.LOSS_TYPES.items():
        params: dict[str, Any] = {"lossType": value, "beta": 0.5}
        if value in ("robust", "exoPair"):
            params["labelSmoothing"] = 0.2
        task = FineTuneJobSpec.model_validate(dpo_job("losses", tiny_model, pairs, dpo=params)["spec"])
        task_args = dpo.task_arguments(task)
        assert task_args["loss_type"] == [name]

        set_seed(SEED)
        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), lora)
        collator = dpo.PreferenceCollator(tokenizer.pad_token_id, MAX_LEN)
        ours = dpo.DPORecipeTrainer(
            model=policy,
            args=DPOConfig(output_dir=str(tmp_path / "ours"), **common, **task_args),
            train_dataset=ours_rows,
            data_collator=collator,
            processing_class=tokenizer,
            report_accuracy=True,
        )
        assert list(ours.model.peft_config) == ["default"]  # no reference adapter
        assert (ours.loss_types, ours.beta, ours.label_smoothing) == ([name], 0.5, params.get("labelSmoothing", 0.0))
        theirs = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
            args=DPOConfig(output_dir=str(tmp_path / "trl"), **common, **{**task_args, "disable_dropout": True}),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
        assert ours.train_dataset[:] == theirs.train_dataset.select_columns(dpo.ROW_KEYS)[:]
        batch = collator(list(ours_rows))
        with torch.no_grad():
            mine = float(ours.compute_loss(ours.model, batch))
            trl_loss = float(theirs.compute_loss(theirs.model, batch))
        assert abs(mine - trl_loss) < 1e-5, (value, mine, trl_loss)
        losses[value] = mine
    assert len({round(v, 5) for v in losses.values()}) == len(losses), losses


#: The PEFT methods of the task row besides LoRA (the anchor's), as tests/trainer/test_methods.py runs them.
PEFT_METHODS: dict[str, dict[str, Any]] = {
    "qlora": {**tiny.QLORA},
    "ia3": {"method": {"type": "ia3"}},
    "adalora": {
        "method": {
            "type": "adalora",
            "lora": {"alpha": 16, "dropout": 0.0},
            "adalora": {"initR": 8, "targetR": 4, "tinit": 2, "tfinal": 2, "deltaT": 2},
        }
    },
}


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_peft_methods_train_against_their_disabled_adapter(
    method: str, tiny_model: Path, pairs: Path, tmp_path: Path
) -> None:
    """The policy as the recipe builds it (in process): no second adapter, the first loss is ln 2 (the
    reference is the policy with its adapter disabled) plus, for AdaLoRA, the orthogonality penalty
    peft computes, and it moves."""
    from datasets import Dataset
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec
    from finetune_trainer import methods, modeling
    from finetune_trainer.data import preference
    from finetune_trainer.recipes import dpo
    from transformers import set_seed
    from trl import DPOConfig

    steps = 8
    spec = FineTuneJobSpec.model_validate(dpo_job(method, tiny_model, pairs, **PEFT_METHODS[method])["spec"])
    source = modeling.ModelSource(str(tiny_model), None, None, True)
    tokenizer = modeling.load_tokenizer(source, spec.model)
    ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=steps)
    set_seed(SEED)
    model = modeling.load_causal_lm(
        source, spec.model, dtype=modeling.model_dtype(spec.model.dtype), **methods.load_kwargs(ctx)
    )
    tuned = methods.apply(model, ctx)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][: BATCH * steps]
    tokens = preference.tokenize(
        {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}, tokenizer, spec.data
    )
    collator = dpo.PreferenceCollator(tokenizer.pad_token_id, MAX_LEN)

    # AdaLoRA: peft's own penalty of the first batch, its forward's loss in training mode (with the
    # penalty) minus in eval mode (without: methods.adalora penalises training only; no dropout).
    first = collator([{k: tokens[k][i] for k in dpo.ROW_KEYS} for i in range(BATCH)])
    inputs = {"input_ids": first["input_ids"], "attention_mask": first["attention_mask"]}
    labels = first["input_ids"].masked_fill(first["completion_mask"] == 0, -100)
    with torch.no_grad():
        penalised = tuned.train()(**inputs, labels=labels).loss
        plain = tuned.eval()(**inputs, labels=labels).loss
    penalty = float(penalised - plain) if method == "adalora" else 0.0
    assert penalty > 1e-4 or method != "adalora", penalty

    args = {"per_device_train_batch_size": BATCH, "seed": SEED, "report_to": "none", "use_cpu": True, "bf16": False}
    trainer = dpo.DPORecipeTrainer(
        model=tuned,
        args=DPOConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=steps,
            logging_steps=1,
            learning_rate=3e-2 if method == "ia3" else LR,
            lr_scheduler_type="constant",
            save_strategy="no",
            disable_tqdm=True,
            **args,
            **dpo.task_arguments(spec),
        ),
        train_dataset=Dataset.from_dict(tokens),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=methods.callbacks(tuned, ctx),
        report_accuracy=True,
    )
    assert list(tuned.peft_config) == ["default"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert abs(losses[0] - (math.log(2) + penalty)) < 1e-5, (losses[0], penalty)
    assert max(abs(loss - losses[0]) for loss in losses[1:]) > 1e-3, losses  # the adapter trains


def test_full_dpo_reference_copy_or_precomputed(
    tiny_model: Path, pairs: Path, held_out: Path, finetune_run: Callable[..., RunResult]
) -> None:
    """Full fine-tuning trains against a frozen copy of the base; precomputed log-probabilities give
    the same run, its evaluations after training included (against the reference, not the trained
    policy), with no reference held. Early stopping watches eval_accuracy, the reward accuracy."""
    overrides: dict[str, Any] = {
        "method": {"type": "full"},
        "training__maxSteps": 6,
        "training__learningRate": 1e-3,
        "training__evaluation": {"everySteps": 3},
        "training__earlyStopping": {"metric": "accuracy", "patience": 5},
        "data__eval": {"uri": str(held_out)},
    }
    copy = finetune_run(dpo_job("full-copy", tiny_model, pairs, **overrides))
    assert copy.returncode == 0, copy.output[-5000:]
    pre = finetune_run(dpo_job("full-pre", tiny_model, pairs, dpo={"precomputeReferenceLogProbs": True}, **overrides))
    assert pre.returncode == 0, pre.output[-5000:]
    a, b = copy.summary(), pre.summary()
    assert a["reference"]["in_memory"] is True and b["reference"]["in_memory"] is False
    assert max(abs(x - y) for x, y in zip(copy.losses, pre.losses, strict=True)) < 1e-5, (copy.losses, pre.losses)
    assert abs(a["before"]["eval_loss"] - math.log(2)) < 1e-6 and a["before"]["eval_rewards/margins"] == 0.0
    for key in ("eval_loss", "eval_accuracy", "eval_rewards/margins", "eval_kl"):
        assert abs(a["after"][key] - b["after"][key]) < 1e-5, (key, a["after"], b["after"])
    assert a["after"]["eval_accuracy"] == a["after"]["eval_rewards/accuracies"] > 0.5, a["after"]
    assert a["after"]["eval_kl"] != 0.0
    evaluations = [m for m in tiny.read_metrics(copy.workdir) if "eval_accuracy" in m]
    assert [m["step"] for m in evaluations] == [0, 3, 6, 6]
    assert a["best_checkpoint"] is not None

    # finetune predict: each record's response generated after its prompt, as a practitioner would.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = copy.workdir / "storage" / "local" / "full-copy" / "output"
    records = tiny.preference_rows(3, seed=9)
    questions = tiny.write_jsonl(copy.workdir / "questions.jsonl", records)
    finetune = str(Path(sys.executable).with_name("finetune"))
    done = subprocess.run(
        [finetune, "predict", str(output), "--input", str(questions), "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    predictions = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [p["reference"] for p in predictions] == [r["chosen"] for r in records]
    model = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output / "merged")
    for record, prediction in zip(records, predictions, strict=True):
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True) == prediction["prediction"]


def test_reference_model_is_the_one_named(
    tiny_model: Path, pairs: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    other = tiny.build_tiny_model(tmp_path / "other-model", seed=1)  # same tokenizer, other weights
    short = {"training__maxSteps": 3}
    named = finetune_run(dpo_job("named", tiny_model, pairs, dpo={"referenceModel": str(other)}, **short))
    assert named.returncode == 0, named.output[-5000:]
    assert abs(named.losses[0] - math.log(2)) > 1e-3, named.losses  # the reference is not the policy
    pre = finetune_run(
        dpo_job(
            "named-pre",
            tiny_model,
            pairs,
            dpo={"referenceModel": str(other), "precomputeReferenceLogProbs": True},
            **short,
        )
    )
    assert pre.returncode == 0, pre.output[-5000:]
    assert max(abs(x - y) for x, y in zip(named.losses, pre.losses, strict=True)) < 1e-5
    assert named.summary()["reference"]["in_memory"] is True
    assert pre.summary()["reference"] == {
        "model": str(other),
        "precomputed": True,
        "in_memory": False,
        "dropped_pairs": {"train": 0, "eval": 0},
    }

    tokenizer = tiny.build_tokenizer()
    tokenizer.add_tokens(["kiwi"])
    foreign = tmp_path / "foreign-model"
    shutil.copytree(other, foreign)
    tokenizer.save_pretrained(foreign)
    refused = finetune_run(dpo_job("foreign", tiny_model, pairs, dpo={"referenceModel": str(foreign)}, **short))
    assert refused.returncode == 2, refused.output[-3000:]
    assert "spec.task.dpo.referenceModel" in refused.output and "another vocabulary" in refused.output


def test_zero2_kill_then_resume_exactly(tiny_model: Path, pairs: Path, tmp_path: Path) -> None:
    """Two ranks under ZeRO-2, one killed with SIGKILL past a checkpoint: the rerun resumes from it and
    retrains the steps the killed run had logged after it with the same losses (within 1e-4), with
    one adapter's trainable parameters (no reference adapter, nothing counted twice)."""
    from finetune_operator.api.v1alpha1 import LoRAParams
    from finetune_trainer.methods.lora import lora_config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    steps = 10
    overrides: dict[str, Any] = {
        "training__maxSteps": steps,
        "training__perDeviceBatchSize": 4,
        "distributed__deepspeed": {"zeroStage": 2},
        "checkpoint": {"everySteps": 4, "keepLast": 2},
    }
    job = dpo_job("dpo-zero2", tiny_model, pairs, **overrides)
    run = live.start(tmp_path, job, "--nproc", "2")
    try:
        ranks = run.ranks(2)
        live.wait_for("training two steps past the first checkpoint", lambda: run.logged_step() >= 6, timeout=240)
        ranks[1].send_signal(signal.SIGKILL)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    assert code == 128 + signal.SIGKILL, f"exit {code}: the kill landed after training ended?\n{run.output[-4000:]}"
    uninterrupted = live.losses_by_step(run.metrics())
    killed_at = max(uninterrupted)
    assert 6 <= killed_at < steps

    logged_before = len(run.metrics())
    rerun = live.start(tmp_path, job, "--nproc", "2", tag="rerun")
    assert rerun.wait(timeout=300) == 0, rerun.output[-5000:]
    resumed = live.losses_by_step(rerun.metrics()[logged_before:])
    start = min(resumed) - 1
    assert start in (4, 8) and start <= killed_at, (start, killed_at)
    assert sorted(resumed) == list(range(start + 1, steps + 1))
    overlap = [step for step in resumed if step in uninterrupted]
    assert overlap, (start, killed_at)
    diffs = {step: abs(resumed[step] - uninterrupted[step]) for step in overlap}
    assert max(diffs.values()) < 1e-4, diffs
    summary = json.loads((run.workdir / "summary.json").read_text())
    assert summary["resumed_from_step"] == start
    lora = LORA["lora"]
    params = LoRAParams.model_validate(lora)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(params, "CAUSAL_LM"))
    assert summary["trainable_parameters"] == plain.get_nb_trainable_parameters()[0]
    print(f"zero2 resume from {start}: max |resumed - uninterrupted| {max(diffs.values()):.2e} over {overlap}")
