"""Per-document work of data preparation: clean, score, hash; a batch of documents at a time. Runs in
worker processes, so it imports only numpy and the small modules it needs (never torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_training.data.clean import clean_text
from llm_training.data.dedup import exact_keys, signatures
from llm_training.data.quality import batch_quality, quality_scores
from llm_training.data.words import batch_shingles, batch_words


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


def analyse_batch(texts: list[str], settings: FilterSettings) -> list[Analysed]:
    cleaned = [clean_text(text) for text in texts]
    present = [i for i, text in enumerate(cleaned) if text]
    out = [Analysed(None, True, 0.0, b"", None) for _ in texts]
    if not present:
        return out
    kept_texts = [cleaned[i] for i in present]
    words = batch_words(kept_texts)
    shingles, owners = batch_shingles(words)
    scores = quality_scores(batch_quality(kept_texts, words, shingles, owners))
    keys = exact_keys(words)
    sigs = signatures(shingles, owners, len(present), settings.num_perm) if settings.near_duplicates else None
    for j, i in enumerate(present):
        good = scores[j] >= settings.min_quality
        out[i] = Analysed(
            cleaned[i] if good else None,
            False,
            float(scores[j]),
            keys[j],
            sigs[j] if sigs is not None and good else None,
        )
    return out
