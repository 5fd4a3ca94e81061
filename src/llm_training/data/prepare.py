"""Documents -> cleaned text -> tokenizer -> memory-mapped token shards with manifests.

Output folder:
    train_000000.bin, validation_000000.bin   token ids (uint16 when the vocabulary fits, else uint32),
                                              one end-of-text token after every document
    train.json, validation.json               manifests: dtype, shards with sizes and sha256, token, document
                                              and byte counts (bytes make bits per byte exact)
    vocab.json                                the tokenizer (Hugging Face ``tokenizers`` JSON)
    prepare_report.json                       what was read, dropped and kept

The folder is built under a temporary name and renamed into place, so a failure never leaves half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_training.data.clean import clean_text
from llm_training.data.sources import Document
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "validation")


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


def _write_shard(path: Path, ids: np.ndarray) -> dict:
    with open(path, "wb") as handle:
        handle.write(ids.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "path": path.name,
        "num_tokens": int(ids.size),
        "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }


def prepare_documents(
    documents: Iterable[Document],
    output_dir: str | Path,
    *,
    vocab_size: int = 4096,
    validation_fraction: float = 0.05,
    seed: int = 1234,
    tokenizer_path: str | Path | None = None,
    max_seq_length: int = 2048,
    source: str = "",
    fingerprint: str | None = None,
    on_progress=None,
    split_fn=None,
) -> PrepareResult:
    """Clean, split, tokenize and write ``documents`` into ``output_dir`` (replaced atomically).

    ``split_fn(doc_id) -> bool`` chooses validation documents; the default hashes the id with ``seed``.
    """
    split_fn = split_fn or (lambda doc_id: is_validation(doc_id, seed, validation_fraction))
    start = time.perf_counter()
    output_dir = Path(output_dir)
    report: dict = {"source": source, "documents_read": 0, "dropped_empty": 0, "bytes_read": 0}
    kept: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc in documents:
        report["documents_read"] += 1
        report["bytes_read"] += len(doc.text.encode("utf-8"))
        text = clean_text(doc.text)
        if not text:
            report["dropped_empty"] += 1
            continue
        split = "validation" if split_fn(doc.id) else "train"
        kept[split].append(text)
    if not kept["train"] and not kept["validation"]:
        raise DataError(
            f"{source or 'input'}: no documents with text left after cleaning ({report['documents_read']} read)"
        )
    if not kept["train"] or not kept["validation"]:
        # too few documents for a split by document: hold out the tail of the text instead
        texts = kept["train"] + kept["validation"]
        kept = _split_tail(texts, validation_fraction)
        report["split"] = "tail of the text (too few documents to split by document)"
    else:
        report["split"] = f"by document id hash (seed {seed}, fraction {validation_fraction})"

    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        if on_progress:
            on_progress("training tokenizer")
        tokenizer = Tokenizer.train(kept["train"], vocab_size)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; prepared data is shared like any output
    try:
        tokenizer.save(staging / "vocab.json")
        for split in SPLITS:
            if on_progress:
                on_progress(f"encoding {split}")
            encoded = tokenizer.encode_batch(kept[split])
            pieces = []
            for ids in encoded:
                pieces.append(np.asarray(ids, dtype=dtype))
                pieces.append(np.asarray([tokenizer.eot_id], dtype=dtype))
            ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
            shard = _write_shard(staging / f"{split}_000000.bin", ids)
            manifest = {
                "format_version": FORMAT_VERSION,
                "split": split,
                "dtype": np.dtype(dtype).name,
                "tokenizer": "vocab.json",
                "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id,
                "num_tokens": shard["num_tokens"],
                "num_documents": len(kept[split]),
                "num_bytes": sum(len(t.encode("utf-8")) for t in kept[split]),
                "max_seq_length": max_seq_length,
                "shards": [shard],
                "source": source,
                "fingerprint": fingerprint,
            }
            (staging / f"{split}.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            report[f"{split}_documents"] = manifest["num_documents"]
            report[f"{split}_tokens"] = manifest["num_tokens"]
            report[f"{split}_bytes"] = manifest["num_bytes"]
        report["vocab_size"] = tokenizer.vocab_size
        report["seconds"] = round(time.perf_counter() - start, 3)
        (staging / "prepare_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PrepareResult(
        output_dir,
        output_dir / "train.json",
        output_dir / "validation.json",
        output_dir / "vocab.json",
        report,
    )


def _split_tail(texts: list[str], fraction: float) -> dict[str, list[str]]:
    joined = "\n\n".join(texts)
    cut = int(len(joined) * (1 - fraction))
    newline = joined.rfind("\n", 0, cut)
    cut = newline if newline > len(joined) // 2 else cut
    train, validation = joined[:cut].strip(), joined[cut:].strip()
    if not train or not validation:
        raise DataError("input is too short to hold out validation text; give it more text")
    return {"train": [train], "validation": [validation]}


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap the finished folder into place; an existing one is removed only after the new one is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "train.json"
    if not path.is_file():
        raise DataError(
            f"manifest not found: {path} (prepare data first, e.g. `python -m llm_training.main --input-file ...`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid manifest ({exc})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != FORMAT_VERSION
        or "shards" not in manifest
    ):
        raise DataError(f"{path}: not a manifest of format version {FORMAT_VERSION}; prepare the data again")
    manifest["_dir"] = str(path.parent)
    return manifest


def existing_fingerprint(output_dir: str | Path) -> str | None:
    try:
        return read_manifest(Path(output_dir) / "train.json").get("fingerprint")
    except DataError:
        return None


def fingerprint_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
