"""Classification metrics (finetune_trainer.scoring.classification) against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from finetune_trainer.scoring.classification import predict, score_multi_label, score_single_label

NAMES = ["neg", "neu", "pos"]


def test_single_label_with_a_class_never_predicted() -> None:
    # neg: tp 2, fp 1 (the pos example), fn 1 -> P 2/3, R 2/3, F1 2/3
    # neu: tp 2, fp 1, fn 0                   -> P 2/3, R 1,   F1 0.8
    # pos: never predicted, one example       -> P 0 (0/0), R 0, F1 0
    scores = score_single_label([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], NAMES)
    m = scores.metrics
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert (m["precision_neg"], m["recall_neg"], m["f1_neg"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (m["precision_neu"], m["recall_neu"], m["f1_neu"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (m["precision_pos"], m["recall_pos"], m["f1_pos"]) == (0.0, 0.0, 0.0)
    assert m["precision_macro"] == pytest.approx(4 / 9)
    assert m["recall_macro"] == pytest.approx(5 / 9)
    assert m["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    # Rows: the true class; columns: the prediction.
    assert scores.confusion_matrix == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert set(m) == {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1",
        *(f"{kind}_{name}" for kind in ("precision", "recall", "f1") for name in NAMES),
    }


def test_a_class_absent_from_the_eval_data_counts_as_zero_in_the_macro_mean() -> None:
    scores = score_single_label([0, 1, 1], [0, 1, 1], NAMES)
    assert scores.metrics["accuracy"] == 1.0
    assert scores.metrics["f1_pos"] == 0.0
    assert scores.metrics["f1"] == pytest.approx(2 / 3)
    assert scores.confusion_matrix == [[1, 0, 0], [0, 2, 0], [0, 0, 0]]


def test_every_prediction_wrong() -> None:
    scores = score_single_label([0, 1], [1, 0], ["a", "b"])
    assert scores.metrics["accuracy"] == 0.0
    assert scores.metrics["f1"] == 0.0
    assert scores.confusion_matrix == [[0, 1], [1, 0]]


def test_a_tie_of_logits_goes_to_the_lowest_class_id() -> None:
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [-1.0, -3.0, 5.0]])
    assert predict(logits, multi_label=False).tolist() == [0, 1, 2]


def test_multi_label_threshold_is_probability_one_half() -> None:
    # sigmoid(0) = 0.5 exactly: predicted; sigmoid(-0.01) < 0.5: not; huge logits do not overflow.
    logits = np.array([[0.0, -0.01, 3.0], [-1000.0, 1000.0, -2.0]])
    assert predict(logits, multi_label=True).tolist() == [[1, 0, 1], [0, 1, 0]]


def test_multi_label_with_empty_predictions() -> None:
    references = [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    predictions = [[1, 0, 0], [0, 0, 0], [0, 0, 0]]  # two examples get no class at all
    scores = score_multi_label(references, predictions, NAMES)
    m = scores.metrics
    # Subset accuracy: only the third example has exactly the right (empty) set.
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert (m["precision_neg"], m["recall_neg"], m["f1_neg"]) == (1.0, 1.0, 1.0)
    assert (m["precision_neu"], m["recall_neu"], m["f1_neu"]) == (0.0, 0.0, 0.0)
    assert (m["precision_pos"], m["recall_pos"], m["f1_pos"]) == (0.0, 0.0, 0.0)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["precision_macro"] == pytest.approx(1 / 3)
    # Micro: tp 1, fp 0, fn 2 over all classes.
    assert (m["precision_micro"], m["recall_micro"]) == pytest.approx((1.0, 1 / 3))
    assert m["f1_micro"] == pytest.approx(0.5)
    # Per class [[tn, fp], [fn, tp]].
    assert scores.confusion_matrix == [[[2, 0], [0, 1]], [[2, 0], [1, 0]], [[2, 0], [1, 0]]]


def test_multi_label_nothing_predicted_at_all() -> None:
    scores = score_multi_label([[1, 0], [0, 1]], [[0, 0], [0, 0]], ["a", "b"])
    assert scores.metrics["f1_micro"] == 0.0 and scores.metrics["precision_micro"] == 0.0
    assert scores.metrics["f1"] == 0.0 and scores.metrics["accuracy"] == 0.0


def test_no_examples_or_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="no examples"):
        score_single_label([], [], NAMES)
    with pytest.raises(ValueError, match="no examples"):
        score_multi_label([], [], NAMES)
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        score_single_label([0, 1], [0], NAMES)
