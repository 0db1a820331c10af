"""SQuAD exact match and F1 (finetune_trainer.scoring.squad) against the published evaluation.

The reference below is the scoring of the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``,
functions ``normalize_answer``, ``f1_score``, ``exact_match_score`` and
``metric_max_over_ground_truths``), transcribed as published. Every pair is also checked against a
value worked out by hand, so that the test does not only compare two programs with each other.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

import pytest
from finetune_trainer.scoring.squad import exact_match, f1, gold_answers, normalize_answer, score, squad_metrics

# -- the published SQuAD v1.1 scoring (evaluate-v1.1.py) ---------------------------------------------------


def v11_normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def v11_f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = v11_normalize_answer(prediction).split()
    ground_truth_tokens = v11_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def v11_exact_match_score(prediction: str, ground_truth: str) -> bool:
    return v11_normalize_answer(prediction) == v11_normalize_answer(ground_truth)


def v11_metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: list[str]
) -> float:
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


# -- hand-made pairs: (prediction, gold answers, exact match, F1 worked out by hand) ---------------------------

PAIRS: list[tuple[str, list[str], float, float]] = [
    ("Denver Broncos", ["Denver Broncos"], 1, 1),
    ("denver broncos", ["Denver Broncos"], 1, 1),  # case
    ("The Denver Broncos.", ["Denver Broncos"], 1, 1),  # article and punctuation
    ("  Denver   Broncos ", ["Denver Broncos"], 1, 1),  # whitespace
    ("Broncos", ["Denver Broncos"], 0, 2 / 3),  # p 1, r 1/2
    ("Denver Broncos of Colorado", ["Denver Broncos"], 0, 2 / 3),  # p 1/2, r 1
    ("Carolina Panthers", ["Denver Broncos"], 0, 0),
    ("Broncos Denver", ["Denver Broncos"], 0, 1),  # a bag of tokens: order does not count
    ("Denver", ["Denver Broncos", "Broncos", "Denver"], 1, 1),  # best over gold answers
    ("the Broncos team", ["Denver Broncos", "Broncos"], 0, 2 / 3),  # vs "broncos": p 1/2, r 1
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara, California"], 1, 1),
    ("Levis Stadium", ["Levi's Stadium"], 1, 1),  # the apostrophe is punctuation
    ("Levi Stadium", ["Levi's Stadium"], 0, 0.5),  # "levi stadium" vs "levis stadium"
    ("1,000", ["1000"], 1, 1),  # the comma goes
    ("10-15", ["1015"], 1, 1),
    ("a", ["an apple"], 0, 0),  # "" vs "apple": no common token
    ("an apple a day", ["apple day"], 1, 1),  # every article removed
    ("theatre", ["the atre"], 0, 0),  # "the" only as a whole word
    ("another", ["other"], 0, 0),  # "an" only as a whole word
    ("apple apple", ["apple"], 0, 2 / 3),  # counts: common 1, p 1/2, r 1
    ("apple", ["apple apple"], 0, 2 / 3),  # common 1, p 1, r 1/2
    ("red green blue", ["green blue yellow"], 0, 2 / 3),  # common 2, p 2/3, r 2/3
    ("Café au lait", ["café au lait"], 1, 1),  # unicode lower case
    ("naïve", ["naive"], 0, 0),  # no accent folding
    ("«Paris»", ["Paris"], 0, 0),  # guillemets are not ASCII punctuation: they stay
    ("Paris — France", ["Paris France"], 0, 0.8),  # nor is the em dash: p 2/3, r 1
    ("ÉCOLE", ["école"], 1, 1),
    ("東京", ["東京"], 1, 1),
    ("in 1990s", ["1990s"], 0, 2 / 3),
    ("the end.", ["The End"], 1, 1),
    ("A.B.C.", ["abc"], 1, 1),  # "a.b.c." loses its dots before articles are looked for
]


@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1_value"), PAIRS, ids=[f"{p!r}-{g[0]!r}" for p, g, _, _ in PAIRS]
)
def test_pairs_match_the_published_v11_definition(
    prediction: str, golds: list[str], em: float, f1_value: float
) -> None:
    ours_em, ours_f1 = score(prediction, golds)
    assert ours_em == em
    assert ours_f1 == pytest.approx(f1_value)
    assert ours_em == v11_metric_max_over_ground_truths(v11_exact_match_score, prediction, golds)
    assert ours_f1 == pytest.approx(v11_metric_max_over_ground_truths(v11_f1_score, prediction, golds))


def test_normalisation_edge_cases() -> None:
    for text in ("", "   ", "!!!", ".,;:?", "the", "a an the", "The, a; AN!", "\t\n"):
        assert normalize_answer(text) == v11_normalize_answer(text) == "", text
    assert normalize_answer("The  Quick\tbrown\nfox!") == "quick brown fox"
    assert normalize_answer("the-end") == "theend"  # punctuation goes first, so no article is left
    assert normalize_answer("Ünïcödé Ω") == "ünïcödé ω"
    assert normalize_answer("x¡y¿z") == "x¡y¿z"  # only ASCII punctuation goes
    assert normalize_answer("a¡b") == "¡b"  # "¡" is not a word character: "a" stands alone, an article
    assert normalize_answer("an_apple") == "anapple"  # "_" is ASCII punctuation, gone before articles
    for text in ("x¡y¿z", "a¡b", "an_apple", "the-end", "Ünïcödé Ω"):
        assert normalize_answer(text) == v11_normalize_answer(text), text


def test_empty_predictions_and_empty_gold() -> None:
    # An empty prediction against a real answer scores 0 on both (as v1.1).
    assert score("", ["Denver Broncos"]) == (0.0, 0.0)
    assert score("the", ["Denver Broncos"]) == (0.0, 0.0)  # normalises to empty
    # An unanswerable question: the empty string is its only gold answer (v2). Predicting nothing, or
    # something that normalises to nothing, is right; anything else is wrong.
    assert gold_answers([]) == [""]
    assert score("", []) == (1.0, 1.0)
    assert score("a.", []) == (1.0, 1.0)
    assert score("Denver", []) == (0.0, 0.0)
    # Gold answers that normalise to nothing are dropped (v2's script); if all are, the question is
    # scored as unanswerable.
    assert gold_answers(["the", "Broncos"]) == ["Broncos"]
    assert gold_answers(["the", "!"]) == [""]
    assert exact_match("", "") == 1.0 and f1("", "") == 1.0


def test_v2_has_answer_and_no_answer_splits() -> None:
    answers = {
        "q1": ["Denver Broncos", "Broncos"],
        "q2": ["Santa Clara"],
        "q3": ["1990"],
        "q4": [],
        "q5": [],
    }
    predictions = {
        "q1": "Broncos",  # EM 1, F1 1
        "q2": "Santa Clara, California",  # EM 0, F1 0.8 (p 2/3, r 1)
        "q3": "",  # abstained on an answerable question: 0, 0
        "q4": "",  # abstained on an unanswerable question: 1, 1
        "q5": "Denver",  # answered an unanswerable question: 0, 0
    }
    metrics = squad_metrics(predictions, answers)
    q2_f1 = 2 * (2 / 3) * 1 / (2 / 3 + 1)  # "santa clara california" vs "santa clara": 0.8
    assert metrics["total"] == 5 and metrics["has_ans_total"] == 3 and metrics["no_ans_total"] == 2
    assert metrics["has_ans_exact_match"] == pytest.approx(1 / 3)
    assert metrics["has_ans_f1"] == pytest.approx((1 + q2_f1 + 0) / 3)
    assert metrics["no_ans_exact_match"] == pytest.approx(1 / 2)
    assert metrics["no_ans_f1"] == pytest.approx(1 / 2)
    assert metrics["exact_match"] == pytest.approx(2 / 5)
    assert metrics["f1"] == pytest.approx((1 + q2_f1 + 0 + 1 + 0) / 5)


def test_v1_data_has_no_splits_and_every_question_needs_a_prediction() -> None:
    answers = {"q1": ["red"], "q2": ["sweet", "very sweet"]}
    metrics = squad_metrics({"q1": "red", "q2": "sour"}, answers)
    assert metrics == {"exact_match": 0.5, "f1": 0.5, "total": 2.0}
    # Only unanswerable questions: the has-answer split is empty and left out.
    assert squad_metrics({"q": ""}, {"q": []}) == {
        "exact_match": 1.0,
        "f1": 1.0,
        "total": 1.0,
        "no_ans_exact_match": 1.0,
        "no_ans_f1": 1.0,
        "no_ans_total": 1.0,
    }
    with pytest.raises(ValueError, match="no prediction for 1 question"):
        squad_metrics({"q1": "red"}, answers)
