"""Documents -> cleaned, scored, deduplicated text -> tokenizer -> memory-mapped token shards with manifests.

Output folder:
    train_000000.bin, ...           token ids (uint16 when the vocabulary fits, else uint32), one end-of-text
    validation_000000.bin, ...      token after every document; a new shard every ``shard_tokens`` tokens
    train.json, validation.json     manifests: dtype, shards with sizes and sha256, token, document and byte
                                    counts (bytes make bits per byte exact), tokenizer fingerprint
    train_documents.npy, ...        one row per document: shard, offset, tokens, bytes, quality score
    vocab.json                      the tokenizer (Hugging Face ``tokenizers`` JSON)
    prepare_report.json             what was read, dropped (and why) and kept; timings of each stage

Stages: (1) read, clean, score and hash documents in worker processes, and decide in input order what is
kept (quality bar, exact and near duplicates), spooling kept text to disk so memory stays bounded; (2) train
the tokenizer on a sample of the kept training text, or load one; (3) encode the spooled text and write
shards. The folder is built under a temporary name and renamed into place, so a failure never leaves half a
dataset and an existing one survives a failed run. Same input, settings and seed give the same bytes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llm_training.data.dedup import NearDuplicateIndex
from llm_training.data.filters import Analysed, FilterSettings, analyse_batch
from llm_training.data.sources import DataSourceConnector, Document, Problems
from llm_training.data.tokenizer import Tokenizer
from llm_training.data.words import MAX_BATCH_DOCS
from llm_training.errors import DataError, quoted
from llm_training.fileio import building_dir, check_output_dir
from llm_training.limits import bad_text, json_loads

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
# every name a prepared folder of this tool holds (text, merged shards, image-caption pairs): an older
# folder without the marker file is replaced only when it holds nothing else
PREPARED_NAMES = (
    r"(train|validation)(\.json|\.spool|_documents\.npy|(_m\d{3})?_\d{6}\.bin|_(images|captions|offsets)\.npy)"
    r"|vocab\.json|prepare_report\.json|report\.json"
)
DOCUMENT_DTYPE = np.dtype(
    [("shard", "<u4"), ("offset", "<u8"), ("num_tokens", "<u4"), ("num_bytes", "<u8"), ("quality", "<f4")]
)
_BATCH_BYTES = 1 << 20  # text per worker task
_EXAMPLES = 50


@dataclass
class PrepareOptions:
    vocab_size: int = 4096
    validation_fraction: float = 0.05
    seed: int = 1234
    tokenizer_path: str | None = None  # use this tokenizer instead of training one
    max_seq_length: int = 2048
    min_quality: float = 0.0  # drop documents scoring below this (see data/quality.py)
    deduplicate: bool = False  # drop exact and near duplicates
    dedup_threshold: float = 0.8  # estimated Jaccard similarity of word 5-grams that makes a near duplicate
    num_perm: int = 128
    # train the tokenizer on about this much of the training text; 0: 256 bytes per vocabulary entry, >= 4 MB
    tokenizer_sample_bytes: int = 0
    workers: int = 0  # processes for cleaning and scoring, threads for encoding; 0: one per core
    shard_tokens: int = 1 << 27  # tokens per shard file
    num_shards: int = 1  # split the work across machines: this run keeps documents of shard_index only
    shard_index: int = 0
    tokenizer_only: bool = False  # stop after training the tokenizer (to share it between shards)
    source: str = ""
    fingerprint: str | None = None

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


@dataclass
class PrepareResult:
    output_dir: Path
    train_manifest: Path
    validation_manifest: Path
    tokenizer_path: Path
    report: dict
    reused: bool = False


def is_validation(doc_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split by a hash of the document id: stable when documents are added or reordered."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------- spooling
class _Spool:
    """Kept text of one split on disk: length-prefixed UTF-8 records, read back in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.count = 0
        self.num_bytes = 0
        self.quality = array("f")  # per document; compact arrays keep memory small for millions of documents
        self.sizes = array("Q")

    def add(self, text: str, quality: float) -> None:
        data = text.encode("utf-8")
        self.handle.write(struct.pack("<Q", len(data)))
        self.handle.write(data)
        self.count += 1
        self.num_bytes += len(data)
        self.quality.append(quality)
        self.sizes.append(len(data))

    def finish(self) -> None:
        self.handle.close()

    def read(self, every: int = 1) -> Iterator[str]:
        with open(self.path, "rb") as handle:
            index = 0
            while header := handle.read(8):
                (size,) = struct.unpack("<Q", header)
                if index % every == 0:
                    yield handle.read(size).decode("utf-8")
                else:
                    handle.seek(size, os.SEEK_CUR)
                index += 1

    def batches(self, max_bytes: int) -> Iterator[list[str]]:
        batch, size = [], 0
        for text in self.read():
            batch.append(text)
            size += len(text)
            if size >= max_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


