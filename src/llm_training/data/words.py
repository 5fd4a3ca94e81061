"""Vectorised word statistics of a text: one pass of numpy over its UTF-8 bytes.

Quality scoring and near-duplicate signatures both need the words of every document. Splitting and hashing
them one by one in Python costs about a microsecond a word, more than the rest of preparation together, so
words are found and hashed here with array operations: a word is a run of ASCII letters, digits and
underscores or of non-ASCII bytes (most of which belong to letters), and its hash is a polynomial hash of
its bytes computed from prefix sums (uint64 arithmetic wraps, and the base is odd, so it is invertible).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_P = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2**64
_P_INV = np.uint64(pow(int(_P), -1, 2**64))


def _table(chars: str, non_ascii: bool = False) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(chars.encode("ascii"))] = True
    table[128:] = non_ascii
    return table


_ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGITS = "0123456789"
WORD_BYTES = _table(_ASCII_LETTERS + _DIGITS + "_", non_ascii=True)
LETTER_BYTES = _table(_ASCII_LETTERS, non_ascii=True)
DIGIT_BYTES = _table(_DIGITS)
SPACE_BYTES = _table(" \t\n\r\f\v")
# printable ASCII that is neither a letter, a digit nor a space: punctuation and symbols
SYMBOL_BYTES = ~(WORD_BYTES | SPACE_BYTES) & _table("".join(map(chr, range(33, 127))))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads similar inputs over all 64 bits (for binning and minima)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_POWERS = np.ones(1, dtype=np.uint64)
_INVERSE = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i for i < n, computed once per process and grown on demand."""
    global _POWERS, _INVERSE
    if _POWERS.size < n:
        size = max(n, 2 * _POWERS.size, 1 << 16)
        _POWERS, _INVERSE = np.full(size, _P, dtype=np.uint64), np.full(size, _P_INV, dtype=np.uint64)
        _POWERS[0] = _INVERSE[0] = 1
        with np.errstate(over="ignore"):
            np.cumprod(_POWERS, out=_POWERS)
            np.cumprod(_INVERSE, out=_INVERSE)
    return _POWERS, _INVERSE


@dataclass
class WordStats:
    hashes: np.ndarray  # uint64, one per word, of the lower-cased word
    has_letter: np.ndarray  # bool, one per word
    num_bytes: int  # UTF-8 bytes of the text
    letter_bytes: int
    digit_bytes: int
    symbol_bytes: int
    space_bytes: int
    word_bytes: int  # bytes inside words

    @property
    def num_words(self) -> int:
        return int(self.hashes.size)


def word_stats(text: str) -> WordStats:
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    n = data.size
    is_word = WORD_BYTES[data]
    counts = np.bincount(data, minlength=256)
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    powers, inverse = _powers(n + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((data + np.uint64(1)) * powers[:n], out=prefix[1:])
        # the hash of bytes [s, e) is (prefix[e] - prefix[s]) / P**s; the length is mixed in as well
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts] + (ends - starts).astype(np.uint64)
    has_letter = (
        np.logical_or.reduceat(LETTER_BYTES[data], starts) if starts.size else np.zeros(0, dtype=bool)
    )
    return WordStats(
        hashes=hashes,
        has_letter=has_letter,
        num_bytes=n,
        letter_bytes=int(counts[LETTER_BYTES].sum()),
        digit_bytes=int(counts[DIGIT_BYTES].sum()),
        symbol_bytes=int(counts[SYMBOL_BYTES].sum()),
        space_bytes=int(counts[SPACE_BYTES].sum()),
        word_bytes=int((ends - starts).sum()),
    )


def shingle_hashes(hashes: np.ndarray, size: int) -> np.ndarray:
    """Mixed hashes of every run of ``size`` consecutive words (all words when there are fewer)."""
    size = max(1, min(size, hashes.size))
    if hashes.size == 0:
        return hashes
    count = hashes.size - size + 1
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(size):
            combined = combined * _P + hashes[i : i + count]
    return mix64(combined)
