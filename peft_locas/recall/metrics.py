"""LoCoMo's official question-answering score (token F1 per category), and the mean's uncertainty.

Reproduces ``eval_question_answering`` of snap-research/LoCoMo, ``task_eval/evaluation.py`` (Maharana et al., ACL
2024), so numbers compare with the paper and with systems scored by that code:

- normalisation: drop commas, lower-case, remove ASCII punctuation, remove the words ``a``, ``an``, ``the`` *and*
  ``and`` (the original's regex includes ``and``), collapse whitespace; then each token is Porter-stemmed (nltk's
  ``PorterStemmer`` in its default mode) and F1 is taken on the bag of stems (0 when nothing is shared).
- category 1 (multi-hop): the gold answer and the prediction are both split on commas; the score is the mean, over
  gold parts, of the best F1 of any prediction part.
- category 3 (open-domain): only the gold answer's first ``;``-separated part counts (the rest is its rationale).
- categories 2 (temporal) and 4 (single-hop): plain F1.
- category 5 (adversarial): 1 when the prediction contains "no information available" or "not mentioned"
  (case-insensitive, exactly the original's two phrases), else 0; the gold answer is not used.

Category names follow the data README (and the original code's ``CATEGORY_MAPPING``): 1 multi-hop, 2 temporal,
3 open-domain, 4 single-hop, 5 adversarial. Re-implementations disagree on these names (some read them off the column
order of the paper's results table and call id 1 single-hop or id 3 multi-hop); we follow the data README, so report
scores with this mapping stated.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

__all__ = [
    "ADVERSARIAL_PHRASES",
    "CATEGORIES",
    "bootstrap_interval",
    "locomo_f1",
    "mean_with_stderr",
    "normalize_answer",
    "token_f1",
]

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL_PHRASES = ("no information available", "not mentioned")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")


def normalize_answer(text: str | int | float) -> str:
    """LoCoMo's answer normalisation (module docstring); numbers are first written as ``str(text)``."""
    text = str(text).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str | int | float, gold: str | int | float) -> float:
    """F1 in [0, 1] between the bags of Porter stems of the normalised prediction and gold answer; 0.0 when they share
    no stem (also when either is empty after normalisation)."""
    predicted = _stems(prediction)
    expected = _stems(gold)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted)
    recall = shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(prediction: str, gold: str | int | float | None, category: int | None) -> float:
    """LoCoMo's score in [0, 1] of one prediction for a question of ``category`` (rules in the module docstring).

    ``gold`` may be a number (LoCoMo stores some years as ints) and is ignored for category 5 (where it may be None).
    ``category`` None (a question outside LoCoMo) is scored with plain `token_f1`.

    Raises:
        TypeError: ``prediction`` is not a string.
        ValueError: ``category`` is not 1-5 or None, or ``gold`` is None for a category that needs it.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"locomo_f1: the prediction must be a string, got {type(prediction).__name__}")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"locomo_f1: unknown LoCoMo category {category!r}; expected one of 1-5 (see CATEGORIES)")
    if category == 5:
        lowered = prediction.lower()
        return 1.0 if any(phrase in lowered for phrase in ADVERSARIAL_PHRASES) else 0.0
    if gold is None:
        raise ValueError(f"locomo_f1: category {category} needs a gold answer, got None")
    gold = str(gold)
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        predictions = [part.strip() for part in prediction.split(",")]
        golds = [part.strip() for part in gold.split(",")]
        return float(np.mean([max(token_f1(p, g) for p in predictions) for g in golds]))
    return token_f1(prediction, gold)


def mean_with_stderr(values: Iterable[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error ``std(ddof=1) / sqrt(n)`` (0.0 when n < 2).

    Raises:
        ValueError: no values.
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_with_stderr: no values; score at least one question")
    if array.size < 2:
        return float(array[0]), 0.0
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def bootstrap_interval(
    values: Iterable[float], level: float = 0.95, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``: ``samples`` resamples with replacement
    (numpy ``default_rng(seed)``, so the same inputs give the same interval), and the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of their means.

    Raises:
        ValueError: no values, ``level`` outside (0, 1), or ``samples`` < 1.
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("bootstrap_interval: no values; score at least one question")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_interval: level {level} is not in (0, 1); use e.g. 0.95")
    if samples < 1:
        raise ValueError(f"bootstrap_interval: samples {samples} < 1; use e.g. 2000")
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(samples, array.size))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _stems(text: str | int | float) -> list[str]:
    stem = _stemmer().stem
    return [stem(token) for token in normalize_answer(text).split()]


@lru_cache(maxsize=1)
def _stemmer():
    # Imported on first use: importing nltk costs most of a second, and only scoring needs it.
    from nltk.stem import PorterStemmer

    return PorterStemmer()
