"""Vectorised word statistics of a batch of texts: a few numpy passes over their UTF-8 bytes.

Quality scoring and near-duplicate signatures both need the words of every document. Splitting and hashing
them one by one in Python costs about a microsecond a word, and numpy calls per document cost tens of
microseconds, which dominate on short documents; so a whole batch of documents is processed at once. A word
is a run of ASCII letters, digits and underscores or of non-ASCII bytes (most of which belong to letters);
its hash is a polynomial hash of its lower-cased bytes computed from prefix sums (uint64 arithmetic wraps,
and the base is odd, so it is invertible). Documents are joined with a newline, which no word crosses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_P = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2**64
_P_INV = np.uint64(pow(int(_P), -1, 2**64))
SHINGLE_WORDS = 5
MAX_BATCH_DOCS = 4096


def _table(chars: str, non_ascii: bool = False) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(chars.encode("ascii"))] = True
    table[128:] = non_ascii
    return table


_ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGITS = "0123456789"
WORD_BYTES = _table(_ASCII_LETTERS + _DIGITS + "_", non_ascii=True)
LETTER_BYTES = _table(_ASCII_LETTERS, non_ascii=True)
# byte classes counted per document: 1 letter, 2 digit, 3 space, 4 symbol (printable ASCII punctuation)
_CLASS = np.zeros(256, dtype=np.int8)
_CLASS[LETTER_BYTES] = 1
_CLASS[_table(_DIGITS)] = 2
_CLASS[_table(" \t\n\r\f\v")] = 3
_CLASS[~(WORD_BYTES | _table(" \t\n\r\f\v")) & _table("".join(map(chr, range(33, 127))))] = 4

_POWERS = np.ones(1, dtype=np.uint64)
_INVERSE = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i for i < n, computed once per process and grown on demand."""
    global _POWERS, _INVERSE
    if _POWERS.size < n:
        size = max(n, 2 * _POWERS.size, 1 << 20)
        _POWERS, _INVERSE = np.full(size, _P, dtype=np.uint64), np.full(size, _P_INV, dtype=np.uint64)
        _POWERS[0] = _INVERSE[0] = 1
        with np.errstate(over="ignore"):
            np.cumprod(_POWERS, out=_POWERS)
            np.cumprod(_INVERSE, out=_INVERSE)
    return _POWERS, _INVERSE


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads similar inputs over all 64 bits (for binning and minima)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass
class BatchWords:
    """Words and byte counts of ``num_docs`` documents; word arrays are in document order."""

    num_docs: int
    hashes: np.ndarray  # uint64 per word
    doc: np.ndarray  # document index per word
    has_letter: np.ndarray  # bool per word
    lengths: np.ndarray  # bytes per word
    num_bytes: np.ndarray  # per document: UTF-8 bytes
    letters: np.ndarray  # per document: bytes of each class
    digits: np.ndarray
    spaces: np.ndarray
    symbols: np.ndarray

    @property
    def words_per_doc(self) -> np.ndarray:
        return np.bincount(self.doc, minlength=self.num_docs)

    def doc_hashes(self, index: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.doc, [index, index + 1])
        return self.hashes[lo:hi]


def batch_words(texts: list[str]) -> BatchWords:
    encoded = [t.lower().encode("utf-8") for t in texts]
    sizes = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
    doc_starts = np.concatenate(([0], np.cumsum(sizes + 1)[:-1])) if texts else np.zeros(0, np.int64)
    n = data.size
    is_word = WORD_BYTES[data]
    edges = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    powers, inverse = _powers(n + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((data + np.uint64(1)) * powers[:n], out=prefix[1:])
        # the hash of bytes [s, e) is (prefix[e] - prefix[s]) / P**s; the length is mixed in as well
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts] + (ends - starts).astype(np.uint64)
    has_letter = np.logical_or.reduceat(LETTER_BYTES[data], starts) if starts.size else np.zeros(0, bool)
    classes = _CLASS[data]
    doc_of_byte = np.repeat(np.arange(len(texts)), sizes + 1)[:n]
    counts = np.bincount(doc_of_byte * 5 + classes, minlength=len(texts) * 5).reshape(-1, 5)
    counts[:-1, 3] -= 1  # the newline that joins each document to the next
    return BatchWords(
        num_docs=len(texts),
        hashes=hashes,
        doc=np.searchsorted(doc_starts, starts, side="right") - 1,
        has_letter=has_letter,
        lengths=ends - starts,
        num_bytes=sizes,
        letters=counts[:, 1],
        digits=counts[:, 2],
        spaces=counts[:, 3],
        symbols=counts[:, 4],
    )


def _fold(hashes: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Mixed polynomial hash of the ``width`` word hashes from each of ``starts``."""
    value = np.zeros(starts.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(width):
            value = value * _P + hashes[starts + i]
    return mix64(value)


def batch_shingles(words: BatchWords, size: int = SHINGLE_WORDS) -> tuple[np.ndarray, np.ndarray]:
    """(52-bit hashes, document index) of every run of ``size`` consecutive words within a document, sorted
    by document then hash; a document with fewer words has one shingle of all of them. At most 4,096
    documents a batch (the document index takes the top 12 bits of the sort key)."""
    if words.num_docs > MAX_BATCH_DOCS:
        raise ValueError(f"at most {MAX_BATCH_DOCS} documents a batch, got {words.num_docs}")
    h, doc = words.hashes, words.doc
    starts = np.arange(max(0, h.size - size + 1))
    valid = doc[starts] == doc[starts + size - 1]  # runs inside one document
    shingles, owners = [_fold(h, starts[valid], size)], [doc[starts[valid]]]
    per_doc = words.words_per_doc
    first = np.concatenate(([0], np.cumsum(per_doc)[:-1]))
    for width in range(1, size):  # documents with fewer words than a shingle: one shingle of all of them
        short = np.flatnonzero(per_doc == width)
        shingles.append(_fold(h, first[short], width))
        owners.append(short)
    # one sort of (document << 52 | top 52 bits of the hash) instead of a slower two-key lexsort
    keys = (np.concatenate(owners).astype(np.uint64) << np.uint64(52)) | (
        np.concatenate(shingles) >> np.uint64(12)
    )
    keys.sort()
    return keys & np.uint64((1 << 52) - 1), (keys >> np.uint64(52)).astype(np.int64)
