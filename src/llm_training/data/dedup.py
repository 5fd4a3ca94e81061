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

from llm_training.data.words import batch_shingles, batch_words


def exact_keys(words) -> list[bytes]:
    """Per document of a ``BatchWords``: a hash of its words in order, lower-cased, without the spaces and
    punctuation between them."""
    bounds = np.searchsorted(words.doc, np.arange(words.num_docs + 1))
    data = words.hashes
    return [
        hashlib.blake2b(data[bounds[i] : bounds[i + 1]].tobytes(), digest_size=16).digest()
        for i in range(words.num_docs)
    ]


def signatures(shingles: np.ndarray, owners: np.ndarray, num_docs: int, num_perm: int = 128) -> np.ndarray:
    """MinHash signatures (``num_docs`` x ``num_perm``, uint64) from ``words.batch_shingles`` output (sorted by
    document, then hash). A shingle goes to slot ``hash % num_perm``; within a slot, order by hash is order by
    ``hash // num_perm``, so each slot's minimum is its first shingle in sorted order."""
    empty = np.iinfo(np.uint64).max
    sig = np.full(num_docs * num_perm, empty, dtype=np.uint64)
    slots = owners * num_perm + (shingles % np.uint64(num_perm)).astype(np.int64)
    sig[slots[::-1]] = shingles[::-1] // np.uint64(num_perm)  # the last write, the smallest, wins
    sig = sig.reshape(num_docs, num_perm)
    filled = sig != empty
    rows = np.flatnonzero(~filled.all(axis=1) & filled.any(axis=1))
    if rows.size:
        # rotation densification: an empty slot takes the next filled slot's value (circularly), offset by
        # the distance, so that two documents agree there exactly when they agree on that filled slot
        sub, mask = sig[rows], filled[rows]
        position = np.where(np.concatenate([mask, mask], axis=1), np.arange(2 * num_perm), 2 * num_perm)
        nearest = np.minimum.accumulate(position[:, ::-1], axis=1)[:, ::-1][:, :num_perm]
        distance = (nearest - np.arange(num_perm)).astype(np.uint64)
        borrowed = np.take_along_axis(sub, nearest % num_perm, axis=1)
        with np.errstate(over="ignore"):
            sig[rows] = np.where(mask, sub, borrowed + distance * np.uint64(0x9E3779B97F4A7C15))
    return sig


def signature(text: str, num_perm: int = 128) -> np.ndarray:
    """The signature of one document (see ``signatures``)."""
    words = batch_words([text])
    return signatures(*batch_shingles(words), 1, num_perm)[0]


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
