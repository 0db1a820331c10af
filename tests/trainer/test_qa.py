"""Extractive QA (``task.type: qa``): windows over long contexts, span decoding, and real runs.

- windowing and targets, with the tiny model's tokenizer: a long context becomes several windows
  overlapping by ``docStride`` tokens, the answer maps to its tokens in the windows that hold it and
  the null position elsewhere (and for unanswerable questions);
- span decoding: ``maxAnswerLength``, spans inside the context only, the v2 null rule, the best span
  over all the windows of a question;
- a run through ``finetune run`` trains, reports exact match and F1 (and the v2 splits) before and
  after, with the job's own column names, and its saved adapter (with the span head) reproduces the
  reported metrics;
- a correctness anchor: our per-step losses equal a plain ``AutoModelForQuestionAnswering`` +
  ``Trainer`` script (the textbook preprocessing of transformers' run_qa example) within 1e-4;
- every method trains the span head and saves it; two ranks under torchrun; bad records exit 3.
"""

from __future__ import annotations

import itertools
import json
import math
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
from finetune_operator.api.trainer_config import EXIT_INVALID_DATA
from finetune_operator.api.v1alpha1 import DataSource, DataSpec, FineTuneJobSpec, QAParams
from finetune_trainer import methods, modeling, outputs
from finetune_trainer.data import qa as qa_data
from finetune_trainer.data.records import DataError, Record, load_checked
from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes.qa import QACollator, answers, best_answer, metrics_function
from finetune_trainer.scoring.squad import squad_metrics
from runs import RunResult
from tiny import FRUIT, QLORA, job_manifest, qa_rows, read_metrics, write_jsonl
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)

COLUMNS = {"question": "query", "context": "passage", "answers": "gold"}


def renamed(rows: list[dict[str, Any]], columns: dict[str, str] = COLUMNS) -> list[dict[str, Any]]:
    return [{columns.get(k, k): v for k, v in row.items()} for row in rows]


def records(rows: list[dict[str, Any]], name: str = "qa.jsonl") -> list[Record]:
    return [Record(row, name, line) for line, row in enumerate(rows, start=1)]


def qa_spec(max_seq_length: int) -> DataSpec:
    return DataSpec(train=DataSource(uri="x"), format="qa", max_seq_length=max_seq_length)


# -- windows ----------------------------------------------------------------------------------------------


