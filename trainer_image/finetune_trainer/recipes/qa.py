"""Recipe: extractive question answering (``qa``) — find the answer span in a context (SQuAD style).

Supports the ``qa`` format (question, context, answers with their character offsets; SQuAD v2-style
unanswerable questions with empty answer lists), any base with an ``AutoModelForQuestionAnswering``
head (Llama-family decoders get ``LlamaForQuestionAnswering``: a ``qa_outputs`` linear layer giving
each token a start and an end logit; encoders their own), the methods full (also ``freeze``, where
``headOnly`` trains ``qa_outputs`` alone), LoRA, QLoRA, IA3 and AdaLoRA (peft's ``QUESTION_ANS``
task type trains ``qa_outputs`` in full and saves it with the adapter), DDP under torchrun,
DeepSpeed ZeRO 1-3, evaluation every N steps, early stopping on ``exactMatch`` or ``f1`` (or the
loss) with the best model loaded at the end, and the output contract (adapter and/or merged model).
Not supported by the task table: prompt-learning methods and packing (refused at admission).

Long contexts are split into windows of ``data.maxSeqLength`` tokens overlapping by
``task.qa.docStride`` (:func:`~..data.qa.windows`); the loss is transformers' (the mean of the
start and end cross entropies over each window's positions), a window without the answer pointing at
the null position, token 0.

Each evaluation gathers the start and end logits of every eval window (all ranks) and decodes one
answer per question (:func:`best_answer`):

- the best span of a question is the highest ``start_logit[s] + end_logit[e]`` over all its windows,
  with ``s`` and ``e`` inside the window's context, ``e >= s`` and at most ``task.qa.maxAnswerLength``
  tokens (``e - s + 1``); the search is exhaustive over those spans (the exact maximum that the usual
  n-best shortlist of start and end logits approximates); its text is the context between the two
  tokens' character offsets, without surrounding whitespace;
- v2 data (some train or eval record is unanswerable): the answer is empty ("no answer") when the
  null score beats the best span, that is when ``min over windows of (start_logit[0] +
  end_logit[0]) > best span score`` — the rule of the SQuAD v2 reference implementations, with a
  threshold of 0 on the score difference. With v1 data the best span is always given.

The answers are scored by the official SQuAD definitions (:mod:`..scoring.squad`): evaluations report
``eval_exact_match`` and ``eval_f1`` as fractions in [0, 1] (the official scripts print 100 times
these), ``eval_total`` questions, and for v2 data ``eval_has_ans_exact_match``, ``eval_has_ans_f1``,
``eval_no_ans_exact_match``, ``eval_no_ans_f1`` with their counts ``eval_has_ans_total`` and
``eval_no_ans_total``; with ``eval_loss`` always. ``training.evaluation.metrics`` can leave out
``exactMatch`` or ``f1`` (or both: then no answer is decoded).

:func:`predict` (``finetune predict``) answers records of the ``qa`` format with a saved output,
decoded the same way, and scores them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, QAParams
from transformers import EvalPrediction, Trainer, set_seed

from .. import harness, methods, modeling
from ..data import pipeline
from ..data import qa as qa_data
from ..data.collate import pad_right
from ..scoring.squad import squad_metrics

if TYPE_CHECKING:
    from ..data.records import Record
    from ..predict import Predictions, SavedOutput

#: The columns of a row the collator takes.
ROW_KEYS = ("input_ids", "start_positions", "end_positions")

#: The metric families an evaluation can decode answers for, by their spec.training.evaluation name.
SPAN_METRICS = {"exactMatch": "exact_match", "f1": "f1"}


class QACollator:
    """Right-pads windows (the targets are positions from the left) into ``input_ids`` and
    ``attention_mask``, with the ``start_positions``/``end_positions`` targets. Counts the real tokens
    and the rows it hands out, for throughput reporting."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.tokens = 0
        self.samples = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_right(features, self.pad_token_id)
        self.samples += len(features)
        self.tokens += int(mask.sum())
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "start_positions": torch.tensor([f["start_positions"] for f in features], dtype=torch.long),
            "end_positions": torch.tensor([f["end_positions"] for f in features], dtype=torch.long),
        }