# ------------------------------------------------------------------------------------------ shard writing
class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.handle = None
        self.rows = (array("I"), array("Q"), array("I"))  # shard, offset, tokens of each document

    def _open_next(self) -> None:
        self._close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self.handle = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close
        self.hasher = hashlib.sha256()
        self.shards.append({"path": name, "num_tokens": 0})

    def _close(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.shards[-1]["sha256"] = self.hasher.hexdigest()
            self.handle = None

    def add_batch(self, ids: np.ndarray, lengths: list[int]) -> None:
        """Consecutive documents (``lengths`` tokens each, end-of-text included) as one array of
        ``dtype``; a new shard starts where the current one would overflow (a document never spans two)."""
        if self.handle is None:
            self._open_next()
        ends = np.cumsum(lengths)
        start, first = 0, 0
        while first < len(lengths):
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            # documents that fit; at least one, so a document longer than a shard gets a shard of its own
            last = max(first + 1, int(np.searchsorted(ends, start + room, side="right")))
            if last == first + 1 and self.shards[-1]["num_tokens"] and lengths[first] > room:
                self._open_next()
                continue
            self._write(ids[start : ends[last - 1]], lengths[first:last])
            start, first = int(ends[last - 1]), last

    def _write(self, ids: np.ndarray, lengths: list[int]) -> None:
        data = ids.tobytes()
        self.handle.write(data)
        self.hasher.update(data)
        shard = self.shards[-1]
        self.rows[0].extend([len(self.shards) - 1] * len(lengths))
        self.rows[1].extend((shard["num_tokens"] + np.concatenate(([0], np.cumsum(lengths)[:-1]))).tolist())
        self.rows[2].extend(lengths)
        shard["num_tokens"] += int(ids.size)

    def finish(self) -> list[dict]:
        if self.handle is None:
            self._open_next()
        self._close()
        return self.shards


# ---------------------------------------------------------------------------------------------- stage 1
@dataclass
class _Decisions:
    read: int = 0
    bytes_read: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    exact_examples: list = field(default_factory=list)
    near_examples: list = field(default_factory=list)
    quality_all: list = field(default_factory=lambda: [0] * 10)

    def histogram_add(self, score: float) -> None:
        self.quality_all[min(9, int(score * 10))] += 1


def _batched(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc.text)
        if size >= _BATCH_BYTES or len(batch) >= MAX_BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _main_not_rerun():
    """Start spawned workers without running the user's script again in each of them: they only need this
    module, and a script that calls preparation at its top level (no ``if __name__ == "__main__"``, as in the
    usage guide's snippets) would otherwise start the whole job again in every worker."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    try:
        for key in saved:
            if key == "__file__":
                delattr(main, key)
            else:
                setattr(main, key, None)
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _analysed_batches(
    documents: Iterable[Document], settings: FilterSettings, workers: int
) -> Iterator[tuple[list[Document], list[Analysed]]]:
    """(documents, analyses) in input order; at most 2 tasks per worker in flight, so memory is bounded."""
    batches = _batched(documents)
    if workers <= 1:
        for batch in batches:
            yield batch, analyse_batch([d.text for d in batch], settings)
        return
    # fork is fast and safe before torch starts threads; otherwise start clean interpreters
    method = "fork" if "torch" not in sys.modules and sys.platform == "linux" else "spawn"
    with _main_not_rerun():  # the workers start here
        pool = multiprocessing.get_context(method).Pool(workers)
    with pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(analyse_batch, ([d.text for d in batch], settings))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _select(
    source: DataSourceConnector | Iterable[Document],
    options: PrepareOptions,
    spools: dict[str, _Spool],
    split_fn: Callable[[str], bool],
    on_progress: Callable[[str, int], None] | None,
) -> _Decisions:
    settings = FilterSettings(options.min_quality, options.deduplicate, options.num_perm)
    decisions = _Decisions()
    exact_seen: dict[bytes, str] = {}
    near = NearDuplicateIndex(options.dedup_threshold, options.num_perm) if options.deduplicate else None
    documents = source.documents() if isinstance(source, DataSourceConnector) else iter(source)
    for batch, results in _analysed_batches(documents, settings, options.resolved_workers()):
        for doc, result in zip(batch, results, strict=True):
            decisions.read += 1
            decisions.bytes_read += len(doc.text.encode("utf-8")) if not doc.text.isascii() else len(doc.text)
            if result.empty:
                decisions.dropped["empty"] += 1
                continue
            decisions.histogram_add(result.quality)
            if result.text is None:
                decisions.dropped["low_quality"] += 1
                continue
            if options.num_shards > 1 and (
                int.from_bytes(result.key[:8], "big") % options.num_shards != options.shard_index
            ):
                decisions.dropped["other_shard"] += 1
                continue
            if options.deduplicate:
                first = exact_seen.get(result.key)
                if first is not None:
                    decisions.dropped["exact_duplicate"] += 1
                    if len(decisions.exact_examples) < _EXAMPLES:
                        decisions.exact_examples.append({"id": doc.id, "duplicate_of": first})
                    continue
                exact_seen[result.key] = doc.id
                match = near.find(result.signature)
                if match is not None:
                    decisions.dropped["near_duplicate"] += 1
                    if len(decisions.near_examples) < _EXAMPLES:
                        decisions.near_examples.append(
                            {"id": doc.id, "duplicate_of": match[0], "similarity": round(match[1], 3)}
                        )
                    continue
                near.add(doc.id, result.signature)
            spools["validation" if split_fn(doc.id) else "train"].add(result.text, result.quality)
        if on_progress:
            on_progress("reading, cleaning, scoring", decisions.bytes_read)
    return decisions


def _split_tail(texts: list[str], fraction: float) -> dict[str, list[str]]:
    joined = "\n\n".join(texts)
    cut = int(len(joined) * (1 - fraction))
    newline = joined.rfind("\n", 0, cut)
    cut = newline if newline > len(joined) // 2 else cut
    train, validation = joined[:cut].strip(), joined[cut:].strip()
    if not train or not validation:
        raise DataError("input is too short to hold out validation text; give it more text")
    return {"train": [train], "validation": [validation]}


def _resplit_by_tail(spools: dict[str, _Spool], folder: Path, fraction: float) -> dict[str, _Spool]:
    """Too few documents to split by document: hold out the tail of the text instead."""
    texts = [text for split in SPLITS for text in spools[split].read()]
    quality = [q for split in SPLITS for q in spools[split].quality]
    score = float(np.mean(quality)) if quality else 1.0
    fresh = {split: _Spool(folder / f"tail_{split}.spool") for split in SPLITS}
    for split, parts in _split_tail(texts, fraction).items():
        for text in parts:
            fresh[split].add(text, score)
        fresh[split].finish()
    return fresh


# ---------------------------------------------------------------------------------------------- stage 2
def _tokenizer_for(spool: _Spool, options: PrepareOptions) -> tuple[Tokenizer, str]:
    if options.tokenizer_path:
        return Tokenizer.load(options.tokenizer_path), f"loaded from {options.tokenizer_path}"
    sample = options.tokenizer_sample_bytes or max(4_000_000, 256 * options.vocab_size)
    every = max(1, math.ceil(spool.num_bytes / sample))
    tokenizer = Tokenizer.train(spool.read(every), options.vocab_size)
    share = "all" if every == 1 else f"every {every}th document"
    return tokenizer, f"trained ({options.vocab_size} tokens) on {share} of the training text"


# ---------------------------------------------------------------------------------------------- stage 3
def _encode_split(
    spool: _Spool,
    tokenizer: Tokenizer,
    writer: _ShardWriter,
    workers: int,
    on_progress: Callable[[str, int], None] | None,
    split: str,
) -> None:
    done = 0
    for batch in spool.batches(8 << 20):
        encoded = tokenizer.encode_batch(batch, num_threads=workers)
        # one flat array per batch: numpy calls per document cost more than the encoding of a short one
        flat: list[int] = []
        for ids in encoded:
            flat += ids
            flat.append(tokenizer.eot_id)
        writer.add_batch(np.array(flat, dtype=writer.dtype), [len(ids) + 1 for ids in encoded])
        done += sum(map(len, batch))
        if on_progress:
            on_progress(f"encoding {split}", done)


def prepare(
    source: DataSourceConnector | Iterable[Document],
    output_dir: str | Path,
    options: PrepareOptions | None = None,
    *,
    split_fn: Callable[[str], bool] | None = None,
    on_progress: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
) -> PrepareResult:
    """Prepare ``source`` into ``output_dir`` (replaced atomically). ``split_fn(doc_id) -> bool`` picks
    validation documents; by default a hash of the id with ``options.seed``. An existing ``output_dir``
    is replaced only when this tool wrote all of it, or with ``overwrite`` (see ``fileio``)."""
    options = options or PrepareOptions()
    if options.num_shards > 1 and not options.tokenizer_path:
        raise DataError(
            "sharded preparation (--num-shards > 1) needs one tokenizer for all shards: train it first "
            "(llm-prepare-data --tokenizer-only ...) and pass it with --tokenizer"
        )
    if not 0 <= options.shard_index < options.num_shards:
        raise DataError(f"--shard-index must be in [0, {options.num_shards}), got {options.shard_index}")
    split_fn = split_fn or (lambda doc_id: is_validation(doc_id, options.seed, options.validation_fraction))
    started = time.perf_counter()
    output_dir = Path(output_dir)
    inputs = [options.source, options.tokenizer_path, *getattr(source, "paths", ())]
    check = functools.partial(
        check_output_dir, output_dir, names=PREPARED_NAMES, overwrite=overwrite, inputs=inputs
    )
    check()
    stages: dict[str, float] = {}
    with building_dir(output_dir, "llm-prepare-data", check) as staging:
        spools = {split: _Spool(staging / f"{split}.spool") for split in SPLITS}
        decisions = _select(source, options, spools, split_fn, on_progress)
        for spool in spools.values():
            spool.finish()
        stages["read_clean_score_dedup"] = time.perf_counter() - started
        problems = source.problems if isinstance(source, DataSourceConnector) else Problems()
        kept = sum(s.count for s in spools.values())
        if kept == 0:
            reasons = dict(decisions.dropped) | dict(problems.counts)
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no documents"
            raise DataError(
                f"{options.source or 'input'}: no documents left to prepare ({decisions.read} read; {detail})"
            )
        split_note = f"by document id hash (seed {options.seed}, fraction {options.validation_fraction})"
        if not spools["train"].count or not spools["validation"].count:
            spools = _resplit_by_tail(spools, staging, options.validation_fraction)
            split_note = "tail of the text (too few documents to split by document)"

        mark = time.perf_counter()
        tokenizer, tokenizer_note = _tokenizer_for(spools["train"], options)
        stages["tokenizer"] = time.perf_counter() - mark
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        tokenizer.save(staging / "vocab.json")

        report = {
            "source": options.source,
            "settings": {k: v for k, v in asdict(options).items() if k not in ("source", "fingerprint")},
            "documents_read": decisions.read,
            "bytes_read": decisions.bytes_read,
            "dropped": dict(sorted(decisions.dropped.items())),
            "problems": problems.to_report(),
            "duplicates": {
                "exact_examples": decisions.exact_examples,
                "near_examples": decisions.near_examples,
            },
            "quality_histogram": {"bins": [i / 10 for i in range(11)], "counts": decisions.quality_all},
            "split": split_note,
            "tokenizer": tokenizer_note,
            "vocab_size": tokenizer.vocab_size,
            "vocab_size_asked": None if options.tokenizer_path else options.vocab_size,
        }
        for split in () if options.tokenizer_only else SPLITS:
            mark = time.perf_counter()
            spool = spools[split]
            writer = _ShardWriter(staging, split, dtype, options.shard_tokens)
            _encode_split(spool, tokenizer, writer, options.resolved_workers(), on_progress, split)
            shards = writer.finish()
            table = np.zeros(spool.count, dtype=DOCUMENT_DTYPE)
            for name, column in zip(("shard", "offset", "num_tokens"), writer.rows, strict=True):
                table[name] = np.frombuffer(column, dtype=column.typecode)
            table["num_bytes"] = np.frombuffer(spool.sizes, dtype=np.uint64)
            table["quality"] = np.frombuffer(spool.quality, dtype=np.float32)
            np.save(staging / f"{split}_documents.npy", table)
            manifest = {
                "format_version": FORMAT_VERSION,
                "split": split,
                "dtype": dtype.name,
                "tokenizer": "vocab.json",
                "tokenizer_fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id,
                "num_tokens": sum(s["num_tokens"] for s in shards),
                "num_documents": spool.count,
                "num_bytes": spool.num_bytes,
                "max_seq_length": options.max_seq_length,
                "shards": shards,
                "documents": f"{split}_documents.npy",
                "source": options.source,
                "fingerprint": options.fingerprint,
                "shard_of": [options.shard_index, options.num_shards] if options.num_shards > 1 else None,
            }
            (staging / f"{split}.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            report[f"{split}_documents"] = manifest["num_documents"]
            report[f"{split}_tokens"] = manifest["num_tokens"]
            report[f"{split}_bytes"] = manifest["num_bytes"]
            stages[f"encode_{split}"] = time.perf_counter() - mark
            spool.path.unlink()
        for leftover in staging.glob("*.spool"):
            leftover.unlink()
        total = time.perf_counter() - started
        report["stages_seconds"] = {k: round(v, 3) for k, v in stages.items()}
        report["seconds"] = round(total, 3)
        report["mb_per_second"] = round(decisions.bytes_read / 1e6 / max(total, 1e-9), 2)
        (staging / "prepare_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return PrepareResult(
        output_dir,
        output_dir / "train.json",
        output_dir / "validation.json",
        output_dir / "vocab.json",
        report,
    )


def prepare_documents(
    documents: Iterable[Document] | DataSourceConnector,
    output_dir: str | Path,
    *,
    split_fn: Callable[[str], bool] | None = None,
    on_progress: Callable[[str, int], None] | None = None,
    **options,
) -> PrepareResult:
    """``prepare`` with the options as keywords (``vocab_size=``, ``min_quality=``, ...)."""
    return prepare(
        documents, output_dir, PrepareOptions(**options), split_fn=split_fn, on_progress=on_progress
    )


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "train.json"
    if not path.is_file():
        raise DataError(
            f"manifest not found: {path} (prepare data first, e.g. `llm-prepare-data --input ... --output ...`)"
        )
    try:
        manifest = json_loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid manifest ({exc})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != FORMAT_VERSION
        or "shards" not in manifest
    ):
        raise DataError(f"{path}: not a manifest of format version {FORMAT_VERSION}; prepare the data again")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}; prepare the data again")
    manifest["_dir"] = str(path.parent)
    return manifest


_COUNTS = ("num_tokens", "num_bytes", "num_documents", "vocab_size", "eot_id", "max_seq_length", "num_items",
           "max_caption_tokens", "image_size", "num_trained_tokens", "pad_id", "end_of_turn_id")  # fmt: skip
_MAX_COUNT = 1 << 50


def _count_ok(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable (a wrong type, a negative or absurd count, a shard outside its folder),
    named with the key, or None; readers index these keys without further checks."""
    for key in _COUNTS:
        if key in manifest and not _count_ok(manifest[key]):
            return f"'{key}' must be a whole number from 0 to {_MAX_COUNT:,}, got {quoted(manifest[key])}"
    if manifest.get("dtype", "uint16") not in ("uint16", "uint32"):
        return f"'dtype' must be uint16 or uint32, got {quoted(manifest.get('dtype'))}"
    if not isinstance(manifest.get("split", ""), str):
        return f"'split' must be text, got {quoted(manifest.get('split'))}"
    shards = manifest["shards"]
    if not isinstance(shards, list):
        return f"'shards' must be a list, got {type(shards).__name__}"
    for i, shard in enumerate(shards):
        name = shard.get("path") if isinstance(shard, dict) else None
        if (
            not isinstance(name, str)
            or not name
            or Path(name).name != name
            or name in (".", "..")
            or bad_text(name)
        ):
            return f"shard {i}: 'path' must be a file name in the data folder, got {quoted(name)}"
        if not _count_ok(shard.get("num_tokens")):
            return f"shard {i}: 'num_tokens' must be a whole number from 0, got {quoted(shard.get('num_tokens'))}"
    return None


def existing_fingerprint(output_dir: str | Path) -> str | None:
    try:
        return read_manifest(Path(output_dir) / "train.json").get("fingerprint")
    except DataError:
        return None


def fingerprint_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
