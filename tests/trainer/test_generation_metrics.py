"""The generation metrics (``spec.training.evaluation.metrics`` ``bleu`` and ``rouge``) and their samples.

- the scores are sacreBLEU's and rouge-score's own (the libraries called directly on the same pairs),
  with hand-checked cases (identical texts: BLEU 100, ROUGE 1; nothing in common: 0) and independent
  of the pairs' order;
- batched generation (left-padded) gives each prompt the completion it gets alone, stopping at the end
  of a chat turn; the tokenized cache holds the eval prompts (a chat record's: the conversation before
  its last assistant turn), a long prompt keeping its end;
- a run under torchrun with 2 ranks: the evaluation before training reports the metrics of the very
  pairs one process generates (every eval prompt once, whichever rank completed it); early stopping
  watches ``rouge``; ``samples.jsonl`` is in the outputs and their manifest, its pairs score to the
  reported numbers, and ``finetune report`` shows them; ``finetune predict`` scores its completions.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator.api.trainer_config import JobIdentity, TrainerConfig
from finetune_operator.api.v1alpha1 import DataSource, DataSpec, FineTuneJobSpec
from finetune_trainer import modeling
from finetune_trainer.data import eval_prompts, pipeline
from finetune_trainer.data.records import Record
from finetune_trainer.distributed import World
from finetune_trainer.generation import complete, stop_ids
from finetune_trainer.scoring.generation import corpus_bleu, generation_metrics, rouge, sentence_bleu
from rouge_score import rouge_scorer  # type: ignore[import-untyped]
from runs import RunResult
from sacrebleu import corpus_bleu as sacrebleu_corpus_bleu
from tiny import build_tokenizer, chat_rows, job_manifest, prompt_completion_rows, read_metrics, text_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

FINETUNE = str(Path(sys.executable).with_name("finetune"))
ALONE = World(rank=0, local_rank=0, world_size=1, local_world_size=1)

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("a quick brown fox jumps over the dog", "the quick brown fox jumps over the lazy dog"),
    ("apples are red and sweet", "the apple is red"),
    ("nothing matches here", "entirely different words"),
    ("Hello, world!", "hello world"),
]


def _libraries(generations: list[str], references: list[str]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores = [scorer.score(r, g) for g, r in zip(generations, references, strict=True)]
    out = {"bleu": sacrebleu_corpus_bleu(generations, [references]).score}
    for name in ("rouge1", "rouge2", "rougeL"):
        out[name] = sum(s[name].fmeasure for s in scores) / len(scores)
    return out


def test_scores_are_the_libraries_own_and_hand_checked_cases_hold() -> None:
    generations, references = [g for g, _ in PAIRS], [r for _, r in PAIRS]
    scores, each = generation_metrics(generations, references, ("bleu", "rouge"))
    expected = _libraries(generations, references)
    assert scores == pytest.approx(expected, abs=1e-12)
    assert 0 < scores["bleu"] < 100 and 0 < scores["rougeL"] < 1
    assert [e["rougeL"] for e in each] == pytest.approx(
        [rouge_scorer.RougeScorer(["rougeL"]).score(r, g)["rougeL"].fmeasure for g, r in PAIRS]
    )
    # Hand-checked: identical texts score BLEU 100 and ROUGE 1; texts without a common word score 0.
    same = ["the apple is red", "the lemon is yellow and sour"]
    assert corpus_bleu(same, same) == pytest.approx(100.0)
    assert rouge(same, same) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert corpus_bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    assert rouge(["alpha beta"], ["one two"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # ROUGE-1 by hand: "the apple is red" vs "the apple is green": 3 of 4 unigrams each way, F = 0.75;
    # ROUGE-2: 2 of 3 bigrams, F = 2/3.
    assert rouge(["the apple is red"], ["the apple is green"])["rouge1"] == pytest.approx(0.75)
    assert rouge(["the apple is red"], ["the apple is green"])["rouge2"] == pytest.approx(2 / 3)
    assert sentence_bleu("the apple is red", "the apple is red") == pytest.approx(100.0)
    # Corpus BLEU and mean ROUGE are the same for the same pairs in any order (any split over ranks).
    shuffled = PAIRS[:]
    random.Random(3).shuffle(shuffled)
    again, _ = generation_metrics([g for g, _ in shuffled], [r for _, r in shuffled], ("bleu", "rouge"))
    assert again == pytest.approx(scores, abs=1e-9)
    # Only the families asked for.
    assert set(generation_metrics(generations, references, ("bleu",))[0]) == {"bleu"}
    assert set(generation_metrics(generations, references, ("rouge",))[0]) == {"rouge1", "rouge2", "rougeL"}
    with pytest.raises(ValueError, match="2 generations for 1 references"):
        generation_metrics(["a", "b"], ["a"], ("bleu",))


def test_batched_left_padded_generation_is_each_prompt_alone(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in prompt_completion_rows(5, seed=2)]
    prompts.append(tokenizer("tell me about the banana and the apple and the plum")["input_ids"])  # longer
    stop = stop_ids(tokenizer, model, "promptCompletion")
    assert stop == [tokenizer.eos_token_id]
    batched = complete(model, prompts, pad_token_id=tokenizer.pad_token_id, stop=stop, max_new_tokens=6, batch_size=4)
    for ids, completion in zip(prompts, batched, strict=True):
        alone = modeling.greedy_completion(model, tokenizer, ids, 6)
        cut = next((k for k, t in enumerate(alone) if t in stop), len(alone))
        assert completion == alone[:cut]
    # ZeRO-3's equal batch counts: filler rows change nothing.
    filled = complete(
        model, prompts[:2], pad_token_id=tokenizer.pad_token_id, stop=stop, max_new_tokens=6, batch_size=4, batches=3
    )
    assert filled == batched[:2]
    # A chat completion ends with the assistant turn: the template's end-of-turn token is a stop token.
    chat_stop = stop_ids(tokenizer, model, "chat")
    assert set(chat_stop) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_a_long_prompt_keeps_its_end() -> None:
    tokenizer = build_tokenizer()
    data = DataSpec(train=DataSource(uri="x"), format="promptCompletion", max_seq_length=16)
    text = " ".join(["tell me about the apple tree"] * 5)
    full = tokenizer(text)["input_ids"]
    assert len(full) > 16
    row = eval_prompts.row(Record({"prompt": text, "completion": " red"}, "e.jsonl", 3), tokenizer, data)
    assert row == {"prompt_ids": full[-16:], "reference": " red", "where": "e.jsonl:3"}


def _config(tmp_path: Path, data: dict[str, Any], work: str) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model"},
            "task": {"type": "pretrain" if data["format"] == "text" else "sft"},
            "data": data,
            "training": {"maxSteps": 1},
            "metrics": {"enabled": False},
        }
    )
    return TrainerConfig(
        job=JobIdentity(namespace="local", name="gen"),
        spec=spec,
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / work),
    )


def test_the_tokenized_cache_holds_the_eval_prompts_of_a_chat_run(tmp_path: Path, tiny_model: Path) -> None:
    """Every rank reads the eval prompts from the cache (only the builder reads the records): a chat
    record's prompt is the conversation before its last assistant turn, its reference that turn."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    rows = chat_rows(5, seed=9)
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows)
    data = {"train": {"uri": str(train)}, "eval": {"uri": str(held_out)}, "format": "chat", "maxSeqLength": 64}
    config = _config(tmp_path, data, "work")
    built = pipeline.prepare(config, tokenizer, world=ALONE)
    again = pipeline.prepare(config, tokenizer, world=ALONE)
    assert not built.stats.cache_hit and again.stats.cache_hit
    spec = config.spec.data
    expected = [
        eval_prompts.chat.prompt(Record(r, str(held_out), n), tokenizer, spec) for n, r in enumerate(rows, start=1)
    ]
    for prepared in (built, again):
        assert prepared.eval_prompts is not None
        assert list(prepared.eval_prompts["prompt_ids"]) == [ids for ids, _ in expected]
        assert list(prepared.eval_prompts["reference"]) == [ref for _, ref in expected]
        assert list(prepared.eval_prompts["where"]) == [f"{held_out}:{n}" for n in range(1, 6)]
    assert expected[0][1] == rows[0]["messages"][-1]["content"]
    # Text has no prompt: no eval prompts.
    texts = write_jsonl(tmp_path / "text.jsonl", text_rows(20))
    plain = {"train": {"uri": str(texts)}, "eval": {"uri": str(texts)}, "format": "text", "maxSeqLength": 64}
    assert pipeline.prepare(_config(tmp_path, plain, "text-work"), tokenizer, world=ALONE).eval_prompts is None


