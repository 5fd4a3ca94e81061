"""Statistics and checks of a prepared-data folder (what ``llm-validate-data`` and ``llm-analyze-data`` show).

Memory stays bounded by the number of documents, never by the number of tokens: shards are read through
``np.memmap`` in chunks (sha256 and ``np.bincount`` in one pass), documents through their table
(``<split>_documents.npy``, opened memory-mapped), and a duplicate is found by a 16-byte blake2b digest of
each document's token ids (its end-of-text token left out), so equal token sequences, and only those, match.

:func:`validate` runs the named checks and returns :class:`Finding` lines, PASS, WARN, FAIL or SKIP:

- ``integrity`` (always first): manifests, tokenizer (fingerprint, size, end-of-text id), shard files (present,
  ``size == num_tokens * itemsize``, sha256), every id below the vocabulary size, one end-of-text token per
  document, the document table (rows, contiguous offsets, token and byte sums, each row ending on end-of-text).
  When a shard or the table cannot be read safely the other checks are skipped.
- ``quality``: mean quality score of the kept documents, and the share below ``min_quality``.
- ``distribution``: validation split present, bytes per token of the splits within a factor, no token
  dominating, Jensen-Shannon divergence of the splits' unigram distributions, document-length outliers.
- ``duplicates``: validation documents equal to a training document (contamination: FAIL on any), exact
  duplicates within each split.

The defaults of :class:`Thresholds` are documented there and in ``llm-validate-data --help``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llm_training.data.prepare import DOCUMENT_DTYPE, SPLITS, read_manifest
from llm_training.errors import DataError
from llm_training.limits import read_json_file

CHECKS = ("integrity", "quality", "distribution", "duplicates")
STATUSES = ("PASS", "WARN", "FAIL", "SKIP")
CHUNK_TOKENS = (
    1 << 22
)  # tokens per bincount / sha256 step: 4 Mi tokens = 8 to 16 MB of shard, 32 MB of counts
_EXAMPLES = 5
_ROWS = 1 << 16  # document-table rows handled at once
_DIGEST = np.dtype((np.void, 16))


@dataclass
class Thresholds:
    """Limits of :func:`validate`; each default suits ordinary prepared text (see ``llm-validate-data --help``)."""

    # a document scoring below this is "low quality" (scores: data/quality.py)
    min_quality: float = 0.5
    # FAIL when a larger share of the kept documents is low quality (raw fortunes: 10%, other corpora: 0%)
    max_low_quality_fraction: float = 0.2
    # FAIL when the mean score of the kept documents is lower (the shared corpora: 0.87 to 1.0)
    min_mean_quality: float = 0.5
    # FAIL when a larger share of a split's documents repeats an earlier one exactly (WARN on any)
    max_duplicate_fraction: float = 0.01
    # FAIL when one token id is a larger share of a split's tokens (natural text: 2% to 6%)
    max_token_share: float = 0.2
    # FAIL when the Jensen-Shannon divergence (bits) of the train and validation unigram distributions is
    # above this and above twice the divergence of a same-size random sample of training documents from the
    # rest of train (sampling noise). Hash splits of one corpus: 0.004 to 0.035; two different corpora:
    # 0.08 to 0.17 (vocabularies of 512 to 1,000)
    max_js_divergence: float = 0.05
    # FAIL when one split's text bytes per token exceed the other's by more than this factor (hash splits of
    # one corpus: within 1.02; fortunes against the Bible: 1.58)
    max_bytes_per_token_ratio: float = 1.25
    # a document whose log length lies more than this many robust standard deviations from the median
    outlier_z: float = 3.5
    # WARN when a larger share of a split's documents are length outliers
    max_length_outlier_fraction: float = 0.01


@dataclass
class Finding:
    check: str
    name: str
    status: str
    message: str
    value: float | None = None
    threshold: float | None = None

    def line(self) -> str:
        return f"{self.status:<4} {self.check}/{self.name}: {self.message}"


# ------------------------------------------------------------------------------------------ the folder
class Split:
    """One split of a prepared folder: its manifest, shards (memory-mapped) and document table."""

    def __init__(self, manifest: dict, folder: Path) -> None:
        self.manifest, self.folder = manifest, folder
        self.name: str = manifest.get("split", "?")
        try:
            self.dtype = np.dtype(manifest.get("dtype", ""))
        except TypeError:
            self.dtype = None
        self._scan: dict | None = None
        self._hashes: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.manifest.get("num_tokens", 0))

    @property
    def num_documents(self) -> int:
        return int(self.manifest.get("num_documents", 0))

    @property
    def num_bytes(self) -> int:
        return int(self.manifest.get("num_bytes", 0))

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest.get("shards") or [])

    @property
    def table_path(self) -> Path:
        return self.folder / self.manifest.get("documents", f"{self.name}_documents.npy")

    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memory map (empty shards give an empty array)."""
        info = self.shards[index]
        count = int(info["num_tokens"])
        if count == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.folder / info["path"], dtype=self.dtype, mode="r", shape=(count,))

    def table(self) -> np.ndarray:
        """The document table, memory-mapped (one row per document: shard, offset, num_tokens, ...)."""
        try:
            return np.load(self.table_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.table_path}: cannot read the document table ({exc})") from None

    def scan(self, checksums: bool = True) -> dict:
        """One pass over every shard: token counts (``np.bincount``) and, if asked, each shard's sha256."""
        if self._scan is not None and (self._scan["sha256"] is not None or not checksums):
            return self._scan
        vocab = int(self.manifest.get("vocab_size", 0))
        counts = np.zeros(max(vocab, 1), dtype=np.int64)
        digests: list[str] | None = [] if checksums else None
        for index in range(len(self.shards)):
            tokens = self.shard(index)
            hasher = hashlib.sha256()
            for start in range(0, tokens.size, CHUNK_TOKENS):
                chunk = np.asarray(tokens[start : start + CHUNK_TOKENS])
                if checksums:
                    hasher.update(chunk.data)
                part = np.bincount(chunk, minlength=counts.size)
                if part.size > counts.size:
                    counts = np.concatenate([counts, np.zeros(part.size - counts.size, dtype=np.int64)])
                counts += part
            if digests is not None:
                digests.append(hasher.hexdigest())
            del tokens
        self._scan = {"counts": counts, "sha256": digests}
        return self._scan

    def document_hashes(self) -> np.ndarray:
        """A 16-byte blake2b digest of each document's ids (end-of-text excluded), in table order, as one
        ``|V16`` array (16 bytes per document; the table is read in blocks of rows)."""
        if self._hashes is None:
            table = self.table()
            itemsize = self.dtype.itemsize
            hashes = np.zeros(table.size, dtype=_DIGEST)
            view, current = None, -1
            for first in range(0, table.size, _ROWS):
                block = table[first : first + _ROWS]
                rows = zip(
                    block["shard"].tolist(),
                    block["offset"].tolist(),
                    block["num_tokens"].tolist(),
                    strict=True,
                )
                for row, (shard, offset, length) in enumerate(rows, start=first):
                    if shard != current:  # rows come in shard order (checked by integrity)
                        view, current = memoryview(self.shard(shard)).cast("B"), shard
                    start = offset * itemsize
                    data = view[start : start + max(0, length - 1) * itemsize]
                    hashes[row] = hashlib.blake2b(data, digest_size=16).digest()
            self._hashes = hashes
        return self._hashes

    def document_ids(self, row: int, limit: int | None = None) -> np.ndarray:
        """Token ids of document ``row`` without its end-of-text token (at most ``limit``)."""
        entry = self.table()[row]
        length = max(0, int(entry["num_tokens"]) - 1)
        if limit is not None:
            length = min(length, limit)
        offset = int(entry["offset"])
        return np.asarray(self.shard(int(entry["shard"]))[offset : offset + length])


