"""Exact and near-duplicate detection.

Exact: a BLAKE2 hash of the document's sequence of lower-cased words (``words.word_stats``), so copies that
differ only in case, spacing or punctuation count as one.

Near: MinHash signatures over word 5-grams with locality-sensitive hashing (Broder 1997; the banding of
Leskovec, Rajaraman and Ullman, "Mining of Massive Datasets", ch. 3). A signature has ``num_perm`` slots;
two documents agree on a slot with probability equal to the Jaccard similarity of their 5-gram sets. The
signature is computed by one-permutation hashing with rotation densification (Shrivastava and Li, 2014):
one hash per shingle, binned by its top bits, the minimum of each bin kept. That needs a single vectorised
pass per document, where classic MinHash needs ``num_perm`` hashes per shingle; ``datasketch``, the usual
library, measured 2.5 MB/s here for its signatures and 100 microseconds a document for its LSH queries,
too slow for the data preparation target, so the banding below is written for this pipeline: bands of
``rows`` slots, chosen for the threshold like datasketch does (minimising the weighted false positive and
false negative areas under the S-curve), candidates confirmed by their estimated Jaccard similarity.
"""

from __future__ import annotations

import hashlib

import numpy as np

SHINGLE_WORDS = 5


def exact_key(word_hashes: np.ndarray) -> bytes:
    """The document's words in order, lower-cased, without the spaces and punctuation between them."""
    return hashlib.blake2b(word_hashes.tobytes(), digest_size=16).digest()


def signature(sorted_shingles: np.ndarray, num_perm: int = 128) -> np.ndarray:
    """A MinHash signature (uint64, ``num_perm`` slots) from the sorted hashes of a document's word 5-grams.

    A shingle goes to slot ``hash % num_perm``; within a slot, order by hash is order by ``hash // num_perm``,
    so each slot's minimum is its first shingle in sorted order.
    """
    empty = np.iinfo(np.uint64).max
    sig = np.full(num_perm, empty, dtype=np.uint64)
    if sorted_shingles.size == 0:
        return sig
    bins = (sorted_shingles % np.uint64(num_perm)).astype(np.intp)
    sig[bins[::-1]] = sorted_shingles[::-1] // np.uint64(num_perm)  # the last write, the smallest, wins
    missing = sig == empty
    if not missing.any():
        return sig
    # rotation densification: an empty slot borrows the next filled slot's value, offset by the distance
    filled = np.flatnonzero(~missing)
    slots = np.flatnonzero(missing)
    nearest = np.searchsorted(filled, slots) % filled.size
    distance = (filled[nearest] - slots) % num_perm
    with np.errstate(over="ignore"):
        sig[slots] = sig[filled[nearest]] + distance.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return sig


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted areas of false positives below and false negatives above."""
    grid = np.linspace(0.0, 1.0, 1001)
    step = grid[1] - grid[0]
    below, above = grid <= threshold, grid > threshold
    best, best_cost = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        hit = 1.0 - (1.0 - grid**rows) ** bands  # probability that a pair of this similarity is a candidate
        cost = (fp_weight * hit[below].sum() + (1 - fp_weight) * (1 - hit[above]).sum()) * step
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best


class NearDuplicateIndex:
    """Signatures of kept documents in LSH bands; ``find`` returns the first similar one, if any.

    Memory per document: one compact copy of the signature (16 bits a slot, enough to estimate similarity)
    and one dictionary entry per band.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self.compact = np.zeros((1024, num_perm), dtype=np.uint16)
        self.keys: list[str] = []

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        used = sig[: self.bands * self.rows].reshape(self.bands, self.rows)
        return [hash(band.tobytes()) for band in used]

    def find(self, sig: np.ndarray) -> tuple[str, float] | None:
        """The key of a kept document whose estimated similarity is at least the threshold, and that similarity."""
        compact = sig.astype(np.uint16)
        seen = set()
        for table, key in zip(self.tables, self._band_keys(sig), strict=True):
            index = table.get(key)
            if index is None or index in seen:
                continue
            seen.add(index)
            similarity = float(np.mean(self.compact[index] == compact))
            if similarity >= self.threshold:
                return self.keys[index], similarity
        return None

    def add(self, key: str, sig: np.ndarray) -> None:
        index = len(self.keys)
        if index == self.compact.shape[0]:
            self.compact = np.concatenate([self.compact, np.zeros_like(self.compact)])
        self.compact[index] = sig.astype(np.uint16)
        self.keys.append(key)
        for table, band in zip(self.tables, self._band_keys(sig), strict=True):
            table.setdefault(band, index)
