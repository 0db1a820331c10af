"""BLEU and ROUGE of generated text against references, by sacreBLEU and Google's rouge-score.

What the ``bleu`` and ``rouge`` evaluation metrics (``spec.training.evaluation.metrics``) and ``finetune
predict`` of the causal-LM recipe report, over (generation, reference) pairs:

- ``bleu``: sacreBLEU's corpus BLEU (``sacrebleu.metrics.BLEU`` with its defaults: 4-grams, the ``13a``
  tokenizer, exponential smoothing off, case-sensitive), one reference per generation, on sacreBLEU's
  scale 0-100. Corpus BLEU adds up the n-gram statistics of every pair before taking the geometric
  mean, so it depends on the set of pairs, never on their order (nor on how ranks split them).
- ``rouge``: ROUGE-1, ROUGE-2 and ROUGE-L (longest common subsequence, per text; not ``rougeLsum``)
  F-measures by ``rouge_score.rouge_scorer.RougeScorer`` (no stemming), each the mean over the pairs,
  0-1; reported as ``rouge1``, ``rouge2`` and ``rougeL``. ROUGE-L is the headline: early stopping on
  ``rouge`` watches ``rougeL``. rouge-score's tokenizer lower-cases and keeps ASCII letters and digits
  only: text in other scripts has no ROUGE tokens (it scores 0), where BLEU still counts it.

Both are the libraries' own definitions, unchanged: tests/trainer/test_generation_metrics.py calls the
libraries directly on the same pairs and expects the same numbers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

#: The ROUGE variants ``rouge`` reports (rouge-score's names); the last is the headline.
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
#: The key of each evaluation metric that early stopping watches (without the ``eval_`` prefix).
HEADLINE = {"bleu": "bleu", "rouge": "rougeL"}


def _bleu_metric(*, sentence: bool = False) -> Any:
    from sacrebleu.metrics.bleu import BLEU

    # Sentence BLEU (one pair, for a sample's own score) uses the effective n-gram order, as sacreBLEU
    # recommends: a short sentence without a matching 4-gram is not 0 for that alone.
    return BLEU(effective_order=True) if sentence else BLEU()


def corpus_bleu(generations: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU's corpus BLEU (0-100) of the generations, each against its one reference."""
    _same_length(generations, references)
    return float(_bleu_metric().corpus_score(list(generations), [list(references)]).score)


def sentence_bleu(generation: str, reference: str) -> float:
    """sacreBLEU's sentence BLEU (0-100, effective order) of one generation: a sample's own score."""
    return float(_bleu_metric(sentence=True).sentence_score(generation, [reference]).score)


def rouge_pairs(generations: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """The ROUGE-1/2/L F-measures (0-1) of each generation against its reference."""
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]  # no type hints

    _same_length(generations, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    pairs = []
    for generation, reference in zip(generations, references, strict=True):
        scores = scorer.score(reference, generation)  # rouge-score takes (target, prediction)
        pairs.append({name: float(scores[name].fmeasure) for name in ROUGE_TYPES})
    return pairs


def rouge(generations: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``rouge1``, ``rouge2``, ``rougeL``: the mean F-measures over the pairs (0-1)."""
    pairs = rouge_pairs(generations, references)
    if not pairs:
        return {}
    return {name: sum(p[name] for p in pairs) / len(pairs) for name in ROUGE_TYPES}


def generation_metrics(
    generations: Sequence[str], references: Sequence[str], metrics: Collection[str]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The scores of the pairs for the asked ``metrics`` (``bleu``, ``rouge``), and each pair's own
    (sentence BLEU, ROUGE-L) for the samples a person reads: ``({"bleu": .., "rouge1": .., "rouge2": ..,
    "rougeL": ..}, [{"bleu": .., "rougeL": ..}, ...])``. Nothing for no pairs."""
    _same_length(generations, references)
    if not generations:
        return {}, []
    scores: dict[str, float] = {}
    each: list[dict[str, float]] = [{} for _ in generations]
    if "bleu" in metrics:
        scores["bleu"] = corpus_bleu(generations, references)
        for own, generation, reference in zip(each, generations, references, strict=True):
            own["bleu"] = sentence_bleu(generation, reference)
    if "rouge" in metrics:
        pairs = rouge_pairs(generations, references)
        scores.update({name: sum(p[name] for p in pairs) / len(pairs) for name in ROUGE_TYPES})
        for own, pair in zip(each, pairs, strict=True):
            own["rougeL"] = pair["rougeL"]
    return scores, each


def _same_length(generations: Sequence[str], references: Sequence[str]) -> None:
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
