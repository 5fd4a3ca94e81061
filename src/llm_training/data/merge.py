"""Merge prepared folders made by sharded preparation (``--num-shards N --shard-index i``) into one.

Every input must come from the same tokenizer (checked by fingerprint). Shard files are hard-linked when the
file system allows it, copied otherwise; manifests, document tables and reports are combined. Documents were
assigned to shards by a hash of their content, so exact duplicates always met in one shard and the merged
data has none; near duplicates are only found within a shard.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from llm_training.data.prepare import DOCUMENT_DTYPE, PREPARED_NAMES, SPLITS, read_manifest
from llm_training.errors import DataError
from llm_training.fileio import building_dir, check_output_dir
from llm_training.limits import read_json_file


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def report_of(folder: Path) -> dict:
    """A shard's ``prepare_report.json``; a damaged one stops the merge in one line."""
    try:
        report = read_json_file(folder / "prepare_report.json")
    except (OSError, ValueError) as exc:
        raise DataError(f"{exc}; prepare that folder again") from None
    return report if isinstance(report, dict) else {}


def merge_prepared(inputs: list[str | Path], output_dir: str | Path, overwrite: bool = False) -> dict:
    """Combine ``inputs`` into ``output_dir`` (replaced atomically, and only when this tool wrote all of
    it or with ``overwrite``); returns the merged report."""
    folders = [Path(p) for p in inputs]
    if len(folders) < 2:
        raise DataError("--merge needs at least two prepared folders")
    output_dir = Path(output_dir)
    check = functools.partial(
        check_output_dir, output_dir, names=PREPARED_NAMES, overwrite=overwrite, inputs=folders
    )
    check()
    manifests = {split: [read_manifest(f / f"{split}.json") for f in folders] for split in SPLITS}
    fingerprints = {m.get("tokenizer_fingerprint") for m in manifests["train"]}
    if len(fingerprints) != 1 or None in fingerprints:
        raise DataError(
            "the folders were prepared with different tokenizers; sharded preparation must share one "
            "(--tokenizer)"
        )
    with building_dir(output_dir, "llm-prepare-data --merge", check) as staging:
        shutil.copy2(folders[0] / "vocab.json", staging / "vocab.json")
        report: dict = {
            "merged_from": [str(f) for f in folders],
            "documents_read": 0,
            "bytes_read": 0,
            "dropped": {},
            "problems": {"counts": {}, "examples": []},
            "duplicates": {"exact_examples": [], "near_examples": []},
            "quality_histogram": {"bins": [i / 10 for i in range(11)], "counts": [0] * 10},
        }
        for split in SPLITS:
            shards, tables = [], []
            merged = dict(manifests[split][0])
            for index, (folder, manifest) in enumerate(zip(folders, manifests[split], strict=True)):
                base = len(shards)
                for shard in manifest["shards"]:
                    name = f"{split}_m{index:03d}_{shard['path'].split('_')[-1]}"
                    _link_or_copy(folder / shard["path"], staging / name)
                    shards.append({**shard, "path": name})
                if manifest.get("documents") and (folder / manifest["documents"]).is_file():
                    table = np.load(folder / manifest["documents"])
                    table["shard"] += base
                    tables.append(table)
            table = np.concatenate(tables) if tables else np.zeros(0, dtype=DOCUMENT_DTYPE)
            np.save(staging / f"{split}_documents.npy", table)
            for key in ("num_tokens", "num_documents", "num_bytes"):
                merged[key] = sum(m[key] for m in manifests[split])
            merged.update(shards=shards, documents=f"{split}_documents.npy", shard_of=None)
            merged.pop("_dir", None)
            (staging / f"{split}.json").write_text(json.dumps(merged, indent=2), encoding="utf-8")
            report[f"{split}_documents"] = merged["num_documents"]
            report[f"{split}_tokens"] = merged["num_tokens"]
        # Every shard read, cleaned and scored the whole input, so reading problems, empty and low-quality
        # documents and the quality histogram are the same in each: take them from one. Duplicates were
        # found per shard: add them up. Documents other shards kept are not "dropped".
        parts = [report_of(f) for f in folders if (f / "prepare_report.json").is_file()]
        if parts:
            first = parts[0]
            for key in ("documents_read", "bytes_read", "problems", "quality_histogram", "settings"):
                report[key] = first.get(key, report.get(key))
            dropped = Counter({k: v for k, v in first.get("dropped", {}).items() if "duplicate" not in k})
            for part in parts:
                dropped.update({k: v for k, v in part.get("dropped", {}).items() if "duplicate" in k})
                for kind in ("exact_examples", "near_examples"):
                    report["duplicates"][kind] += part.get("duplicates", {}).get(kind, [])
            dropped.pop("other_shard", None)
            report["dropped"] = dict(sorted(dropped.items()))
        (staging / "prepare_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