class Prepared:
    """A prepared-data folder: its splits (``train``, ``validation`` where present), report and tokenizer."""

    def __init__(self, folder: Path, splits: dict[str, Split], report: dict, selected: str) -> None:
        self.folder, self.splits, self.report, self.selected = folder, splits, report, selected
        self._tokenizer = None

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.train.manifest.get("tokenizer", "vocab.json")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from llm_training.data.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        return self._tokenizer


def open_prepared(path: str | Path) -> Prepared:
    """A prepared folder, or one of its manifests (``prepared_data/train.json``: that split is ``selected``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"prepared data not found: {path} (prepare it first, e.g. `llm-prepare-data --input ... "
            f"--output {path if path.suffix != '.json' else path.parent}`)"
        )
    folder, selected = (path, "train") if path.is_dir() else (path.parent, None)
    first = read_manifest(path)
    selected = selected or first.get("split", "train")
    if selected not in SPLITS:
        raise DataError(
            f"{path}: manifest of an unknown split {selected!r}; expected one of {', '.join(SPLITS)}"
        )
    splits: dict[str, Split] = {}
    for split in SPLITS:
        manifest = first if split == selected else None
        if manifest is None and (folder / f"{split}.json").is_file():
            manifest = read_manifest(folder / f"{split}.json")
        if manifest is not None:
            splits[split] = Split(manifest, folder)
    if "train" not in splits:
        raise DataError(f"{folder}: no train.json; this is not a prepared-data folder")
    report: dict = {}
    report_path = folder / "prepare_report.json"
    if report_path.is_file():
        try:
            report = read_json_file(report_path)
        except ValueError:  # damaged: the statistics do without it
            report = {}
    return Prepared(folder, splits, report if isinstance(report, dict) else {}, selected)


# ------------------------------------------------------------------------------------------ statistics
def percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: 0.0 for k in ("min", "p10", "median", "mean", "p90", "p99", "max")}
    p10, median, p90, p99 = np.percentile(values, [10, 50, 90, 99])
    return {
        "min": float(values.min()),
        "p10": float(p10),
        "median": float(median),
        "mean": float(values.mean()),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(values.max()),
    }


def length_stats(split: Split) -> dict:
    """Document lengths of a split in tokens (end-of-text included) and in bytes of text."""
    table = split.table()
    tokens = np.asarray(table["num_tokens"], dtype=np.int64)
    num_bytes = np.asarray(table["num_bytes"], dtype=np.int64)
    return {"tokens": percentiles(tokens), "bytes": percentiles(num_bytes), "documents": int(tokens.size)}


def length_outliers(num_tokens: np.ndarray, z: float = 3.5) -> dict:
    """Documents whose log length lies more than ``z`` robust standard deviations (1.4826 MAD) from the median."""
    if num_tokens.size < 3:
        return {"count": 0, "fraction": 0.0, "short": [], "long": [], "low": 0.0, "high": math.inf}
    logs = np.log(np.maximum(num_tokens, 1).astype(np.float64))
    median = float(np.median(logs))
    mad = float(np.median(np.abs(logs - median))) * 1.4826
    spread = max(mad, 0.1)  # documents of nearly one length: a factor of exp(0.35) is not an outlier
    low, high = math.exp(median - z * spread), math.exp(median + z * spread)
    short = np.flatnonzero(num_tokens < low)
    long = np.flatnonzero(num_tokens > high)
    return {
        "count": int(short.size + long.size),
        "fraction": float((short.size + long.size) / num_tokens.size),
        "short": short[np.argsort(num_tokens[short], kind="stable")][:_EXAMPLES].tolist(),
        "long": long[np.argsort(-num_tokens[long], kind="stable")][:_EXAMPLES].tolist(),
        "low": low,
        "high": high,
    }


def token_counts(split: Split) -> np.ndarray:
    """How often each id occurs in the split (length: the vocabulary, longer if ids are out of range)."""
    return split.scan(checksums=False)["counts"]


def token_text(tokenizer, token_id: int) -> str:
    """A token as readable text: special tokens by name, whitespace made visible (space as '␣', '\\n', '\\t')."""
    if token_id in (tokenizer.eot_id, tokenizer.pad_id, tokenizer.bos_id):
        return tokenizer.backend.id_to_token(token_id) or f"<{token_id}>"
    text = tokenizer.decode([token_id])
    if not text:
        return tokenizer.backend.id_to_token(token_id) or f"<{token_id}>"
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def top_tokens(counts: np.ndarray, tokenizer, k: int = 30) -> list[dict]:
    total = max(1, int(counts.sum()))
    order = np.argsort(-counts, kind="stable")[:k]
    return [
        {
            "rank": rank + 1,
            "id": int(i),
            "text": token_text(tokenizer, int(i)) if i < tokenizer.vocab_size else f"<out of range {i}>",
            "count": int(counts[i]),
            "share": float(counts[i] / total),
        }
        for rank, i in enumerate(order)
        if counts[i] > 0
    ]


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0: same distribution, 1: disjoint) of two count vectors."""
    size = max(p_counts.size, q_counts.size)
    p = np.zeros(size)
    q = np.zeros(size)
    p[: p_counts.size], q[: q_counts.size] = p_counts, q_counts
    if p.sum() == 0 or q.sum() == 0:
        return 1.0 if p.sum() != q.sum() else 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return max(0.0, (kl(p) + kl(q)) / 2)


