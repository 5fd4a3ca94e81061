"""Per-document work of data preparation: clean, score, hash. Runs in worker processes, so it imports
only numpy and the small modules it needs (never torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_training.data.clean import clean_text
from llm_training.data.dedup import SHINGLE_WORDS, exact_key, signature
from llm_training.data.quality import quality_parts, quality_score
from llm_training.data.words import shingle_hashes, word_stats


@dataclass(frozen=True)
class FilterSettings:
    min_quality: float = 0.0
    near_duplicates: bool = False
    num_perm: int = 128


@dataclass
class Analysed:
    text: str | None  # cleaned text; None when empty or below the quality bar (not needed any more)
    empty: bool
    quality: float
    key: bytes  # exact-duplicate key
    signature: np.ndarray | None  # MinHash signature when near-duplicate detection is on


def analyse(text: str, settings: FilterSettings) -> Analysed:
    cleaned = clean_text(text)
    if not cleaned:
        return Analysed(None, True, 0.0, b"", None)
    stats = word_stats(cleaned)
    shingles = np.sort(shingle_hashes(stats.hashes, SHINGLE_WORDS))
    score = quality_score(quality_parts(cleaned, stats, shingles))
    if score < settings.min_quality:
        return Analysed(None, False, score, b"", None)
    sig = signature(shingles, settings.num_perm) if settings.near_duplicates else None
    return Analysed(cleaned, False, score, exact_key(stats.hashes), sig)


def analyse_batch(texts: list[str], settings: FilterSettings) -> list[Analysed]:
    return [analyse(text, settings) for text in texts]
