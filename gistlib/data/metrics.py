"""Generation metrics of the Super-NaturalInstructions protocol, each the best over the references.

- exact match after lowercasing, removing punctuation and collapsing whitespace;
- ROUGE-L F-measure from the `rouge-score` package with the Porter stemmer.
`score_predictions` averages both over a list and reports them in percent, as the SNI paper does.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCT).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure (0..1) of `prediction` against the references."""
    return max((_scorer().score(r, prediction)["rougeL"].fmeasure for r in references), default=0.0)


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{'exact_match': %, 'rougeL': %} averaged over examples (0..100)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    n = max(len(predictions), 1)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references))
    return {"exact_match": 100.0 * em / n, "rougeL": 100.0 * rl / n}
