"""A document quality score in [0, 1] from known heuristics.

The rules follow the Gopher quality filter (Rae et al., 2021, appendix A) and C4's line filters (Raffel et
al., 2020), softened so that they give a score instead of a verdict: each rule scores 1.0 inside the range
that natural prose occupies and falls linearly to 0.0 outside it, and the document's score is the product
of the rule scores, so one badly broken property is enough to sink it.

| rule        | measures                                                  | full score       | zero at        |
|-------------|-----------------------------------------------------------|------------------|----------------|
| length      | number of words                                           | >= 12            | <= 2           |
| alphabetic  | share of words with at least one letter (Gopher: >= 0.8)  | >= 0.8           | <= 0.5         |
| symbols     | punctuation and symbol characters / non-space characters  | <= 0.15          | >= 0.45        |
| digits      | digits / non-space characters                             | <= 0.1           | >= 0.4         |
| word_length | mean word length in bytes (Gopher: 3 to 10)               | 3 to 10          | 1.5, or 16     |
| repetition  | share of duplicated lines, or of duplicated word 5-grams  | <= 0.3           | >= 0.7         |
|             | (Gopher: duplicate lines <= 0.3, 5-gram share <= 0.15)    |                  |                |
| lines       | share of lines that start with a bullet (Gopher <= 0.9),  | <= 0.9, <= 0.3   | 1.0, >= 0.6    |
|             | or end with an ellipsis (Gopher <= 0.3)                   |                  |                |

With ``--min-quality 0.7`` a document must be good on every rule and may be mediocre on one or two.
Scores are computed on cleaned text, a batch of documents at a time (``words.batch_words``).
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from llm_training.data.words import BatchWords, batch_shingles, batch_words

RULES = ("length", "alphabetic", "symbols", "digits", "word_length", "repetition", "lines")
_BULLETS = ("- ", "* ", "•", "·", "‣", "◦", "▪")
_ELLIPSES = ("...", "…")


def _ramp(value: np.ndarray, zero: float, full: float) -> np.ndarray:
    """1.0 at ``full`` and beyond, 0.0 at ``zero`` and beyond on the other side, linear between."""
    return np.clip((np.asarray(value, dtype=np.float64) - zero) / (full - zero), 0.0, 1.0)


def _line_features(text: str) -> tuple[float, float, float]:
    """(duplicate line share, bullet line share, ellipsis line share) among non-blank lines."""
    lines = list(filter(None, map(str.strip, text.split("\n"))))  # C-level loops: this runs per document
    if not lines:
        return 0.0, 0.0, 0.0
    n = len(lines)
    bullets = sum(map(str.startswith, lines, repeat(_BULLETS, n)))
    ellipses = sum(map(str.endswith, lines, repeat(_ELLIPSES, n)))
    return 1.0 - len(set(lines)) / n, bullets / n, ellipses / n


def batch_quality(
    texts: list[str], words: BatchWords, shingles: np.ndarray, owners: np.ndarray
) -> dict[str, np.ndarray]:
    """Every rule's score for every document; ``shingles``/``owners`` from ``batch_shingles``."""
    n = words.num_docs
    per_doc = words.words_per_doc
    safe = np.maximum(per_doc, 1)
    visible = np.maximum(words.num_bytes - words.spaces, 1)
    alpha = np.bincount(words.doc, weights=words.has_letter, minlength=n) / safe
    mean_word = np.bincount(words.doc, weights=words.lengths, minlength=n) / safe
    repeats = np.zeros(shingles.size, dtype=bool)
    repeats[1:] = (shingles[1:] == shingles[:-1]) & (owners[1:] == owners[:-1])
    shingle_count = np.maximum(np.bincount(owners, minlength=n), 1)
    duplicate_shingles = np.where(
        per_doc >= 10, np.bincount(owners, weights=repeats, minlength=n) / shingle_count, 0
    )
    lines = np.array([_line_features(t) for t in texts], dtype=np.float64).reshape(n, 3)
    return {
        "length": _ramp(per_doc, 2, 12),
        "alphabetic": np.where(per_doc > 0, _ramp(alpha, 0.5, 0.8), 0.0),
        "symbols": _ramp(words.symbols / visible, 0.45, 0.15),
        "digits": _ramp(words.digits / visible, 0.4, 0.1),
        "word_length": np.minimum(_ramp(mean_word, 1.5, 3.0), _ramp(mean_word, 16.0, 10.0)),
        "repetition": _ramp(np.maximum(lines[:, 0], duplicate_shingles), 0.7, 0.3),
        "lines": np.minimum(_ramp(lines[:, 1], 1.0, 0.9), _ramp(lines[:, 2], 0.6, 0.3)),
    }


def quality_scores(parts: dict[str, np.ndarray]) -> np.ndarray:
    return np.prod(np.stack([parts[rule] for rule in RULES]), axis=0)


def quality_parts(text: str) -> dict[str, float]:
    """Every rule's score for one (cleaned) document."""
    words = batch_words([text])
    parts = batch_quality([text], words, *batch_shingles(words))
    return {rule: float(value[0]) for rule, value in parts.items()}


def quality_score(text: str) -> float:
    parts = quality_parts(text)
    return float(quality_scores({rule: np.asarray(value) for rule, value in parts.items()}))