def test_a_long_context_becomes_overlapping_windows_and_the_answer_maps_to_its_tokens(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fruits = list(FRUIT)
    context = " ".join(f"the {f} is {FRUIT[f][0]} and {FRUIT[f][1]}." for f in fruits)  # ~80 tokens
    start = context.index("the plum is ") + len("the plum is ")
    answerable = {
        "question": "what color is the plum?",
        "context": context,
        "answers": {"text": ["purple"], "answer_start": [start]},
    }
    unanswerable = {
        "question": "what color is the kiwi?",
        "context": context,
        "answers": {"text": [], "answer_start": []},
    }
    data, qa = qa_spec(32), QAParams(doc_stride=8)
    question_tokens = len(tokenizer(answerable["question"], add_special_tokens=False)["input_ids"])
    windows = qa_data.windows(records([answerable, unanswerable]), tokenizer, data, qa)

    mine = [w for w in windows if w.question == 0]
    assert len(mine) >= 3, len(mine)
    assert len([w for w in windows if w.question == 1]) >= 3
    for window in mine:
        assert len(window) <= 32
        first, last = window.context_tokens
        assert first == question_tokens and last == len(window) - 1  # question first, then context
        assert window.offsets[:first] == [None] * first
        assert window.input_ids[:first] == tokenizer(answerable["question"], add_special_tokens=False)["input_ids"]
    # Consecutive windows overlap by exactly docStride context tokens, and together cover the context.
    for before, after in itertools.pairwise(mine):
        tail, head = before.offsets[-8:], after.offsets[after.context_tokens[0] :][:8]
        assert tail == head
        assert before.input_ids[-8:] == after.input_ids[after.context_tokens[0] :][:8]
        assert before.offsets[-9] not in after.offsets  # no more than docStride
    spans = [s for w in mine for s in w.offsets if s is not None]
    assert min(s[0] for s in spans) == 0 and max(s[1] for s in spans) == len(context)
    # The windows that hold all of "purple" point at its tokens; the others at the null position.
    holding = [w for w in mine if _context_span(w)[0] <= start and start + len("purple") <= _context_span(w)[1]]
    assert holding and len(holding) < len(mine)
    for window in mine:
        if window in holding:
            begin, end = window.offsets[window.start], window.offsets[window.end]
            assert begin is not None and end is not None
            assert context[begin[0] : end[1]].strip() == "purple"
            assert window.start >= window.context_tokens[0]
        else:
            assert (window.start, window.end) == (qa_data.NULL_POSITION, qa_data.NULL_POSITION)
    # An unanswerable question points at the null position in every window.
    assert {(w.start, w.end) for w in windows if w.question == 1} == {(0, 0)}


def _context_span(window: qa_data.Window) -> tuple[int, int]:
    first, last = window.context_tokens
    begin, end = window.offsets[first], window.offsets[last]
    assert begin is not None and end is not None
    return begin[0], end[1]


def test_a_question_too_long_for_its_window_is_a_data_error(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = qa_rows(3, seed=1)
    rows[1]["question"] = "what color is the " + " ".join(["big"] * 30) + " apple?"
    with pytest.raises(DataError) as info:
        qa_data.windows(records(rows), tokenizer, qa_spec(32), QAParams(doc_stride=4))
    [problem] = info.value.problems
    assert problem.startswith("qa.jsonl:2: the question takes ") and "spec.task.qa.docStride 4" in problem


def test_a_slow_tokenizer_is_refused() -> None:
    """Offsets need a fast (Rust) tokenizer; ByT5's is pure Python (it needs no files to build)."""
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    assert not slow.is_fast
    with pytest.raises(ConfigError, match="needs a fast tokenizer"):
        qa_data.windows(records(qa_rows(1)), slow, qa_spec(64), QAParams(doc_stride=8))


# -- decoding ---------------------------------------------------------------------------------------------


def _window(question: int, context_spans: list[tuple[int, int]], question_tokens: int = 3) -> qa_data.Window:
    offsets: list[tuple[int, int] | None] = [None] * question_tokens + list(context_spans)
    return qa_data.Window(list(range(len(offsets))), offsets, question, 0, 0)


def test_decoding_honours_max_answer_length_and_stays_in_the_context() -> None:
    context = "w0 w1 w2 w3 w4 w5 w6 w7"
    spans = [(3 * i, 3 * i + 2) for i in range(8)]  # token i of the context is "wi"
    window = _window(0, spans)
    question = qa_data.Question("q", context, ("w2 w3",))
    start, end = np.full(11, -50.0), np.full(11, -50.0)
    start[1], end[2] = 90.0, 90.0  # the best pair lies in the question: never an answer
    start[3 + 2], end[3 + 7] = 10.0, 10.0  # "w2 .. w7" scores 20 (6 tokens)
    start[3 + 3], end[3 + 3] = 2.0, 4.0  # "w2 w3" 14 (2 tokens), "w3 .. w7" 12 (5), "w3" 6 (1)
    end[3 + 1] = 45.0  # "w2 .. w1" would score 55, but ends before it starts ("w1" alone: -5)
    scored = [(window, start, end)]
    assert best_answer(question, scored, max_answer_length=30, allow_null=False) == "w2 w3 w4 w5 w6 w7"
    assert best_answer(question, scored, max_answer_length=6, allow_null=False) == "w2 w3 w4 w5 w6 w7"
    assert best_answer(question, scored, max_answer_length=5, allow_null=False) == "w2 w3"
    assert best_answer(question, scored, max_answer_length=1, allow_null=False) == "w3"
    # v2: the null answer when the null score (token 0) beats the best span; never with v1 data.
    start[0], end[0] = 8.0, 8.0  # 16 > 14
    assert best_answer(question, scored, max_answer_length=5, allow_null=True) == ""
    assert best_answer(question, scored, max_answer_length=5, allow_null=False) == "w2 w3"
    assert best_answer(question, scored, max_answer_length=6, allow_null=True) == "w2 w3 w4 w5 w6 w7"  # 16 < 20
    start[0] = 5.0  # 13 < 14
    assert best_answer(question, scored, max_answer_length=5, allow_null=True) == "w2 w3"


def test_decoding_takes_the_best_span_over_all_windows_and_the_smallest_null_score() -> None:
    context = "a0 a1 a2 a3 a4 a5"
    first, second = _window(0, [(0, 2), (3, 5), (6, 8), (9, 11)]), _window(0, [(6, 8), (9, 11), (12, 14), (15, 17)])
    other = _window(1, [(0, 2), (3, 5)])
    questions = [qa_data.Question("q0", context, ("a4",)), qa_data.Question("q1", context, ())]
    width = 9  # padded past the longest window, as gathered logits are (-100)
    start, end = np.full((3, width), -100.0), np.full((3, width), -100.0)
    start[:2, :7], end[:2, :7] = 0.0, 0.0
    start[2, :5], end[2, :5] = 0.0, 0.0
    start[0, 3 + 1], end[0, 3 + 1] = 2.0, 2.0  # "a1" scores 4 in the first window
    start[1, 3 + 2], end[1, 3 + 2] = 3.0, 3.0  # "a4" scores 6 in the second
    start[0, 0], end[0, 0] = 4.0, 4.0  # null 8 in the first window ...
    start[1, 0], end[1, 0] = 2.0, 3.0  # ... 5 in the second: the smallest, 5, loses to 6
    start[2, 0], end[2, 0] = 1.0, 1.0  # q1: null 2 beats its best span (0)
    got = answers(questions, [first, second, other], start, end, max_answer_length=4, allow_null=True)
    assert got == {"q0": "a4", "q1": ""}
    assert squad_metrics(got, {"q0": ["a4"], "q1": []})["exact_match"] == 1.0
    with pytest.raises(ValueError, match="2 rows of logits for 3 windows"):
        answers(questions, [first, second, other], start[:2], end[:2], max_answer_length=4, allow_null=True)


def test_the_spec_chooses_the_longest_answer_and_the_metrics_reported(tmp_path: Path) -> None:
    """The evaluation's compute_metrics, as the recipe builds it from the spec: ``task.qa.maxAnswerLength``
    bounds the decoded spans, ``training.evaluation.metrics`` picks the families reported."""
    context = "w0 w1 w2 w3"
    window = _window(0, [(0, 2), (3, 5), (6, 8), (9, 11)])
    questions = [qa_data.Question("q", context, ("w1 w2",))]
    start, end = np.full((1, 7), -9.0), np.full((1, 7), -9.0)
    start[0, 3 + 1], end[0, 3 + 2] = 5.0, 5.0  # "w1 w2": 2 tokens
    end[0, 3 + 1] = 1.0  # "w1": the best 1-token span

    def compute(max_answer_length: int, metrics: list[str] | None = None) -> dict[str, float]:
        task = {"type": "qa", "qa": {"docStride": 8, "maxAnswerLength": max_answer_length}}
        training = {"evaluation": {"metrics": metrics}} if metrics else {}
        manifest = job_manifest("x", tmp_path, tmp_path / "x.jsonl", task=task, data__format="qa", data__evalSplit=0.1)
        manifest["spec"]["training"].update(training)
        spec = FineTuneJobSpec.model_validate(manifest["spec"])
        function = metrics_function(spec, questions, [window], allow_null=False)
        logits: Any = (start, end)  # transformers types a tuple of outputs as a 1-tuple
        return function(EvalPrediction(predictions=logits, label_ids=logits))

    assert compute(2) == {"exact_match": 1.0, "f1": 1.0, "total": 1.0}
    assert compute(1) == {"exact_match": 0.0, "f1": pytest.approx(2 / 3), "total": 1.0}  # "w1" vs "w1 w2"
    assert compute(1, ["loss", "exactMatch"]) == {"exact_match": 0.0, "total": 1.0}
    assert compute(2, ["f1"]) == {"f1": 1.0, "total": 1.0}


# -- records ----------------------------------------------------------------------------------------------


def test_bad_records_exit_3_with_file_and_line_before_the_model_is_loaded(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    rows = qa_rows(8, seed=3, unanswerable=0.3)
    context = rows[0]["context"]
    for row in rows[2:7]:
        row["context"] = context
    rows[1]["context"] = "   "  # line 2
    rows[2]["answers"] = {"text": ["red"], "answer_start": [len(context) + 5]}  # line 3: out of range
    rows[3]["answers"] = {"text": ["blue"], "answer_start": [0]}  # line 4: not at its offset
    rows[4]["answers"] = {"text": ["red"], "answer_start": []}  # line 5: no offset for the text
    rows[5]["answers"] = {"text": ["red"], "answer_start": [-1]}  # line 6: negative offset
    rows[6]["answers"] = ["red"]  # line 7: not {text, answer_start}
    rows[7] = {"question": "what color is the kiwi?", "context": context, "answers": {"text": [], "answer_start": []}}
    train = write_jsonl(tmp_path / "bad.jsonl", rows)  # line 8 (unanswerable) and line 1 are fine
    manifest = job_manifest(
        "qa-bad", tiny_model, train, task={"type": "qa", "qa": {"docStride": 16}}, data__format="qa"
    )
    result = finetune_run(manifest)
    assert result.returncode == EXIT_INVALID_DATA, result.output[-3000:]
    problems = [line for line in result.output.splitlines() if line.startswith(f"{train}:")]
    assert problems == [
        f"{train}:2: empty context (column 'context')",
        f"{train}:3: answer 'red': answer_start {len(context) + 5} is out of range for a context of "
        f"{len(context)} characters",
        f"{train}:4: answer 'blue' is not at offset 0 of the context",
        f"{train}:5: column 'answers': answer_start must list one offset per answer text",
        f"{train}:6: answer 'red': answer_start -1 is out of range for a context of {len(context)} characters",
        f"{train}:7: column 'answers' must be {{text: [...], answer_start: [...]}}",
    ], result.output[-3000:]
    assert "LOAD REPORT" not in result.output and not (result.workdir / "metrics.jsonl").exists()
    # SQuAD v2-style unanswerable records pass the check.
    assert (
        len(
            load_checked(
                DataSource(uri=str(write_jsonl(tmp_path / "ok.jsonl", [rows[0], rows[7]]))), "qa", qa_spec(64).columns
            )
        )
        == 2
    )


# -- runs -------------------------------------------------------------------------------------------------

SEED = 5
#: What the runs share: windows overlapping by 8 tokens, answers of at most 4 tokens. Windows of 48
#: tokens hold a question and a two- or four-fruit context; of 32, a two-fruit one (four-fruit
#: contexts take two windows).
QA_TASK: dict[str, Any] = {"type": "qa", "qa": {"docStride": 8, "maxAnswerLength": 4}}


def qa_job(
    name: str, model: Path, train: Path, eval_file: Path | None, max_seq_length: int = 48, **overrides: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {"train": {"uri": str(train)}, "format": "qa", "maxSeqLength": max_seq_length}
    if eval_file is not None:
        data["eval"] = {"uri": str(eval_file)}
    return job_manifest(name, model, train, task=QA_TASK, data=data, training__seed=SEED, **overrides)


def eval_metrics_of(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], eval_file: Path, batch: int, max_seq_length: int = 48
) -> dict[str, float]:
    """Exact match and F1 of ``model`` on the eval rows, computed here: windows, logits in batches of
    ``batch`` (as the Trainer's evaluation pads them), decoding, SQuAD scores."""
    data = qa_spec(max_seq_length)
    qa = QAParams.model_validate(QA_TASK["qa"])
    recs = [Record(row, str(eval_file), line) for line, row in enumerate(rows, start=1)]
    windows = qa_data.windows(recs, tokenizer, data, qa)
    collate = QACollator(tokenizer.pad_token_id)
    starts, ends = np.full((len(windows), max_seq_length), -100.0), np.full((len(windows), max_seq_length), -100.0)
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = qa_data.WindowDataset(windows[i : i + batch])
            inputs = collate([chunk[j] for j in range(len(chunk))])
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            width = inputs["input_ids"].shape[1]
            starts[i : i + batch, :width] = out.start_logits.float().numpy()
            ends[i : i + batch, :width] = out.end_logits.float().numpy()
    questions = qa_data.questions(recs, data.columns)
    predicted = answers(questions, windows, starts, ends, max_answer_length=qa.max_answer_length, allow_null=True)
    return squad_metrics(predicted, {q.id: list(q.answers) for q in questions})


def test_a_qa_run_trains_and_reports_exact_match_and_f1(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    train_rows = qa_rows(300, seed=1, fruits=2, unanswerable=0.15)
    eval_rows = qa_rows(40, seed=3, fruits=2, unanswerable=0.25)
    train = write_jsonl(tmp_path / "train.jsonl", renamed(train_rows))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", renamed(eval_rows))
    manifest = qa_job(
        "qa-lora",
        tiny_model,
        train,
        eval_file,
        data__columns=COLUMNS,
        method={"type": "lora"},  # rank 16 on every linear layer but the span head, which trains in full
        training__maxSteps=80,
        training__learningRate=3e-3,
        training__evaluation={"everySteps": 20},
        # Watches exact match (higher is better): the best checkpoint is loaded at the end.
        training__earlyStopping={"metric": "exactMatch", "patience": 5},
        output={"save": "both"},
    )
    result = finetune_run(manifest)
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    before, after = summary["before"], summary["after"]
    no_answer = sum(1 for r in eval_rows if not r["answers"]["text"])
    for metrics in (before, after):
        assert (metrics["eval_total"], metrics["eval_no_ans_total"]) == (len(eval_rows), no_answer)
        assert metrics["eval_has_ans_total"] == len(eval_rows) - no_answer
        for key in ("eval_exact_match", "eval_f1", "eval_has_ans_f1", "eval_no_ans_exact_match"):
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert after["eval_loss"] < before["eval_loss"] * 0.7, (before, after)
    assert after["eval_exact_match"] >= before["eval_exact_match"] + 0.3, (before, after)
    assert after["eval_f1"] >= before["eval_f1"] + 0.3, (before, after)
    assert after["eval_has_ans_f1"] >= before["eval_has_ans_f1"] + 0.4, (before, after)
    # Every evaluation reports them to metrics.jsonl: before training, every 20 steps, after training;
    # the model evaluated (and saved) at the end is the best checkpoint by exact match.
    evaluations = [m for m in read_metrics(result.workdir) if "eval_exact_match" in m]
    assert [m["step"] for m in evaluations] == [0, 20, 40, 60, 80, 80], evaluations
    periodic = {m["step"]: m["eval_exact_match"] for m in evaluations[1:-1]}
    best = max(periodic.values())
    first_best = min(step for step, value in periodic.items() if value == best)
    assert summary["best_checkpoint"].endswith(f"checkpoint-{first_best}"), (summary["best_checkpoint"], periodic)
    assert after["eval_exact_match"] == best
    print(
        f"\nqa lora: eval EM {before['eval_exact_match']:.3f} -> {after['eval_exact_match']:.3f}, "
        f"F1 {before['eval_f1']:.3f} -> {after['eval_f1']:.3f}"
    )

    # The saved adapter carries the span head (peft's QUESTION_ANS modules_to_save), and it and the
    # merged model both reproduce the metrics of the final evaluation (of the best checkpoint).
    output = result.workdir / "storage" / "local" / "qa-lora" / "output"
    adapter_config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "QUESTION_ANS" and "qa_outputs" in adapter_config["modules_to_save"]
    from safetensors import safe_open

    with safe_open(str(output / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any("qa_outputs" in key for key in f.keys())  # noqa: SIM118
    tokenizer = AutoTokenizer.from_pretrained(output / "adapter")
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    source = modeling.ModelSource(str(tiny_model), None, None, True)
    base = modeling.load_question_answering(source, spec.model, dtype=torch.float32)
    adapter = outputs.load_adapter_for_inference(base, output / "adapter")
    adapter.train(False)
    merged = AutoModelForQuestionAnswering.from_pretrained(output / "merged", dtype=torch.float32).eval()
    for model in (adapter, merged):
        reproduced = eval_metrics_of(model, tokenizer, eval_rows, eval_file, batch=8)
        for key in ("exact_match", "f1", "has_ans_f1", "no_ans_exact_match"):
            assert reproduced[key] == pytest.approx(after[f"eval_{key}"], abs=1e-9), (key, reproduced, after)
    # `finetune predict` answers the eval records with the saved adapter and prints the same scores.
    finetune = str(Path(sys.executable).with_name("finetune"))
    done = subprocess.run(
        [finetune, "predict", str(output), "--input", str(eval_file), "--artifact", "adapter"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    answered = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["where"] for a in answered] == [f"{eval_file}:{n}" for n in range(1, len(eval_rows) + 1)]
    assert [a["reference"] for a in answered] == [r["answers"]["text"] for r in eval_rows]
    exact = sum(a["prediction"] == a["reference"][0] if a["reference"] else a["prediction"] == "" for a in answered)
    assert exact / len(eval_rows) == pytest.approx(after["eval_exact_match"])  # one-word answers: EM is equality
    for key in ("exact_match", "f1", "no_ans_f1"):
        assert f"{key}: {after[f'eval_{key}']:.4f}" in done.stderr, done.stderr[-2000:]


def textbook_train_features(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int, stride: int
) -> list[dict[str, Any]]:
    """``prepare_train_features`` of transformers' examples/pytorch/question-answering/run_qa.py (the
    question first, right padding), as published."""
    tokenized = tokenizer(
        [r["question"] for r in rows],
        [r["context"] for r in rows],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    features = []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        if tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = tokenized.sequence_ids(i)
        answers_ = rows[sample_mapping[i]]["answers"]
        if len(answers_["answer_start"]) == 0:
            start_position = end_position = cls_index
        else:
            start_char = answers_["answer_start"][0]
            end_char = start_char + len(answers_["text"][0])
            token_start_index = 0
            while sequence_ids[token_start_index] != 1:
                token_start_index += 1
            token_end_index = len(input_ids) - 1
            while sequence_ids[token_end_index] != 1:
                token_end_index -= 1
            if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
                start_position = end_position = cls_index
            else:
                while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                    token_start_index += 1
                start_position = token_start_index - 1
                while offsets[token_end_index][1] >= end_char:
                    token_end_index -= 1
                end_position = token_end_index + 1
        features.append(
            {
                "input_ids": input_ids,
                "attention_mask": tokenized["attention_mask"][i],
                "start_positions": start_position,
                "end_positions": end_position,
            }
        )
    return features


ANCHOR_STEPS, ANCHOR_LR, ANCHOR_BATCH = 10, 1e-3, 8


def test_full_qa_matches_plain_hf_question_answering_trainer(
    tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    rows = qa_rows(60, seed=6, fruits=2, unanswerable=0.2) + qa_rows(20, seed=7, fruits=4, unanswerable=0.2)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    manifest = qa_job(
        "qa-anchor",
        tiny_model,
        train,
        None,
        max_seq_length=32,
        method={"type": "full"},
        training__maxSteps=ANCHOR_STEPS,
        training__learningRate=ANCHOR_LR,
        training__perDeviceBatchSize=ANCHOR_BATCH,
    )
    ours = finetune_run(manifest)
    assert ours.returncode == 0, ours.output[-5000:]

    # The plain script: transformers' own preprocessing, model class, collator and Trainer.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    features = textbook_train_features(rows, tokenizer, 32, 8)
    windows = qa_data.windows(records(rows), tokenizer, qa_spec(32), QAParams.model_validate(QA_TASK["qa"]))
    assert [(w.input_ids, w.start, w.end) for w in windows] == [
        (f["input_ids"], f["start_positions"], f["end_positions"]) for f in features
    ]
    assert len(features) > len(rows) and any(f["start_positions"] for f in features)
    set_seed(SEED)
    model = AutoModelForQuestionAnswering.from_pretrained(
        tiny_model,
        dtype=torch.float32,
        key_mapping={r"^model\.": "transformer."},  # transformers#30381
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=ANCHOR_BATCH,
        learning_rate=ANCHOR_LR,
        lr_scheduler_type="constant",
        max_steps=ANCHOR_STEPS,
        logging_steps=1,
        seed=SEED,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    reference = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(ours.losses) == len(reference) == ANCHOR_STEPS
    differences = [abs(a - b) for a, b in zip(ours.losses, reference, strict=True)]
    print(f"\nqa anchor: max |ours - plain HF| over {ANCHOR_STEPS} steps = {max(differences):.2e}")
    for step, (a, b) in enumerate(zip(ours.losses, reference, strict=True), start=1):
        assert abs(a - b) <= 1e-4, f"step {step}: ours {a:.6f} vs plain HF {b:.6f}"


#: Each method's spec.method, and the learning rate it trains with.
METHOD_CASES: dict[str, Any] = {
    "freeze-head-only": {"type": "full", "freeze": {"headOnly": True}},
    "lora": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}},
    "qlora": QLORA["method"],
    "ia3": {"type": "ia3"},
    "adalora": {
        "type": "adalora",
        "lora": {"alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
        "adalora": {"initR": 4, "targetR": 2, "tinit": 1, "tfinal": 1, "deltaT": 1},
    },
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_every_method_trains_the_span_head_and_saves_it(case: str, tiny_model: Path, tmp_path: Path) -> None:
    """In process (cheap): the method applied as the recipe applies it trains ``qa_outputs`` (alone, for
    headOnly), and the saved output reloads to the same span logits."""
    manifest = qa_job(case, tiny_model, tmp_path / "x.jsonl", None, method=METHOD_CASES[case])
    if case == "qlora":
        manifest["spec"]["model"]["dtype"] = "bf16"
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    source = modeling.ModelSource(str(tiny_model), None, None, True)
    ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=4)
    set_seed(SEED)
    model = modeling.load_question_answering(
        source, spec.model, dtype=modeling.model_dtype(spec.model.dtype), **methods.load_kwargs(ctx)
    )
    tuned = methods.apply(model, ctx)
    trainable = {name: p for name, p in tuned.named_parameters() if p.requires_grad}
    head = {name: p for name, p in trainable.items() if "qa_outputs" in name}
    assert head, sorted(trainable)
    if case == "freeze-head-only":
        assert trainable == head and sum(p.numel() for p in head.values()) == 64 * 2 + 2  # weight and bias
    else:
        assert len(head) < len(trainable)  # the adapter's own parameters train too
    initial = {name: p.detach().clone() for name, p in head.items()}

    qa = QAParams.model_validate(QA_TASK["qa"])
    windows = qa_data.windows(records(qa_rows(8, seed=9, unanswerable=0.25)), tokenizer, qa_spec(48), qa)
    batch = QACollator(tokenizer.pad_token_id)([qa_data.WindowDataset(windows)[i] for i in range(len(windows))])
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    tuned.train()
    for _ in range(2):
        loss = tuned(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(initial[name], p) for name, p in head.items()), "the span head did not train"
    tuned.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = tuned(**inputs).start_logits.float()

    artifacts = outputs.save_outputs(
        tuned, tokenizer, spec, staging=tmp_path / "staging", destination=str(tmp_path / "output")
    )
    [artifact] = artifacts
    reloaded: Any
    if case == "freeze-head-only":
        assert artifact.kind == "model"
        reloaded = modeling.load_question_answering(
            modeling.ModelSource(artifact.uri, None, None, True), spec.model, dtype=torch.float32
        )
    else:
        assert artifact.kind == "adapter"
        set_seed(SEED + 1)  # a fresh base whose own (random) span head the adapter's saved one replaces
        base = modeling.load_question_answering(
            source, spec.model, dtype=modeling.model_dtype(spec.model.dtype), **methods.load_kwargs(ctx)
        )
        base.train(False)
        with torch.no_grad():
            without = base(**inputs).start_logits.float()
        assert (without - expected).abs().max() > 0.1  # a base alone is far from the trained model
        reloaded = outputs.load_adapter_for_inference(base, artifact.uri)
    with torch.no_grad():
        got = reloaded.eval()(**inputs).start_logits.float()
    # QLoRA trains its head in fp32 (k-bit preparation) and reloads it in the base's bf16.
    tolerance = 3e-2 if case == "qlora" else 1e-5
    assert torch.allclose(got, expected, atol=tolerance), (got - expected).abs().max()


def test_naming_the_span_head_as_an_adapter_target_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    method = {"type": "lora", "lora": {"targetModules": ["q_proj", "qa_outputs"]}}
    spec = FineTuneJobSpec.model_validate(qa_job("x", tiny_model, tmp_path / "x.jsonl", None, method=method)["spec"])
    ctx = methods.MethodContext(spec=spec, tokenizer=None, total_steps=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"spec\.method\.lora\.targetModules: qa_outputs is the span head"):
        methods.lora.untargeted(ctx)
    assert ctx.untargeted(["q_proj"], "f") == ["qa_outputs"]  # peft's exclude_modules


def two_rank_data(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], Path]:
    """Training records, and eval records of which some take two windows of 32 tokens: 17 windows."""
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(64, seed=11, fruits=2, unanswerable=0.2))
    eval_rows = qa_rows(9, seed=12, fruits=2, unanswerable=0.4) + qa_rows(4, seed=13, fruits=4, unanswerable=0.4)
    return train, eval_rows, write_jsonl(tmp_path / "eval.jsonl", eval_rows)


@pytest.mark.parametrize("case", ["ddp", "zero2"])
def test_two_ranks_train_and_evaluate_every_window_once(
    case: str, tiny_model: Path, tmp_path: Path, finetune_run: Callable[..., RunResult]
) -> None:
    """DDP (and DeepSpeed ZeRO-2) under torchrun: the evaluation gathers every window's logits from both
    ranks in order (an odd number of batches of 4, the last one short: the ranks' shares are uneven),
    so the metrics before training are those of the base model computed here in one process."""
    train, eval_rows, eval_file = two_rank_data(tmp_path)
    extra = {"distributed__deepspeed": {"zeroStage": 2}} if case == "zero2" else {}
    manifest = qa_job(
        f"qa-{case}",
        tiny_model,
        train,
        eval_file,
        max_seq_length=32,
        training__maxSteps=6,
        training__perDeviceBatchSize=4,
        **extra,
    )
    result = finetune_run(manifest, "--nproc", "2")
    assert result.returncode == 0, result.output[-5000:]
    summary = result.summary()
    assert summary["world_size"] == 2 and summary["steps"] == 6
    # Under ZeRO-2 DeepSpeed's engine trained (and saved its partitioned optimizer state).
    assert (Path(summary["last_checkpoint"]) / "global_step6").is_dir() is (case == "zero2"), summary
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    windows = qa_data.windows(records(eval_rows), tokenizer, qa_spec(32), QAParams.model_validate(QA_TASK["qa"]))
    batches = math.ceil(len(windows) / 4)
    assert batches % 2 == 1 and len(windows) % 4, len(windows)
    set_seed(SEED)
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    base = modeling.load_question_answering(
        modeling.ModelSource(str(tiny_model), None, None, True), spec.model, dtype=torch.float32
    )
    base.train(False)
    expected = eval_metrics_of(base, tokenizer, eval_rows, eval_file, batch=4, max_seq_length=32)
    for key in ("exact_match", "f1", "total", "has_ans_f1", "no_ans_exact_match"):
        assert summary["before"][f"eval_{key}"] == pytest.approx(expected[key], abs=1e-9), (key, summary["before"])
    assert summary["before"]["eval_no_ans_total"] == 3  # v2 data: the splits are gathered right too
    assert summary["after"]["eval_total"] == len(eval_rows) and len(windows) > len(eval_rows)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_a_killed_run_resumes_to_the_same_losses_and_metrics(tiny_model: Path, tmp_path: Path) -> None:
    """Two ranks, checkpoints every 4 steps: killed (SIGKILL on a rank) after a checkpoint, the rerun
    of the same command resumes there and ends with the uninterrupted run's losses and eval metrics."""
    train, _, eval_file = two_rank_data(tmp_path)
    steps = 16

    def job(name: str) -> dict[str, Any]:
        return qa_job(
            name,
            tiny_model,
            train,
            eval_file,
            max_seq_length=32,
            training__maxSteps=steps,
            training__perDeviceBatchSize=4,
            checkpoint={"everySteps": 4, "keepLast": 2},
        )

    reference = live.start(tmp_path, job("qa-reference"), "--nproc", "2")
    assert reference.wait(timeout=300) == 0, reference.output[-5000:]
    store = tmp_path / "run-qa-victim" / "storage" / "local" / "qa-victim"

    def committed() -> list[int]:
        return sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in store.glob("checkpoint-*/manifest.json"))

    run = live.start(tmp_path, job("qa-victim"), "--nproc", "2")
    try:
        ranks = run.ranks(2)
        live.wait_for("a committed checkpoint and training past it", lambda: committed() and run.logged_step() > 5, 180)
        ranks[1].send_signal(signal.SIGKILL)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    assert code == 128 + signal.SIGKILL, f"exit {code}: the kill landed after training ended?\n{run.output[-3000:]}"
    newest = committed()[-1]
    assert newest < steps, newest
    rerun = live.start(tmp_path, job("qa-victim"), "--nproc", "2", tag="rerun")
    assert rerun.wait(timeout=300) == 0, rerun.output[-5000:]
    expected = live.losses_by_step(reference.metrics())
    resumed = live.losses_by_step(rerun.metrics())
    assert sorted(resumed)[-(steps - newest) :] == list(range(newest + 1, steps + 1)), sorted(resumed)
    for step in range(newest + 1, steps + 1):
        assert abs(resumed[step] - expected[step]) < 1e-4, (step, resumed[step], expected[step])
    summaries = [json.loads((r.workdir / "summary.json").read_text()) for r in (reference, rerun)]
    assert summaries[1]["resumed_from_step"] == newest
    want, got = summaries[0]["after"], summaries[1]["after"]
    assert abs(got["eval_loss"] - want["eval_loss"]) < 1e-4, (got, want)
    for key in ("exact_match", "f1", "has_ans_f1", "no_ans_exact_match", "total"):
        assert got[f"eval_{key}"] == pytest.approx(want[f"eval_{key}"], abs=1e-9), (key, got, want)