def test_two_ranks_report_the_metrics_of_one_process_and_the_samples_go_with_the_outputs(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(200))
    rows = prompt_completion_rows(12, seed=5)
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows)
    samples = 9  # uneven shares: 5 and 4 prompts
    manifest = job_manifest(
        "generated",
        tiny_model,
        train,
        data__eval={"uri": str(held_out)},
        training__maxSteps=10,
        training__perDeviceBatchSize=4,
        training__evaluation={
            "everySteps": 5,
            "metrics": ["loss", "bleu", "rouge"],
            "generation": {"maxNewTokens": 8, "samples": samples},
        },
        training__earlyStopping={"metric": "rouge", "patience": 50},
    )
    result = finetune_run(manifest, "--nproc", "2")
    assert result.returncode == 0, result.output[-6000:]
    summary = result.summary()
    assert summary["world_size"] == 2

    # One process, the same prompts, each alone: the pairs the two ranks' evaluation before training scored.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    data = DataSpec(train=DataSource(uri=str(train)), format="promptCompletion", max_seq_length=64)
    prompts = [
        eval_prompts.row(Record(r, str(held_out), n), tokenizer, data) for n, r in enumerate(rows[:samples], start=1)
    ]
    stop = stop_ids(tokenizer, model, "promptCompletion")
    alone = [
        complete(
            model, [p["prompt_ids"]], pad_token_id=tokenizer.pad_token_id, stop=stop, max_new_tokens=8, batch_size=1
        )[0]
        for p in prompts
    ]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
    expected, _ = generation_metrics(texts, [p["reference"] for p in prompts], ("bleu", "rouge"))
    before = summary["before"]
    assert {k: before[f"eval_{k}"] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert 0 < before["eval_rouge1"] < 1  # the base model's completions share words with the references

    # Every evaluation logged them (step 0, 5, 10, and the final one), and the best-model plumbing took rougeL.
    logged = [r for r in read_metrics(result.workdir) if "eval_rougeL" in r]
    assert [r["step"] for r in logged][:3] == [0, 5, 10], logged
    assert all({"eval_bleu", "eval_rouge1", "eval_rouge2", "eval_loss"} <= set(r) for r in logged)
    assert summary["best_checkpoint"] is not None

    # samples.jsonl: the last evaluation's pairs, every prompt once in record order, in the manifest.
    output = result.workdir / "storage" / "local" / "generated" / "output"
    lines = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [s["where"] for s in lines] == [f"{held_out}:{n}" for n in range(1, samples + 1)]
    assert [s["reference"] for s in lines] == [r["completion"] for r in rows[:samples]]
    assert all(s["prompt"] == r["prompt"] for s, r in zip(lines, rows, strict=False))
    listed = {f["path"] for f in json.loads((output / "manifest.json").read_text())["files"]}
    assert "samples.jsonl" in listed
    after = summary["after"]
    rescored = _libraries([s["generation"] for s in lines], [s["reference"] for s in lines])
    assert {k: after[f"eval_{k}"] for k in rescored} == pytest.approx(rescored, abs=1e-9)

    # finetune report: the series and the first samples.
    report = subprocess.run([FINETUNE, "report", str(output)], capture_output=True, text=True, timeout=120, check=False)
    assert report.returncode == 0, report.stderr
    assert "eval BLEU: first" in report.stdout and "eval ROUGE-L: first" in report.stdout
    assert f"samples (3 of {samples} at step" in report.stdout
    assert f"generation: {' '.join(lines[0]['generation'].split())}" in report.stdout
    assert (output / "report" / "bleu.png").is_file() and (output / "report" / "eval_scores.png").is_file()

    # finetune predict: the same scoring of its completions.
    done = subprocess.run(
        [FINETUNE, "predict", str(output), "--input", str(held_out), "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    predicted = [json.loads(line) for line in done.stdout.splitlines()]
    scores = _libraries([p["prediction"] for p in predicted], [p["reference"] for p in predicted])
    for name, value in scores.items():
        assert f"{name}: {value:.4f}" in done.stderr or f"{name} {value:.4f}" in done.stderr, (name, done.stderr)


@pytest.mark.parametrize(("metric", "key"), [("bleu", "eval_bleu"), ("rouge", "eval_rougeL")], ids=["bleu", "rouge"])
def test_early_stopping_on_a_generation_metric_ranks_checkpoints_by_it_higher_is_better(
    metric: str, key: str, tmp_path: Path
) -> None:
    from finetune_operator.api.validation import validate_object
    from finetune_trainer.checkpointing import best_metric
    from finetune_trainer.training_args import training_arguments

    manifest = job_manifest(
        "es",
        tmp_path,
        tmp_path / "train.jsonl",
        data__eval={"uri": str(tmp_path / "eval.jsonl")},
        training__evaluation={"everySteps": 5, "metrics": ["loss", metric]},
        training__earlyStopping={"metric": metric, "patience": 2},
    )
    spec = validate_object(manifest).spec
    args = training_arguments(spec, output_dir=tmp_path / "out", base_dir=None, has_eval=True)
    assert (args.metric_for_best_model, args.greater_is_better, args.load_best_model_at_end) == (key, True, True)
    ranking = best_metric(spec, has_eval=True)
    assert ranking is not None and ranking.name == key and ranking.better(2.0, 1.0)