def sampling_divergence(split: Split, sample_tokens: int, seed: int = 0) -> float:
    """Sampling noise of :func:`js_divergence`: random documents of ``split`` holding about ``sample_tokens``
    tokens (at most half of the split) against the rest of the split; 0.0 with fewer than 2 documents."""
    table = split.table()
    if table.size < 2:
        return 0.0
    order = np.random.default_rng(seed).permutation(table.size)
    lengths = np.asarray(table["num_tokens"], dtype=np.int64)
    target = min(sample_tokens, split.num_tokens // 2)
    take = int(np.searchsorted(np.cumsum(lengths[order]), target)) + 1
    rows = np.sort(order[: max(1, min(table.size - 1, take))])
    counts = token_counts(split)
    sample = np.zeros_like(counts)
    shard_of = np.asarray(table["shard"], dtype=np.int64)
    offset_of = np.asarray(table["offset"], dtype=np.int64)
    shards: dict[int, np.ndarray] = {}
    for row in rows.tolist():  # rows are sorted, so each shard is read front to back
        index = int(shard_of[row])
        tokens = shards.get(index)
        if tokens is None:
            shards.clear()
            tokens = shards[index] = split.shard(index)
        ids = np.asarray(tokens[offset_of[row] : offset_of[row] + lengths[row]])
        sample += np.bincount(ids, minlength=sample.size)[: sample.size]
    return js_divergence(counts - sample, sample)


def quality_stats(prepared: Prepared, min_quality: float) -> dict:
    """Quality scores of the kept documents (from the tables), overall and per split."""
    per_split, scores, tokens = {}, [], []
    for name, split in prepared.splits.items():
        table = split.table()
        quality = np.asarray(table["quality"], dtype=np.float64)
        weight = np.asarray(table["num_tokens"], dtype=np.float64)
        scores.append(quality)
        tokens.append(weight)
        per_split[name] = {
            "mean": float(quality.mean()) if quality.size else 0.0,
            "documents": int(quality.size),
        }
    quality = np.concatenate(scores) if scores else np.zeros(0)
    weight = np.concatenate(tokens) if tokens else np.zeros(0)
    low = quality < min_quality
    return {
        "documents": int(quality.size),
        "mean": float(quality.mean()) if quality.size else 0.0,
        "min": float(quality.min()) if quality.size else 0.0,
        "low_documents": int(low.sum()),
        "low_fraction": float(low.mean()) if quality.size else 0.0,
        "low_token_share": float(weight[low].sum() / max(1.0, weight.sum())),
        "splits": per_split,
    }


def _duplicates_within(hashes: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """How many rows repeat an earlier row, and a few (row, earlier row) pairs."""
    if hashes.size == 0:
        return 0, []
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    earlier = first[inverse.ravel()]
    repeats = np.flatnonzero(earlier != np.arange(hashes.size))
    return int(repeats.size), [(int(r), int(earlier[r])) for r in repeats[:_EXAMPLES]]


def duplicate_stats(prepared: Prepared) -> dict:
    """Exact duplicates among the prepared documents (equal token ids) within each split and across them."""
    result: dict = {}
    for name, split in prepared.splits.items():
        count, examples = _duplicates_within(split.document_hashes())
        result[name] = {
            "documents": split.num_documents,
            "duplicates": count,
            "fraction": count / max(1, split.document_hashes().size),
            "examples": examples,
        }
    contaminated, examples, documents = 0, [], 0
    if "validation" in prepared.splits:
        train = prepared.train.document_hashes()
        validation = prepared.splits["validation"].document_hashes()
        documents = validation.size
        shared = np.flatnonzero(np.isin(validation, train)) if train.size else np.zeros(0, dtype=np.int64)
        contaminated = int(shared.size)
        if contaminated:
            order = np.argsort(train, kind="stable")  # the first train row of each digest comes first
            rows = order[np.searchsorted(train[order], validation[shared[:_EXAMPLES]])]
            examples = [(int(v), int(t)) for v, t in zip(shared[:_EXAMPLES], rows, strict=True)]
    result["contamination"] = {
        "documents": contaminated,
        "fraction": contaminated / max(1, documents),
        "examples": examples,
    }
    return result


def snippet(prepared: Prepared, split: str, row: int, chars: int = 60) -> str:
    """The first ``chars`` characters of a document, on one line."""
    text = prepared.tokenizer.decode(prepared.splits[split].document_ids(row, limit=chars))
    text = " ".join(text.replace("\ufeff", "").split())
    return text[:chars] + ("…" if len(text) > chars else "")


def summary(prepared: Prepared) -> dict:
    rows = {}
    for name, split in prepared.splits.items():
        rows[name] = {
            "documents": split.num_documents,
            "tokens": split.num_tokens,
            "bytes": split.num_bytes,
            "bytes_per_token": split.num_bytes / max(1, split.num_tokens - split.num_documents),
            "shards": len(split.shards),
            "dtype": split.manifest.get("dtype"),
            "vocab_size": split.manifest.get("vocab_size"),
        }
    return rows


def bytes_per_token(split: Split) -> float:
    """Text bytes per token, end-of-text tokens left out (what the tokenizer compresses)."""
    return split.num_bytes / max(1, split.num_tokens - split.num_documents)


# ------------------------------------------------------------------------------------------ integrity
def _integrity_of(split: Split, problems: list[str], fatal: list[bool], checksums: bool) -> None:
    m, name = split.manifest, split.name
    vocab = m.get("vocab_size")
    if split.dtype is None or split.dtype.name not in ("uint16", "uint32"):
        problems.append(f"{name}.json: dtype {m.get('dtype')!r} is not uint16 or uint32")
        fatal.append(True)
        return
    if not isinstance(vocab, int) or vocab < 1 or vocab - 1 > np.iinfo(split.dtype).max:
        problems.append(f"{name}.json: vocab_size {vocab!r} does not fit dtype {split.dtype.name}")
        fatal.append(True)
        return
    if not all(
        isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("num_tokens"), int)
        for s in split.shards
    ):
        problems.append(f"{name}.json: every shard needs a path and a num_tokens")
        fatal.append(True)
        return
    shard_sum = sum(s["num_tokens"] for s in split.shards)
    if shard_sum != split.num_tokens:
        problems.append(f"{name}.json: shards hold {shard_sum:,} tokens, manifest says {split.num_tokens:,}")
    readable = True
    for info in split.shards:
        path = split.folder / str(info.get("path", ""))
        expected = int(info.get("num_tokens", 0)) * split.dtype.itemsize
        if not path.is_file():
            problems.append(f"{name}: shard {info.get('path')} is missing")
            readable = False
        elif path.stat().st_size != expected:
            problems.append(
                f"{name}: shard {info['path']} has {path.stat().st_size:,} bytes, expected {expected:,} "
                f"({info['num_tokens']:,} tokens of {split.dtype.itemsize} bytes)"
            )
            readable = False
    if not readable:
        fatal.append(True)
        return
    scan = split.scan(checksums=checksums)
    for info, digest in zip(split.shards, scan["sha256"] or [None] * len(split.shards), strict=True):
        if digest and info.get("sha256") and info["sha256"] != digest:
            problems.append(
                f"{name}: shard {info['path']} sha256 {digest[:12]}… does not match the manifest's "
                f"{info['sha256'][:12]}… (the file changed after preparation)"
            )
    counts = scan["counts"]
    out_of_range = int(counts[vocab:].sum()) if counts.size > vocab else 0
    if out_of_range:
        problems.append(f"{name}: {out_of_range:,} token ids are >= vocab_size {vocab:,}")
    eot = m.get("eot_id")
    if not isinstance(eot, int) or not 0 <= eot < vocab:
        problems.append(f"{name}.json: eot_id {eot!r} is not an id of the vocabulary")
    elif int(counts[eot]) != split.num_documents:
        problems.append(
            f"{name}: {int(counts[eot]):,} end-of-text tokens for {split.num_documents:,} documents "
            "(there is one after every document)"
        )
    _table_integrity(split, problems, fatal)


def _table_integrity(split: Split, problems: list[str], fatal: list[bool]) -> None:
    name = split.name
    if not split.table_path.is_file():
        problems.append(f"{name}: document table {split.table_path.name} is missing")
        fatal.append(True)
        return
    try:
        table = split.table()
    except DataError as exc:
        problems.append(str(exc))
        fatal.append(True)
        return
    if table.dtype.names != DOCUMENT_DTYPE.names or table.ndim != 1:
        problems.append(
            f"{name}: {split.table_path.name} has fields {table.dtype.names}, expected {DOCUMENT_DTYPE.names}"
        )
        fatal.append(True)
        return
    if table.size != split.num_documents:
        problems.append(
            f"{name}: document table has {table.size:,} rows for {split.num_documents:,} documents"
        )
    shard = np.asarray(table["shard"], dtype=np.int64)
    offset = np.asarray(table["offset"], dtype=np.int64)
    length = np.asarray(table["num_tokens"], dtype=np.int64)
    if table.size and (shard.max() >= len(split.shards) or length.min() < 1):
        problems.append(f"{name}: document table names a shard that does not exist or an empty document")
        fatal.append(True)
        return
    sizes = np.asarray([int(s["num_tokens"]) for s in split.shards], dtype=np.int64)
    # rows are in shard order and tile each shard exactly: offset[i] = end of the previous row in that shard
    ends = offset + length
    order_ok = bool(np.all(np.diff(shard) >= 0)) if table.size else True
    starts_expected = np.zeros(table.size, dtype=np.int64)
    if table.size > 1:
        same = shard[1:] == shard[:-1]
        starts_expected[1:] = np.where(same, ends[:-1], 0)
    covered = np.bincount(shard, weights=length, minlength=len(sizes)).astype(np.int64)
    if not order_ok or not np.array_equal(offset, starts_expected) or not np.array_equal(covered, sizes):
        problems.append(
            f"{name}: document table offsets do not tile the shards (rows out of order, gaps or overlaps)"
        )
        fatal.append(True)
        return
    if int(length.sum()) != split.num_tokens:
        problems.append(
            f"{name}: document table sums to {int(length.sum()):,} tokens, manifest says {split.num_tokens:,}"
        )
    byte_sum = int(np.asarray(table["num_bytes"], dtype=np.int64).sum())
    if byte_sum != split.num_bytes:
        problems.append(
            f"{name}: document table sums to {byte_sum:,} bytes, manifest says {split.num_bytes:,}"
        )
    quality = np.asarray(table["quality"], dtype=np.float64)
    if table.size and (not np.all(np.isfinite(quality)) or quality.min() < 0 or quality.max() > 1):
        problems.append(f"{name}: document table has quality scores outside [0, 1]")
    eot = split.manifest.get("eot_id")
    bad_end = 0
    for index in range(len(split.shards)):
        rows = shard == index
        if rows.any():
            last = np.asarray(split.shard(index)[ends[rows] - 1])
            bad_end += int(np.count_nonzero(last != eot))
    if bad_end:
        problems.append(f"{name}: {bad_end:,} documents do not end with the end-of-text token {eot}")


def integrity(prepared: Prepared, checksums: bool = True) -> tuple[list[Finding], bool]:
    """Integrity findings, and whether the data can be read safely (shards and tables consistent).

    ``checksums=False`` skips the sha256 of the shards (the rest costs one read of the shards too)."""
    problems: list[str] = []
    fatal: list[bool] = []
    train = prepared.train.manifest
    if "validation" not in prepared.splits:
        problems.append("validation.json is missing")
    if not prepared.tokenizer_path.is_file():
        problems.append(f"tokenizer {prepared.tokenizer_path.name} is missing")
        fatal.append(True)  # the other checks decode tokens
    else:
        try:
            tokenizer = prepared.tokenizer
        except DataError as exc:
            problems.append(f"tokenizer: {exc}")
            fatal.append(True)
        else:
            if train.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
                problems.append(
                    f"{prepared.tokenizer_path.name}: fingerprint {tokenizer.fingerprint} differs "
                    f"from the manifest's {train.get('tokenizer_fingerprint')}"
                )
            if train.get("vocab_size") != tokenizer.vocab_size:
                problems.append(
                    f"train.json: vocab_size {train.get('vocab_size')} but the tokenizer has "
                    f"{tokenizer.vocab_size}"
                )
            if train.get("eot_id") != tokenizer.eot_id:
                problems.append(
                    f"train.json: eot_id {train.get('eot_id')} but the tokenizer's is {tokenizer.eot_id}"
                )
    for split in prepared.splits.values():
        if split.name != "train":
            for key in ("dtype", "vocab_size", "eot_id", "tokenizer_fingerprint"):
                if split.manifest.get(key) != train.get(key):
                    problems.append(
                        f"{split.name}.json: {key} {split.manifest.get(key)!r} differs from "
                        f"train.json's {train.get(key)!r}"
                    )
        _integrity_of(split, problems, fatal, checksums)
    if problems:
        return [Finding("integrity", "integrity", "FAIL", problem) for problem in problems], not fatal
    parts = [
        f"{s.name} {len(s.shards)} shard{'s' if len(s.shards) != 1 else ''}, {s.num_tokens:,} tokens, "
        f"{_count(s.num_documents, 'document')}"
        for s in prepared.splits.values()
    ]
    vocab = train.get("vocab_size")
    message = (
        "; ".join(parts) + f"; sizes, sha256, ids < {vocab:,}, end-of-text per document, tables consistent"
    )
    return [Finding("integrity", "integrity", "PASS", message)], True


# ------------------------------------------------------------------------------------------ the checks
def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _status(bad: bool, warn: bool = False) -> str:
    return "FAIL" if bad else "WARN" if warn else "PASS"


def check_quality(prepared: Prepared, t: Thresholds) -> list[Finding]:
    stats = quality_stats(prepared, t.min_quality)
    per_split = ", ".join(f"{name} {s['mean']:.3f}" for name, s in stats["splits"].items())
    setting = prepared.report.get("settings", {}).get("min_quality")
    note = f"; prepared with --min-quality {setting}" if setting is not None else ""
    return [
        Finding(
            "quality",
            "mean",
            _status(stats["mean"] < t.min_mean_quality),
            f"mean quality {stats['mean']:.3f} of {stats['documents']:,} kept documents ({per_split}); "
            f"minimum {t.min_mean_quality}",
            stats["mean"],
            t.min_mean_quality,
        ),
        Finding(
            "quality",
            "low_quality",
            _status(stats["low_fraction"] > t.max_low_quality_fraction, stats["low_documents"] > 0),
            f"{stats['low_documents']:,} of {stats['documents']:,} documents ({stats['low_fraction']:.1%}, "
            f"{stats['low_token_share']:.1%} of tokens) score below {t.min_quality}; maximum "
            f"{t.max_low_quality_fraction:.1%}{note}",
            stats["low_fraction"],
            t.max_low_quality_fraction,
        ),
    ]


def check_distribution(prepared: Prepared, t: Thresholds) -> list[Finding]:
    findings = []
    train = prepared.train
    validation = prepared.splits.get("validation")
    total = sum(s.num_tokens for s in prepared.splits.values())
    if validation is None or validation.num_documents == 0 or validation.num_tokens == 0:
        findings.append(
            Finding("distribution", "validation_split", "FAIL", "the validation split is empty", 0, 0)
        )
    else:
        share = validation.num_tokens / max(1, total)
        findings.append(
            Finding(
                "distribution",
                "validation_split",
                "PASS",
                f"validation holds {_count(validation.num_documents, 'document')}, {validation.num_tokens:,} tokens "
                f"({share:.1%} of all tokens)",
                share,
            )
        )
        a, b = bytes_per_token(train), bytes_per_token(validation)
        ratio = max(a, b) / max(1e-9, min(a, b))
        findings.append(
            Finding(
                "distribution",
                "bytes_per_token",
                _status(ratio > t.max_bytes_per_token_ratio),
                f"bytes/token train {a:.3f}, validation {b:.3f}: ratio {ratio:.3f}; maximum "
                f"{t.max_bytes_per_token_ratio}",
                ratio,
                t.max_bytes_per_token_ratio,
            )
        )
    tokenizer = prepared.tokenizer
    for split in prepared.splits.values():
        counts = token_counts(split)
        if counts.sum() == 0:
            continue
        top = int(np.argmax(counts))
        share = float(counts[top] / counts.sum())
        findings.append(
            Finding(
                "distribution",
                f"top_token_{split.name}",
                _status(share > t.max_token_share),
                f"most frequent {split.name} token {top} '{token_text(tokenizer, top)}' is {share:.2%} of "
                f"{int(counts.sum()):,} tokens; maximum {t.max_token_share:.0%}",
                share,
                t.max_token_share,
            )
        )
    if validation is not None and validation.num_tokens:
        js = js_divergence(token_counts(train), token_counts(validation))
        floor = sampling_divergence(train, validation.num_tokens)
        limit = max(t.max_js_divergence, 2 * floor)
        findings.append(
            Finding(
                "distribution",
                "js_divergence",
                _status(js > limit),
                f"Jensen-Shannon divergence of train and validation unigram distributions {js:.4f} bits "
                f"(a random same-size sample of train: {floor:.4f}); maximum {t.max_js_divergence} or twice "
                f"the sample's",
                js,
                limit,
            )
        )
    for split in prepared.splits.values():
        lengths = np.asarray(split.table()["num_tokens"], dtype=np.int64)
        out = length_outliers(lengths, t.outlier_z)
        detail = ""
        if out["count"]:
            parts = []
            if out["short"]:
                parts.append(f"shortest {', '.join(f'#{r} ({lengths[r]:,})' for r in out['short'][:3])}")
            if out["long"]:
                parts.append(f"longest {', '.join(f'#{r} ({lengths[r]:,})' for r in out['long'][:3])}")
            detail = " (" + "; ".join(parts) + ")"
        median = float(np.median(lengths)) if lengths.size else 0.0
        if lengths.size < 3:
            message = f"{_count(lengths.size, 'document')} in {split.name}: too few to judge length outliers"
        else:
            message = (
                f"{out['count']:,} of {lengths.size:,} {split.name} documents ({out['fraction']:.1%}) are length "
                f"outliers outside {out['low']:,.0f} to {out['high']:,.0f} tokens (median {median:,.0f}, robust "
                f"z > {t.outlier_z}){detail}; warn above {t.max_length_outlier_fraction:.1%}"
            )
        findings.append(
            Finding(
                "distribution",
                f"length_outliers_{split.name}",
                "WARN" if out["fraction"] > t.max_length_outlier_fraction else "PASS",
                message,
                out["fraction"],
                t.max_length_outlier_fraction,
            )
        )
    return findings


def check_duplicates(prepared: Prepared, t: Thresholds) -> list[Finding]:
    stats = duplicate_stats(prepared)
    findings = []
    cont = stats["contamination"]
    if "validation" in prepared.splits:
        examples = "; ".join(
            f'validation #{v} = train #{r} "{snippet(prepared, "validation", v, 40)}"'
            for v, r in cont["examples"][:3]
        )
        findings.append(
            Finding(
                "duplicates",
                "contamination",
                _status(cont["documents"] > 0),
                f"{cont['documents']:,} of {prepared.splits['validation'].num_documents:,} validation documents "
                f"({cont['fraction']:.1%}) also occur in train" + (f": {examples}" if examples else ""),
                cont["documents"],
                0,
            )
        )
    dropped = prepared.report.get("dropped", {})
    note = ""
    if "exact_duplicate" in dropped or "near_duplicate" in dropped:
        note = (
            f" (preparation already dropped {dropped.get('exact_duplicate', 0):,} exact and "
            f"{dropped.get('near_duplicate', 0):,} near duplicates)"
        )
    elif prepared.report.get("settings", {}).get("deduplicate") is False:
        note = " (prepared without --deduplicate)"
    for name in prepared.splits:
        s = stats[name]
        examples = "; ".join(f"#{row} = #{first}" for row, first in s["examples"][:3])
        findings.append(
            Finding(
                "duplicates",
                f"exact_{name}",
                _status(s["fraction"] > t.max_duplicate_fraction, s["duplicates"] > 0),
                f"{s['duplicates']:,} of {s['documents']:,} {name} documents ({s['fraction']:.2%}) repeat an "
                f"earlier one exactly" + (f" ({examples})" if examples else "") + f"; maximum "
                f"{t.max_duplicate_fraction:.1%}" + (note if name == "train" else ""),
                s["fraction"],
                t.max_duplicate_fraction,
            )
        )
    return findings


_CHECK_FUNCTIONS = {
    "quality": check_quality,
    "distribution": check_distribution,
    "duplicates": check_duplicates,
}


def parse_checks(text: str | None) -> list[str]:
    """``"quality,duplicates"`` -> the checks to run, integrity first; ``None``/``"all"``: every check."""
    if text is None or text.strip() in ("", "all"):
        return list(CHECKS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise DataError(
            f"unknown check {', '.join(map(repr, unknown))}; valid checks: {', '.join(CHECKS)} (or all)"
        )
    return [c for c in CHECKS if c == "integrity" or c in names]


def validate(
    prepared: Prepared, checks: list[str] | None = None, thresholds: Thresholds | None = None
) -> list[Finding]:
    """Run ``checks`` (integrity always first); later checks are SKIPped when the data cannot be read safely."""
    thresholds = thresholds or Thresholds()
    checks = parse_checks(",".join(checks) if checks else None)
    findings, readable = integrity(prepared)
    for check in checks:
        if check == "integrity":
            continue
        if not readable:
            findings.append(
                Finding(
                    check,
                    check,
                    "SKIP",
                    "not run: integrity failed (shards, document tables or tokenizer unreadable)",
                )
            )
            continue
        findings.extend(_CHECK_FUNCTIONS[check](prepared, thresholds))
    return findings


def findings_json(
    prepared: Prepared, checks: list[str], thresholds: Thresholds, findings: list[Finding]
) -> dict:
    return {
        "data_dir": str(prepared.folder),
        "checks": checks,
        "thresholds": asdict(thresholds),
        "status": "FAIL" if any(f.status == "FAIL" for f in findings) else "PASS",
        "counts": {s: sum(f.status == s for f in findings) for s in STATUSES},
        "findings": [asdict(f) for f in findings],
    }


# ------------------------------------------------------------------------------------------ analysis
@dataclass
class Analysis:
    """Everything the HTML page of ``llm-analyze-data`` shows (plain numbers, lists and arrays)."""

    folder: str
    split: str
    summary: dict
    vocab_size: int
    lengths: dict  # percentiles of tokens and bytes
    num_tokens: np.ndarray  # per document of the split (end-of-text included)
    num_bytes: np.ndarray
    counts: np.ndarray  # per token id
    top: list[dict]
    quality: np.ndarray  # kept documents of the split
    report: dict
    duplicates: dict
    duplicate_snippets: list[tuple[str, str]] = field(default_factory=list)
    js: float | None = None


def analyze(prepared: Prepared, split: str | None = None, top_k: int = 30) -> Analysis:
    split = split or prepared.selected
    if split not in prepared.splits:
        raise DataError(f"{prepared.folder}: no {split} split")
    data = prepared.splits[split]
    _, readable = integrity(prepared, checksums=False)
    if not readable:
        raise DataError(
            f"{prepared.folder}: shards, document tables or tokenizer are unreadable; run llm-validate-data --data-dir {prepared.folder} for details"
        )
    table = data.table()
    counts = token_counts(data)
    duplicates = duplicate_stats(prepared)
    snippets = [
        (snippet(prepared, "validation", v), snippet(prepared, "train", r))
        for v, r in duplicates["contamination"]["examples"][:3]
    ]
    js = None
    if split == "train" and "validation" in prepared.splits and prepared.splits["validation"].num_tokens:
        js = js_divergence(counts, token_counts(prepared.splits["validation"]))
    return Analysis(
        folder=str(prepared.folder),
        split=split,
        summary=summary(prepared),
        vocab_size=int(data.manifest.get("vocab_size", 0)),
        lengths=length_stats(data),
        num_tokens=np.asarray(table["num_tokens"], dtype=np.int64),
        num_bytes=np.asarray(table["num_bytes"], dtype=np.int64),
        counts=counts,
        top=top_tokens(counts, prepared.tokenizer, top_k),
        quality=np.asarray(table["quality"], dtype=np.float64),
        report=prepared.report,
        duplicates=duplicates,
        duplicate_snippets=snippets,
        js=js,
    )