def best_span(
    window: qa_data.Window, start_logits: np.ndarray, end_logits: np.ndarray, max_answer_length: int
) -> tuple[float, int, int]:
    """(score, start token, end token) of the window's best span: ``start_logits[s] + end_logits[e]``
    highest over ``s <= e`` inside the context with ``e - s + 1 <= max_answer_length``."""
    first, last = window.context_tokens
    starts, ends = start_logits[first : last + 1], end_logits[first : last + 1]
    best = (-math.inf, first, first)
    for length in range(min(max_answer_length, last - first + 1)):
        # Spans of length + 1 tokens: start i pairs with end i + length.
        scores = starts[: len(starts) - length] + ends[length:]
        i = int(np.argmax(scores))
        if scores[i] > best[0]:
            best = (float(scores[i]), first + i, first + i + length)
    return best


def best_answer(
    question: qa_data.Question,
    scored: Sequence[tuple[qa_data.Window, np.ndarray, np.ndarray]],
    *,
    max_answer_length: int,
    allow_null: bool,
) -> str:
    """The answer text to one question from its windows and their (start, end) logits; the empty
    string for "no answer" when ``allow_null`` and the null score beats the best span (module docstring)."""
    best: tuple[float, qa_data.Window, int, int] | None = None
    null_score = math.inf
    for window, start_logits, end_logits in scored:
        null_score = min(null_score, float(start_logits[qa_data.NULL_POSITION] + end_logits[qa_data.NULL_POSITION]))
        value, s, e = best_span(window, start_logits, end_logits, max_answer_length)
        if best is None or value > best[0]:
            best = (value, window, s, e)
    if best is None or (allow_null and null_score > best[0]):
        return ""
    _, window, s, e = best
    start_span, end_span = window.offsets[s], window.offsets[e]
    assert start_span is not None and end_span is not None  # best_span looks inside the context only
    return question.context[start_span[0] : end_span[1]].strip()


def answers(
    questions: Sequence[qa_data.Question],
    windows: Sequence[qa_data.Window],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    max_answer_length: int,
    allow_null: bool,
) -> dict[str, str]:
    """One answer per question (by id) from the logits of every window (rows in window order; columns
    past a window's length are padding)."""
    if len(start_logits) != len(windows) or len(end_logits) != len(windows):
        raise ValueError(f"{len(start_logits)} rows of logits for {len(windows)} windows")
    by_question: dict[int, list[tuple[qa_data.Window, np.ndarray, np.ndarray]]] = {}
    for window, s, e in zip(windows, start_logits, end_logits, strict=True):
        n = len(window)
        by_question.setdefault(window.question, []).append((window, s[:n], e[:n]))
    return {
        q.id: best_answer(q, by_question.get(i, []), max_answer_length=max_answer_length, allow_null=allow_null)
        for i, q in enumerate(questions)
    }


def span_metrics_for(spec: FineTuneJobSpec) -> tuple[str, ...]:
    """The span metrics evaluations report (``exact_match``, ``f1``): those the spec's evaluation
    metrics list, or both."""
    return tuple(name for metric, name in SPAN_METRICS.items() if metric in spec.eval_metrics())


def metrics_function(
    spec: FineTuneJobSpec,
    questions: Sequence[qa_data.Question],
    windows: Sequence[qa_data.Window],
    *,
    allow_null: bool,
) -> Callable[[EvalPrediction], dict[str, float]]:
    """The Trainer's ``compute_metrics`` for the eval windows: answers decoded (``task.qa.maxAnswerLength``),
    scored by SQuAD's definitions, the families the spec's evaluation reports (:func:`span_metrics_for`)
    and the question counts kept."""
    qa = spec.task.qa or QAParams()
    keep = span_metrics_for(spec)
    golds = {q.id: list(q.answers) for q in questions}

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        # The model's outputs besides the loss: (start_logits, end_logits), padded with -100.
        start_logits, end_logits = cast("tuple[np.ndarray, np.ndarray]", prediction.predictions)
        predicted = answers(
            questions,
            windows,
            np.asarray(start_logits),
            np.asarray(end_logits),
            max_answer_length=qa.max_answer_length,
            allow_null=allow_null,
        )
        scores = squad_metrics(predicted, golds)
        return {k: v for k, v in scores.items() if k.endswith("total") or k.endswith(tuple(keep))}

    return compute


