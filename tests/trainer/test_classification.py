"""Sequence classification (recipes/classification.py) on the tiny Llama, CPU.

- Correctness anchor: our per-step training losses equal a plain AutoModelForSequenceClassification +
  peft LoRA + Trainer script (same seed, data, hyperparameters) within 1e-4 for 20 steps, unweighted
  and with classWeights (the plain script with a weighted CrossEntropyLoss).
- Resampling: an epoch holds the expected class counts; a run killed with SIGKILL and rerun trains
  on exactly the batches an uninterrupted run trains on (the test hook logs every training batch).
- Every method trains the classification layer and saves it in every artifact it writes; headOnly
  trains exactly the layer's parameters; a saved output reproduces the run's final eval metrics
  through `finetune predict`.
- Two ranks under torchrun (DDP, multi-label) and DeepSpeed ZeRO-2 (undersampling, class weights).
- Bad records exit 3 with `file:line: reason`, before the model is opened.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import live
import numpy as np
import pytest
import torch
from finetune_operator.api.validation import validate_object
from finetune_trainer import methods, modeling
from finetune_trainer.data.sampling import ClassBalancedSampler
from finetune_trainer.outputs import load_adapter_for_inference, save_outputs
from finetune_trainer.recipes.classification import BATCH_LOG
from finetune_trainer.scoring.classification import score_multi_label, score_single_label
from peft import LoraConfig, get_peft_model
from runs import RunResult
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight
from tiny import COLORS, QLORA, classification_rows, job_manifest, read_metrics, write_jsonl
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

SEED, STEPS, LR, BATCH, MAX_LEN = 11, 20, 2e-3, 8, 32
FINETUNE = str(Path(sys.executable).with_name("finetune"))
WEIGHTS = [1.0, 2.0, 0.5, 1.5, 3.0]
HIDDEN = 64  # tiny.llama_config's hidden size: the score layer is HIDDEN x numLabels, no bias


def classification(**params: Any) -> dict[str, Any]:
    return {"type": "classification", "classification": {"numLabels": len(COLORS), "labels": COLORS, **params}}


def manifest(name: str, model: Path, train: Path, *, eval_file: Path | None = None, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"train": {"uri": str(train)}, "format": "classification", "maxSeqLength": MAX_LEN}
    if eval_file is not None:
        data["eval"] = {"uri": str(eval_file)}
    overrides.setdefault("task", classification())
    return job_manifest(name, model, train, data=data, **overrides)


# --------------------------------------------------------------------------------------------------
# Correctness anchor
# --------------------------------------------------------------------------------------------------


def plain_hf_losses(model_dir: Path, train: Path, out: Path, weights: list[float] | None) -> list[float]:
    """The textbook script: AutoModelForSequenceClassification + LoRA (SEQ_CLS) + Trainer, with a
    weighted CrossEntropyLoss in compute_loss when ``weights`` is given."""
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(COLORS), pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
    )
    model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    dataset = [
        {**tokenizer(r["text"], truncation=True, max_length=MAX_LEN), "labels": COLORS.index(r["label"])} for r in rows
    ]

    class WeightedLossTrainer(Trainer):
        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

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
    trainer = (Trainer if weights is None else WeightedLossTrainer)(
        model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_lora_classification_matches_plain_hf_trainer_unweighted_and_weighted(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", classification_rows(300, seed=4))
    training = {
        "maxSteps": STEPS,
        "learningRate": LR,
        "scheduler": "constant",
        "perDeviceBatchSize": BATCH,
        "logEverySteps": 1,
        "seed": SEED,
    }
    # balanceClassWeights: scikit-learn's "balanced" weights, N / (K * n_c), computed here independently.
    labels = [COLORS.index(r["label"]) for r in classification_rows(300, seed=4)]
    balanced = compute_class_weight("balanced", classes=np.arange(len(COLORS)), y=labels).tolist()
    references = {}
    runs: list[tuple[str, dict[str, Any], list[float] | None]] = [
        ("anchor", {}, None),
        ("anchor-weighted", {"classWeights": WEIGHTS}, WEIGHTS),
        ("anchor-balanced", {"balanceClassWeights": True}, balanced),
    ]
    for name, params, weights in runs:
        task = classification(**params)
        ours = finetune_run(manifest(name, tiny_model, train, task=task, training=training))
        assert ours.returncode == 0, ours.output[-5000:]
        reference = plain_hf_losses(tiny_model, train, tmp_path / f"plain-{name}", weights)
        assert len(ours.losses) == len(reference) == STEPS
        worst = max(abs(a - b) for a, b in zip(ours.losses, reference, strict=True))
        print(f"{name}: max |our loss - plain HF loss| over {STEPS} steps: {worst:.2e}")
        for step, (a, b) in enumerate(zip(ours.losses, reference, strict=True), start=1):
            assert abs(a - b) <= 1e-4, f"{name} step {step}: ours {a:.6f} vs plain HF {b:.6f}"
        references[name] = reference
    # The weights change the loss from the first step on.
    assert abs(references["anchor"][0] - references["anchor-weighted"][0]) > 1e-3
    assert abs(references["anchor"][0] - references["anchor-balanced"][0]) > 1e-3


# --------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------


def test_a_resampled_epoch_balances_the_classes_and_depends_only_on_seed_and_epoch() -> None:
    classes = [0] * 6 + [1] * 3 + [2] * 1  # class 3 has no example
    over = ClassBalancedSampler(classes, "oversample", seed=5)
    assert len(over) == 18
    for epoch in range(3):
        picked = over.epoch_indices(epoch)
        assert collections.Counter(classes[i] for i in picked) == {0: 6, 1: 6, 2: 6}
        # Shuffled passes over each class: every example of class 1 twice, the one of class 2 six times.
        assert collections.Counter(picked) == {**dict.fromkeys(range(6), 1), 6: 2, 7: 2, 8: 2, 9: 6}
    under = ClassBalancedSampler(classes, "undersample", seed=5)
    assert len(under) == 3
    subsets = {tuple(sorted(under.epoch_indices(e))) for e in range(20)}
    assert all(collections.Counter(classes[i] for i in s) == {0: 1, 1: 1, 2: 1} for s in subsets)
    assert len(subsets) > 1, "undersampling draws a fresh subset each epoch"
    # What an epoch yields depends on the seed and the epoch only (not on the epochs drawn before).
    fresh = ClassBalancedSampler(classes, "oversample", seed=5)
    fresh.set_epoch(2)
    assert list(fresh) == over.epoch_indices(2) != over.epoch_indices(1)
    assert ClassBalancedSampler(classes, "oversample", seed=6).epoch_indices(2) != over.epoch_indices(2)


def _batches(path: Path) -> dict[int, tuple[list[int], list[list[int]]]]:
    """Step -> (targets, token rows) of the last logged batch of each step (a rerun logs again)."""
    out: dict[int, tuple[list[int], list[list[int]]]] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        out[entry["step"]] = (entry["labels"], entry["rows"])
    return out


def _rows_with_counts(counts: dict[str, int]) -> list[dict[str, Any]]:
    """classification_rows picked to hold exactly ``counts`` examples of each color, in their order."""
    picked, left = [], dict(counts)
    for row in classification_rows(1000, seed=3):
        if left.get(row["label"], 0) > 0:
            left[row["label"]] -= 1
            picked.append(row)
    assert not any(left.values())
    return picked


def test_oversampling_counts_and_a_killed_run_resumes_on_exactly_the_same_batches(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    """Two ranks: an oversampled epoch of 5 x 16 examples is 5 steps of two batches of 8 (rank 0 the
    even batches, rank 1 the odd ones). The victim is killed after a checkpoint in its second epoch
    (every 3 steps: 6, 9, ... are all mid-epoch but 15, 30) and resumes from it."""
    steps, steps_per_epoch = 30, 5
    counts = {"red": 8, "yellow": 4, "purple": 2, "orange": 16, "green": 3}
    rows = _rows_with_counts(counts)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    classes = [COLORS.index(r["label"]) for r in rows]

    def job(name: str) -> dict[str, Any]:
        return manifest(
            name,
            tiny_model,
            train,
            task=classification(resampling="oversample"),
            training__maxSteps=steps,
            checkpoint={"everySteps": 3, "keepLast": 2},
        )

    reference = finetune_run(job("resample-reference"), "--nproc", "2", env={BATCH_LOG: str(tmp_path / "reference")})
    assert reference.returncode == 0, reference.output[-5000:]
    uninterrupted = [_batches(tmp_path / f"reference.rank{r}") for r in (0, 1)]
    assert all(sorted(log) == list(range(1, steps + 1)) for log in uninterrupted)
    # The first epoch, as the sampler builds it and as the ranks trained it: every class 16 times.
    epoch = ClassBalancedSampler(classes, "oversample", seed=7).epoch_indices(0)
    assert len(epoch) == 2 * BATCH * steps_per_epoch
    for step in range(1, steps_per_epoch + 1):
        for rank in (0, 1):
            first = (2 * (step - 1) + rank) * BATCH
            assert uninterrupted[rank][step][0] == [classes[i] for i in epoch[first : first + BATCH]], (step, rank)
    trained = [c for log in uninterrupted for step in range(1, steps_per_epoch + 1) for c in log[step][0]]
    assert collections.Counter(COLORS[c] for c in trained) == dict.fromkeys(counts, 16)

    victim = job("resample-victim")
    store = tmp_path / "run-resample-victim" / "storage" / "local" / "resample-victim"

    def committed() -> list[int]:
        return sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in store.glob("checkpoint-*/manifest.json"))

    log = tmp_path / "victim"
    run = live.start(tmp_path, victim, "--nproc", "2", env={BATCH_LOG: str(log)})
    try:
        ranks = run.ranks(2)
        live.wait_for("a checkpoint in the second epoch", lambda: [s for s in committed() if s > steps_per_epoch], 180)
        ranks[1].send_signal(signal.SIGKILL)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    assert code == 128 + signal.SIGKILL, f"exit {code}: the kill landed after training ended?\n{run.output[-3000:]}"
    newest = committed()[-1]
    assert steps_per_epoch < newest < steps and newest % steps_per_epoch, newest

    logged_before = len(run.metrics())
    rerun = live.start(tmp_path, victim, "--nproc", "2", env={BATCH_LOG: str(log)}, tag="rerun")
    assert rerun.wait(timeout=300) == 0, rerun.output[-5000:]
    assert f"checkpoint-{newest} (step {newest}" in rerun.output, rerun.output[-3000:]
    # Before the kill the victim trained the reference's batches; after the resume (mid-epoch, past the
    # first epoch) the rerun trains on exactly the reference's batches again, rank by rank, step by step.
    for rank in (0, 1):
        resumed = _batches(tmp_path / f"victim.rank{rank}")
        assert sorted(resumed) == list(range(1, steps + 1)), (rank, newest)
        for step in range(1, steps + 1):
            assert resumed[step] == uninterrupted[rank][step], f"rank {rank} step {step} (resumed from {newest})"
    losses = live.losses_by_step(rerun.metrics()[logged_before:])
    assert sorted(losses) == list(range(newest + 1, steps + 1))
    expected = live.losses_by_step(read_metrics(reference.workdir))
    for step, loss in losses.items():
        assert abs(loss - expected[step]) < 1e-4, f"step {step}: resumed loss {loss} != uninterrupted {expected[step]}"


# --------------------------------------------------------------------------------------------------
# Methods: the classification layer is trained and saved
# --------------------------------------------------------------------------------------------------

METHODS: dict[str, dict[str, Any]] = {
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
    "freeze-head-only": {"method": {"type": "full", "freeze": {"headOnly": True}}},
}


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_the_classification_layer_and_saves_it(
    method: str, tiny_model: Path, tmp_path: Path
) -> None:
    """In process: the method applied to the recipe's model, a few optimizer steps, the outputs
    written as a run writes them, and each artifact loaded back computes the trained model's logits."""
    train = write_jsonl(tmp_path / "train.jsonl", classification_rows(8))
    save = {} if method == "freeze-head-only" else {"output__save": "both"}
    job = manifest(method, tiny_model, train, **save, **METHODS[method])
    spec = validate_object(job).spec
    source = modeling.resolve_source(spec.model, base_dir=None, cache_dir=tmp_path, world=_one_rank())
    tokenizer = modeling.load_tokenizer(source, spec.model)
    ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=10)

    def load(seed: int) -> Any:
        set_seed(seed)
        return modeling.load_sequence_classification(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            class_names=COLORS,
            multi_label=False,
            pad_token_id=tokenizer.pad_token_id,
            **methods.load_kwargs(ctx),
        )

    tuned = methods.apply(load(0), ctx)
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".score." in f".{n}"}
    assert head, f"{method}: the score layer is not trained: {sorted(trainable)}"
    if method == "freeze-head-only":
        # headOnly trains exactly the classification layer: HIDDEN x numLabels weights, nothing else.
        assert set(trainable) == {"score.weight"}
        assert sum(p.numel() for p in trainable.values()) == HIDDEN * len(COLORS)
    texts = [r["text"] for r in classification_rows(8)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = torch.tensor([COLORS.index(r["label"]) for r in classification_rows(8)])
    scores_before = {n: p.detach().clone() for n, p in trainable.items() if n in head}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    tuned.train()
    for _ in range(3):
        out = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.nn.functional.cross_entropy(out.logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(scores_before[n], p) for n, p in trainable.items() if n in head)
    trained = _logits(tuned, batch)
    (trained_score,) = [p for n, p in tuned.named_parameters() if n in head]

    out_dir = tmp_path / "output"
    artifacts = {a.kind for a in save_outputs(tuned, tokenizer, spec, staging=out_dir, destination=str(out_dir))}
    merged_dir = out_dir / "merged"
    if method == "freeze-head-only":
        assert artifacts == {"model"}
    else:
        assert artifacts == {"adapter", "merged"}
        saved_score = load_file(out_dir / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"]
        torch.testing.assert_close(saved_score, trained_score.detach().to(saved_score.dtype), atol=0, rtol=0)
        # Another seed: the base's fresh score layer differs; the adapter's saved one replaces it. A
        # QLoRA base loaded for inference keeps its norms in 16 bits (training prepared them in fp32).
        adapter = load_adapter_for_inference(load(1), out_dir / "adapter")
        torch.testing.assert_close(_logits(adapter, batch), trained, atol=5e-2 if method == "qlora" else 1e-5, rtol=0)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32)
    assert merged.config.id2label == dict(enumerate(COLORS))
    torch.testing.assert_close(merged.score.weight, trained_score.detach().float(), atol=0, rtol=0)
    if method == "qlora":
        # Merged on the dequantized base: not bit-identical to the 4-bit model.
        assert (_logits(merged, batch).argmax(-1) == trained.argmax(-1)).float().mean() >= 0.75
    else:
        torch.testing.assert_close(_logits(merged, batch), trained, atol=1e-4, rtol=0)


def _one_rank() -> Any:
    from finetune_trainer.distributed import World

    return World(rank=0, local_rank=0, world_size=1, local_world_size=1)


def _predict_scores(
    output: Path, eval_file: Path, artifact: str, tmp_path: Path, *, multi_label: bool
) -> dict[str, float]:
    """`finetune predict` on the eval file: the scores it prints (4 decimals), checked against the
    scores of the predictions it writes, which are returned."""
    lines = tmp_path / f"predictions-{artifact}.jsonl"
    done = subprocess.run(
        [
            FINETUNE,
            "predict",
            str(output),
            "--input",
            str(eval_file),
            "--artifact",
            artifact,
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
    if multi_label:
        hot = [[[int(c in p[key]) for c in COLORS] for p in predictions] for key in ("reference", "prediction")]
        scores = score_multi_label(hot[0], hot[1], COLORS).metrics
    else:
        ids = [[COLORS.index(p[key]) for p in predictions] for key in ("reference", "prediction")]
        scores = score_single_label(ids[0], ids[1], COLORS).metrics
    printed = {
        name: value for name, _, value in (line.partition(": ") for line in done.stderr.splitlines()) if name in scores
    }
    # It prints what the job's evaluations report (training.evaluation.metrics).
    assert "f1" in printed and printed.keys() <= scores.keys(), done.stderr[-3000:]
    for name, value in printed.items():
        assert float(value) == pytest.approx(scores[name], abs=1e-4), name
    return scores


def test_head_only_trains_the_score_layer_stops_early_on_f1_and_its_output_reproduces_the_metrics(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", classification_rows(200, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", classification_rows(40, seed=2))
    job = manifest(
        "head-only",
        tiny_model,
        train,
        eval_file=eval_file,
        method={"type": "full", "freeze": {"headOnly": True}},
        training__learningRate=3e-2,
        # Evaluations report the loss and the F1 family, not accuracy (training.evaluation.metrics).
        training__evaluation={"everySteps": 5, "metrics": ["loss", "f1"]},
        training__earlyStopping={"metric": "f1", "mode": "max", "patience": 10},
    )
    result = finetune_run(job)
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert summary["trainable_parameters"] == HIDDEN * len(COLORS)
    after = summary["after"]
    assert after["eval_f1"] > summary["before"]["eval_f1"]
    # Early stopping watched eval_f1 and loaded the best model at the end.
    logged = [m["eval_f1"] for m in read_metrics(result.workdir) if "eval_f1" in m and m["step"]]
    assert summary["best_checkpoint"] and after["eval_f1"] == max(logged)
    matrix = after["eval_confusion_matrix"]
    assert len(matrix) == len(COLORS) and all(len(row) == len(COLORS) for row in matrix)
    truth = collections.Counter(r["label"] for r in classification_rows(40, seed=2))
    assert [sum(row) for row in matrix] == [truth[c] for c in COLORS]
    assert "eval_accuracy" not in after
    for name in COLORS:
        assert {f"eval_precision_{name}", f"eval_recall_{name}", f"eval_f1_{name}"} <= after.keys()

    # Only the score layer moved: every other weight of the saved model is the base model's.
    output = result.workdir / "storage" / "local" / "head-only" / "output"
    saved = AutoModelForSequenceClassification.from_pretrained(output / "merged", dtype=torch.float32)
    set_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(COLORS), dtype=torch.float32)
    changed = [n for n, p in saved.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed == ["score.weight"]

    scores = _predict_scores(output, eval_file, "merged", tmp_path, multi_label=False)
    for key in ("f1", "precision_macro", "recall_macro", *(f"recall_{c}" for c in COLORS)):
        assert scores[key] == pytest.approx(after[f"eval_{key}"], abs=1e-6), key
    assert scores["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(COLORS))) / 40)


# --------------------------------------------------------------------------------------------------
# Two ranks
# --------------------------------------------------------------------------------------------------

TWO_RANKS: dict[str, dict[str, Any]] = {
    # DDP, multi-label with balanced class weights; the adapter and the merged model are both saved.
    "ddp-multi-label": {
        "task": classification(multiLabel=True, balanceClassWeights=True),
        "output__save": "both",
    },
    # DeepSpeed ZeRO-2, single-label, undersampled, with class weights; evaluations report the loss
    # and accuracy only, and early stopping watches accuracy.
    "zero2-undersample": {
        "task": classification(resampling="undersample", classWeights=WEIGHTS),
        "distributed__deepspeed": {"zeroStage": 2},
        "training__evaluation": {"everySteps": 6, "metrics": ["loss", "accuracy"]},
        "training__earlyStopping": {"metric": "accuracy", "mode": "max", "patience": 5},
    },
}


@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_two_ranks_ddp_and_zero2(
    case: str, tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    multi = case == "ddp-multi-label"
    train = write_jsonl(tmp_path / "train.jsonl", classification_rows(120, seed=1, multi_label=multi))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", classification_rows(24, seed=2, multi_label=multi))
    job = manifest(case, tiny_model, train, eval_file=eval_file, training__maxSteps=12, **TWO_RANKS[case])
    result = finetune_run(job, "--nproc", "2", env={BATCH_LOG: str(tmp_path / "batches")})
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert summary["world_size"] == 2 and summary["steps"] == 12
    ranks = [_batches(tmp_path / f"batches.rank{r}") for r in (0, 1)]
    assert all(sorted(r) == list(range(1, 13)) for r in ranks)
    # Each rank trained its own part of every step's batches.
    assert all(ranks[0][s][1] != ranks[1][s][1] for s in range(1, 13))
    after = summary["after"]
    output = result.workdir / "storage" / "local" / case / "output"
    if multi:
        assert len(after["eval_confusion_matrices"]) == len(COLORS)
        assert {"eval_f1_micro", "eval_precision_micro", "eval_recall_micro"} <= after.keys()
        for artifact in ("adapter", "merged"):
            scores = _predict_scores(output, eval_file, artifact, tmp_path, multi_label=True)
            for key in ("accuracy", "f1", "f1_micro"):
                assert scores[key] == pytest.approx(after[f"eval_{key}"], abs=1e-6), (artifact, key)
    else:
        # Undersampling under DDP: the sampler's epoch, cut into batches dealt to the ranks in turn
        # (rank 0 the even batches, rank 1 the odd ones), each class as often as the smallest one.
        classes = [COLORS.index(r["label"]) for r in classification_rows(120, seed=1)]
        epoch = ClassBalancedSampler(classes, "undersample", seed=7).epoch_indices(0)
        smallest = min(collections.Counter(classes).values())
        assert collections.Counter(classes[i] for i in epoch) == dict.fromkeys(range(len(COLORS)), smallest)
        full_steps = len(epoch) // (2 * BATCH)
        assert full_steps >= 2
        for step in range(1, full_steps + 1):
            for rank in (0, 1):
                first = (2 * (step - 1) + rank) * BATCH
                assert ranks[rank][step][0] == [classes[i] for i in epoch[first : first + BATCH]], (step, rank)
        assert len(after["eval_confusion_matrix"]) == len(COLORS)
        assert "eval_accuracy" in after and not [k for k in after if k.startswith(("eval_f1", "eval_recall"))]
        # The best evaluation during training (step > 0; step 0 is before training) was loaded at the end.
        logged = [m["eval_accuracy"] for m in read_metrics(result.workdir) if "eval_accuracy" in m and m["step"]]
        assert summary["best_checkpoint"] and after["eval_accuracy"] == max(logged)


# --------------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------------


def test_bad_records_exit_3_with_file_and_line_before_the_model_is_opened(
    tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    # The label column is called "color" here (spec.data.columns.label).
    good = [{"text": r["text"], "color": r["label"]} for r in classification_rows(2)]
    rows: list[Any] = [
        good[0],
        {"text": "the apple is red", "label": "red"},  # 2: no "color"
        {"text": "the lemon", "color": "blue"},  # 3: not one of the labels
        {"text": "the plum", "color": 5},  # 4: id >= numLabels
        {"text": "the pear", "color": -1},  # 5: negative id
        {"text": "the pear", "color": ["green", "red"]},  # 6: a list without multiLabel
        {"text": "", "color": "red"},  # 7: empty text
        {"text": "the grape", "color": 1.5},  # 8: not an integer
        good[1],
        {"text": "the grape", "color": "2"},  # 10: an id as text (CSV style) is fine
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    # The model directory does not exist: had the run opened it before checking the data, it would
    # have failed on the model (exit 2), not on the records.
    job = manifest("bad-records", tmp_path / "no-model-here", train)
    job["spec"]["data"]["columns"] = {"label": "color"}
    result = finetune_run(job)
    assert result.returncode == 3, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    expected = [
        f"{train}:2: missing column 'color'",
        f"{train}:3: label 'blue' is not one of spec.task.classification.labels ('red', 'yellow', 'purple', "
        "'orange', 'green')",
        f"{train}:4: label id 5 is out of range: spec.task.classification.numLabels is 5 (ids 0 to 4)",
        f"{train}:5: label id -1 is out of range",
        f"{train}:6: a list of labels needs spec.task.classification.multiLabel",
        f"{train}:7: column 'text' must be a non-empty string",
        f"{train}:8: label must be a class name or an integer class id, got float 1.5",
    ]
    for line in expected:
        assert line in result.output, f"{line!r} not reported:\n{result.output[-3000:]}"
    assert f"{train}:1:" not in result.output and f"{train}:10:" not in result.output
    assert not (result.workdir / "metrics.jsonl").exists()


def test_multi_label_records_name_lists_of_classes(tmp_path: Path) -> None:
    """In process: a multi-label label is a list of names or ids (in CSV, a JSON list), or one of them."""
    from finetune_operator.api.v1alpha1 import ColumnMapping, DataSource, TaskSpec
    from finetune_trainer.data.classification import class_ids
    from finetune_trainer.data.records import DataError, load_checked

    task = TaskSpec.model_validate(classification(multiLabel=True))
    assert task.classification is not None
    csv = tmp_path / "train.csv"
    lines = ["text,label", '"the apple","[""red"", 3]"', "the pear,green", "the plum,[]", '"the lemon","[""blue""]"']
    csv.write_text("\n".join([*lines, 'the fig,"[red"']) + "\n")
    with pytest.raises(DataError) as info:
        load_checked(DataSource(uri=str(csv)), "classification", ColumnMapping(), task=task)
    assert info.value.problems == [
        f"{csv}:5: label 'blue' is not one of spec.task.classification.labels ('red', 'yellow', 'purple', 'orange', "
        "'green')",
        f"{csv}:6: label '[red' is not a JSON list of labels: Expecting value",
    ]
    assert class_ids('["red", 3]', task.classification) == [0, 3]
    assert class_ids("green", task.classification) == [4]
    assert class_ids([], task.classification) == []
    assert (
        class_ids(["2", 7], task.classification)
        == "label id 7 is out of range: spec.task.classification.numLabels is 5 (ids 0 to 4)"
    )
