"""Exact match and F1 of extractive QA answers, by the official SQuAD evaluation.

The definitions are those of the official evaluation scripts (SQuAD v1.1 ``evaluate-v1.1.py`` and
v2.0 ``evaluate-v2.0.py``):

- an answer is *normalised*: lower case, ASCII punctuation (``string.punctuation``) removed, the
  articles ``a``, ``an``, ``the`` removed as whole words, whitespace collapsed;
- *exact match* is 1 when the normalised prediction equals the normalised gold answer;
- *F1* is the harmonic mean of precision and recall over the bags of normalised tokens (split on
  whitespace) of prediction and gold answer;
- a question with several gold answers scores the best of them;
- SQuAD v2 unanswerable questions (no gold answer) have the empty string as their only gold answer:
  the empty prediction scores 1 on both, any other 0. A gold answer that normalises to nothing
  (``"the"``) is dropped, as v2's script does; so is a question's whole list when all its answers are.

v2's F1 of an empty against an empty token bag is 1 (v1.1 says 0); both scripts agree wherever the gold
answer has a token, which every answerable question has. The v2 definition is used throughout.

Scores are fractions in [0, 1] (the official scripts print percentages: 100 times these).

Written here rather than taken from a library: the definition is a dozen lines, and the packaged copies
come with what a trainer image should not carry — Hugging Face ``evaluate`` installs a tree of
dependencies and fetches the metric's script from the Hub at run time (a training pod may have no
network), and the scripts themselves are not packaged. tests/unit/test_squad_scoring.py checks this
module against the published v1.1 definition.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when prediction and gold answer are equal once normalised, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised prediction against the normalised gold answer."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """The gold answers a prediction is scored against: those that normalise to something, or the
    empty string alone (an unanswerable question)."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def score(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the question's gold answers."""
    golds = gold_answers(answers)
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)


def squad_metrics(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 over every question of ``answers`` (question id -> gold answer texts; an
    empty list for an unanswerable question), each scored by its entry in ``predictions`` (the empty
    string for "no answer"; every question must have one).

    Returns ``exact_match``, ``f1`` and ``total`` (the number of questions). When some question is
    unanswerable (v2 data) the split scores come too: ``has_ans_exact_match``, ``has_ans_f1`` and
    ``has_ans_total`` over the answerable questions, ``no_ans_*`` over the unanswerable ones (a split
    with no question is left out, as the official script leaves it out).
    """
    missing = [qid for qid in answers if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]}")
    scores = {qid: score(predictions[qid], golds) for qid, golds in answers.items()}
    metrics = _mean(scores, list(answers), "")
    has_answer = [qid for qid, golds in answers.items() if golds]
    no_answer = [qid for qid, golds in answers.items() if not golds]
    if no_answer:
        if has_answer:
            metrics.update(_mean(scores, has_answer, "has_ans_"))
        metrics.update(_mean(scores, no_answer, "no_ans_"))
    return metrics


def _mean(scores: Mapping[str, tuple[float, float]], ids: Sequence[str], prefix: str) -> dict[str, float]:
    n = len(ids)
    return {
        f"{prefix}exact_match": sum(scores[q][0] for q in ids) / n if n else 0.0,
        f"{prefix}f1": sum(scores[q][1] for q in ids) / n if n else 0.0,
        f"{prefix}total": float(n),
    }