def run(config: TrainerConfig) -> dict[str, Any]:
    """Train; return the run summary (also written to <work_dir>/summary.json by rank 0)."""
    spec = config.spec
    with harness.Run.open(config) as run:
        checked = run.read_data()
        prepared = run.prepare(has_eval=checked.has_eval)

        source = run.model_source()
        tokenizer = modeling.load_tokenizer(source, spec.model)
        # Windows before the model: a question too long for a window is a data error (exit 3).
        data = run.tokenized(checked, tokenizer)
        train = pipeline.TokenRows(data.train, ROW_KEYS)
        held_out = pipeline.qa_windows(data.eval) if data.eval is not None else []
        questions = pipeline.qa_questions(data.eval_questions) if data.eval_questions is not None else []
        allow_null = data.allow_null
        keep = span_metrics_for(spec)

        ctx = methods.MethodContext(spec=spec, tokenizer=tokenizer, total_steps=prepared.planned_steps(len(train)))
        set_seed(spec.training.seed)  # the same initial head and adapter weights on every rank and every run
        model = modeling.load_question_answering(
            source,
            spec.model,
            dtype=modeling.model_dtype(spec.model.dtype),
            overrides=modeling.dropout_overrides(source, spec.model, spec.training.dropout),
            **methods.load_kwargs(ctx),
        )
        model.config.use_cache = False
        ctx.new_token_ids = modeling.grow_embeddings(model, tokenizer)
        tuned = methods.apply(model, ctx)
        collator = QACollator(tokenizer.pad_token_id)

        training = prepared.trainer(
            Trainer,
            tokens=collator,
            callbacks=methods.callbacks(tuned, ctx),
            model=tuned,
            train_dataset=train,
            eval_dataset=qa_data.WindowDataset(held_out) if held_out else None,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=(
                metrics_function(spec, questions, held_out, allow_null=allow_null) if held_out and keep else None
            ),
        )

        def evaluate(trainer: Trainer) -> dict[str, float]:
            if not held_out:
                return {}
            out = trainer.evaluate()
            return {k: v for k, v in out.items() if k == "eval_loss" or k.endswith(("_total", *keep))}

        training.train(evaluate)
        return training.save_outputs(tokenizer)


def window_logits(
    model: Any, windows: Sequence[qa_data.Window], pad_token_id: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The start and end logits of every window (rows in window order, padded with -100 past a
    window's length, as an evaluation gathers them), computed in batches as the evaluation pads them."""
    width = max((len(w) for w in windows), default=0)
    starts, ends = np.full((len(windows), width), -100.0), np.full((len(windows), width), -100.0)
    collate = QACollator(pad_token_id)
    dataset = qa_data.WindowDataset(windows)
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            batch = collate([dataset[i] for i in range(first, min(first + batch_size, len(windows)))])
            output = model(
                input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
            )
            rows, columns = batch["input_ids"].shape
            starts[first : first + rows, :columns] = output.start_logits.float().cpu().numpy()
            ends[first : first + rows, :columns] = output.end_logits.float().cpu().numpy()
    return starts, ends


def predict(
    saved: SavedOutput, records: list[Record], out: Predictions, *, cache_dir: Path, max_new_tokens: int
) -> dict[str, float]:
    """Answer each record's question with the saved model, decoded as the evaluation decodes
    (``task.qa``'s windows and longest answer; null answers when some record is unanswerable, the
    training data being out of reach here): one line per record with the answer (empty: no answer)
    and the record's gold answers; return the SQuAD scores over the records (the evaluation's metrics
    without the ``eval_`` prefix)."""
    spec = saved.config.spec
    qa = spec.task.qa or QAParams()
    tokenizer = saved.tokenizer()
    model = saved.model(modeling.load_question_answering, tokenizer, cache_dir)
    windows = qa_data.windows(records, tokenizer, spec.data, qa)
    questions = qa_data.questions(records, spec.data.columns)
    starts, ends = window_logits(model, windows, tokenizer.pad_token_id, spec.training.per_device_batch_size)
    predicted = answers(
        questions,
        windows,
        starts,
        ends,
        max_answer_length=qa.max_answer_length,
        allow_null=qa_data.unanswerable(records, spec.data.columns),
    )

    def lines() -> Iterator[dict[str, Any]]:
        for question in questions:
            yield {"where": question.id, "prediction": predicted[question.id], "reference": list(question.answers)}

    out.write(lines())
    return squad_metrics(predicted, {q.id: list(q.answers) for q in questions})
