"""A document quality score in [0, 1] from known heuristics.

The rules follow the Gopher quality filter (Rae et al., 2021, appendix A) and C4's line filters (Raffel et
al., 2020), softened so that they give a score instead of a verdict: each rule scores 1.0 inside the range
that natural prose occupies and falls linearly to 0.0 outside it, and the document's score is the product
of the rule scores, so one badly broken property is enough to sink it.

| rule       | measures                                                  | full score            | zero at      |
|------------|-----------------------------------------------------------|-----------------------|--------------|
| length     | number of words                                           | >= 12                 | <= 2         |
| alphabetic | share of words with at least one letter (Gopher: >= 0.8)  | >= 0.8                | <= 0.5       |
| symbols    | punctuation and symbol characters / non-space characters  | <= 0.15               | >= 0.45      |
| digits     | digits / non-space characters                             | <= 0.1                | >= 0.4       |
| word length| mean word length in characters (Gopher: 3 to 10)          | 3 to 10               | 1.5, or 16   |
| repetition | share of duplicated lines, or of duplicated word 5-grams  | <= 0.3                | >= 0.7       |
|            | (Gopher: duplicate lines <= 0.3, 5-gram share <= 0.15)    |                       |              |
| lines      | share of lines that start with a bullet (Gopher <= 0.9),  | <= 0.9, <= 0.3        | 1.0, >= 0.6  |
|            | or end with an ellipsis (Gopher <= 0.3)                   |                       |              |

With ``--min-quality 0.7`` a document must be good on every rule and may be mediocre on one or two.
Scores are computed on cleaned text; ``quality_parts`` returns every rule's score for reports.
"""

from __future__ import annotations

import numpy as np

from llm_training.data.words import WordStats

_BULLETS = ("- ", "* ", "•", "·", "‣", "◦", "▪")
_ELLIPSES = ("...", "…")


def _ramp(value: float, zero: float, full: float) -> float:
    """1.0 at ``full`` and beyond, 0.0 at ``zero`` and beyond on the other side, linear between."""
    if zero == full:
        return float(value >= full)
    return float(min(1.0, max(0.0, (value - zero) / (full - zero))))


def quality_parts(text: str, stats: WordStats, sorted_shingles: np.ndarray) -> dict[str, float]:
    """Every rule's score; ``sorted_shingles``: the document's word 5-gram hashes (``shingle_hashes``), sorted."""
    words = stats.num_words
    visible = max(1, stats.num_bytes - stats.space_bytes)
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    num_lines = max(1, len(lines))
    duplicate_lines = 1.0 - len(set(lines)) / num_lines if lines else 0.0
    duplicate_shingles = 0.0
    if words >= 10:
        ordered = sorted_shingles
        duplicate_shingles = 1.0 - (1 + np.count_nonzero(ordered[1:] != ordered[:-1])) / ordered.size
    mean_word = stats.word_bytes / words if words else 0.0
    bullets = sum(1 for line in lines if line.startswith(_BULLETS)) / num_lines
    ellipses = sum(1 for line in lines if line.endswith(_ELLIPSES)) / num_lines
    return {
        "length": _ramp(words, 2, 12),
        "alphabetic": _ramp(float(stats.has_letter.mean()) if words else 0.0, 0.5, 0.8),
        "symbols": _ramp(stats.symbol_bytes / visible, 0.45, 0.15),
        "digits": _ramp(stats.digit_bytes / visible, 0.4, 0.1),
        "word_length": min(_ramp(mean_word, 1.5, 3.0), _ramp(mean_word, 16.0, 10.0)),
        "repetition": _ramp(max(duplicate_lines, duplicate_shingles), 0.7, 0.3),
        "lines": min(_ramp(bullets, 1.0, 0.9), _ramp(ellipses, 0.6, 0.3)),
    }


def quality_score(parts: dict[str, float]) -> float:
    return float(np.prod(list(parts.values())))
