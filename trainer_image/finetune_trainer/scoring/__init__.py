"""Task metrics computed on the eval data: one module per task family, each a pure function of the
references and the predictions (no model, no Trainer), so it is checked against hand-computed cases.

- :mod:`.classification`: accuracy, precision/recall/F1 (macro and per class) and the confusion
  matrix; multi-label: micro/macro F1 and per label (scikit-learn's definitions).
- :mod:`.squad`: exact match and F1 of extractive QA answers, by the official SQuAD evaluation.
"""
