"""Classification metrics: what an evaluation of a classifier reports, by scikit-learn's definitions.

Predictions from the head's logits (:func:`predict`):

- single-label: the class with the highest logit; a tie goes to the lowest class id (``argmax``);
- multi-label: every class whose probability ``sigmoid(logit)`` is at least :data:`THRESHOLD` (0.5,
  i.e. a logit ≥ 0); an example may get no class at all.

Scores (:func:`score_single_label`, :func:`score_multi_label`), over every one of the ``numLabels``
classes, also those absent from the eval data:

- ``accuracy``: the fraction of examples predicted right (multi-label: with exactly the right set of
  classes, scikit-learn's subset accuracy);
- ``precision_<name>``, ``recall_<name>``, ``f1_<name>`` per class, ``<name>`` the class's name in
  ``task.classification.labels`` (its id without names). A ratio whose denominator is 0 is 0
  (``zero_division=0``): a class never predicted has precision 0, a class with no eval example
  recall 0, and F1 is 0 when precision and recall both are;
- ``precision_macro``, ``recall_macro`` and ``f1`` (macro F1, the headline metric): the unweighted
  means of the per-class values, so a class with no eval example and no prediction counts as 0;
- multi-label also ``precision_micro``, ``recall_micro``, ``f1_micro``: from the true/false positives
  and false negatives counted over all classes together.

The confusion matrix is counts, not a metric: single-label, ``matrix[i][j]`` counts the examples of
class ``i`` predicted as class ``j`` (rows the true class, columns the prediction, both in class-id
order, ``numLabels`` by ``numLabels``); multi-label, one 2 by 2 matrix per class in class-id order,
``[[true negatives, false positives], [false negatives, true positives]]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

#: The probability from which a multi-label class is predicted (sigmoid(logit) >= THRESHOLD).
THRESHOLD = 0.5


@dataclass(frozen=True)
class Scores:
    """An evaluation's metrics (names without the ``eval_`` prefix) and its confusion matrix."""

    metrics: dict[str, float]
    #: Single-label: ``numLabels`` rows of ``numLabels`` counts; multi-label: one ``[[tn, fp], [fn, tp]]``
    #: per class (see the module docstring).
    confusion_matrix: list[list[int]] | list[list[list[int]]]


def predict(logits: np.ndarray[Any, Any], *, multi_label: bool) -> np.ndarray[Any, Any]:
    """Class ids ``[n]`` (single-label) or a 0/1 matrix ``[n, numLabels]`` (multi-label) from logits."""
    logits = np.asarray(logits)
    if multi_label:
        # sigmoid(x) >= 0.5 exactly when x >= 0; comparing the logit avoids overflow in exp.
        threshold_logit = float(np.log(THRESHOLD / (1 - THRESHOLD)))
        return (logits >= threshold_logit).astype(np.int64)
    ids: np.ndarray[Any, Any] = np.argmax(logits, axis=-1)
    return ids


def _check(n_labels: int, n_predictions: int) -> None:
    if n_labels != n_predictions:
        raise ValueError(f"{n_labels} references but {n_predictions} predictions")
    if n_labels == 0:
        raise ValueError("no examples to score")


def _per_class(
    references: Any, predictions: Any, names: Sequence[str]
) -> tuple[dict[str, float], np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    classes = list(range(len(names)))
    precision, recall, f1, _support = precision_recall_fscore_support(
        references, predictions, labels=classes, average=None, zero_division=0
    )
    metrics: dict[str, float] = {}
    for index, name in enumerate(names):
        metrics[f"precision_{name}"] = float(precision[index])
        metrics[f"recall_{name}"] = float(recall[index])
        metrics[f"f1_{name}"] = float(f1[index])
    return metrics, precision, recall, f1


def score_single_label(references: Sequence[int], predictions: Sequence[int], names: Sequence[str]) -> Scores:
    """Scores of predicted class ids against the true ones; ``names`` names every class, in id order."""
    _check(len(references), len(predictions))
    classes = list(range(len(names)))
    metrics, precision, recall, f1 = _per_class(references, predictions, names)
    metrics.update(
        accuracy=float(accuracy_score(references, predictions)),
        precision_macro=float(np.mean(precision)),
        recall_macro=float(np.mean(recall)),
        f1=float(np.mean(f1)),
    )
    matrix = confusion_matrix(references, predictions, labels=classes)
    return Scores(metrics, [[int(c) for c in row] for row in matrix])


def score_multi_label(
    references: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]], names: Sequence[str]
) -> Scores:
    """Scores of predicted 0/1 class matrices ``[n, numLabels]`` against the true ones."""
    _check(len(references), len(predictions))
    truth = np.asarray(references, dtype=np.int64).reshape(len(references), len(names))
    guess = np.asarray(predictions, dtype=np.int64).reshape(len(predictions), len(names))
    metrics, precision, recall, f1 = _per_class(truth, guess, names)
    micro_p, micro_r, micro_f1, _ = precision_recall_fscore_support(truth, guess, average="micro", zero_division=0)
    metrics.update(
        accuracy=float(accuracy_score(truth, guess)),
        precision_macro=float(np.mean(precision)),
        recall_macro=float(np.mean(recall)),
        f1=float(np.mean(f1)),
        precision_micro=float(micro_p),
        recall_micro=float(micro_r),
        f1_micro=float(micro_f1),
    )
    matrices = multilabel_confusion_matrix(truth, guess, labels=list(range(len(names))))
    return Scores(metrics, [[[int(c) for c in row] for row in m] for m in matrices])
