"""Preference pairs as a prepared folder of kind ``"preference"``, the dataset DPO and SimPO read, and the
cache of reference log-probs beside them.

A folder holds, per split and side (``chosen``, ``rejected``), ``<split>_<side>_ids.npy``, ``_labels.npy``
and ``_offsets.npy``: the whole conversation of each pair's side (prompt, then that continuation) with labels
on the continuation's assistant tokens only, as kind ``"chat"`` stores examples (``chat_prepare``'s writer);
pair ``i`` is example ``i`` of both sides. ``reference.npz`` (written before training by DPO) holds each
pair's summed log-probs of its chosen and rejected reply under the starting model, with the fingerprint of
that model, the data and the settings that made them.
"""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path

import numpy as np

from llm_training.data.chat import IGNORE_INDEX, ChatEncoder, EncodedChat, encode_pairs
from llm_training.data.chat_formats import read_chat_file
from llm_training.data.chat_prepare import (
    ChatPrepareOptions,
    batch_width,
    encoding_summary,
    end_of_turn_id,
    pad_examples,
    split_indices,
    split_manifest,
    write_examples,
)
from llm_training.data.chat_template import ChatTemplate
from llm_training.data.loader import open_split
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError
from llm_training.fileio import atomic_open, building_dir, check_output_dir

KIND = "preference"
SIDES = ("chosen", "rejected")
REFERENCE_FILE = "reference.npz"
PREFERENCE_NAMES = (
    r"(train|validation)(\.json|_(chosen|rejected)_(ids|labels|offsets)\.npy)|vocab\.json|"
    r"prepare_report\.json|reference\.npz"
)


def prepare_preference(
    source: str | Path,
    output_dir: str | Path,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    options: ChatPrepareOptions,
    overwrite: bool = False,
) -> dict:
    """Read, encode, split and store a file of preference pairs; returns the report (as ``prepare_chat``,
    whose folder rules it follows)."""
    out = Path(output_dir)
    check = functools.partial(
        check_output_dir, out, names=PREFERENCE_NAMES, overwrite=overwrite, inputs=[source]
    )
    check()
    data = read_chat_file(source)
    if data.format != "preference":
        raise DataError(f"{source}: {data.format} records; --method dpo and simpo train on preference pairs "
                        "(records with 'prompt', 'chosen' and 'rejected', strings or messages)")  # fmt: skip
    encoder = ChatEncoder(tokenizer, template)
    pairs, report = encode_pairs(data.examples, encoder, options.max_length, options.truncation)
    splits = split_indices(source, len(pairs), options, "pair")
    sides = {side: [_whole(p.prompt_ids, getattr(p, f"{side}_ids"), getattr(p, f"{side}_labels"), p.source)
                    for p in pairs] for side in SIDES}  # fmt: skip
    end_of_turn = end_of_turn_id(sides["chosen"])
    summary = encoding_summary(source, data.format, template, report, encoder, end_of_turn)
    with building_dir(out, "llm-finetune", check) as staging:
        tokenizer.save(staging / "vocab.json")
        for split, indices in splits.items():
            counts = {side: write_examples(staging, f"{split}_{side}", [sides[side][i] for i in indices], tokenizer)
                      for side in SIDES}  # fmt: skip
            both = {
                key: sum(c[key] for c in counts.values())
                for key in ("num_tokens", "num_trained_tokens", "num_bytes")
            }
            both.update(
                num_items=len(indices), max_seq_length=max(c["max_seq_length"] for c in counts.values())
            )
            manifest = split_manifest(KIND, split, both, tokenizer, options.fingerprint, end_of_turn)
            manifest.update(counts)  # each side's own counts (bits per byte are of the chosen replies)
            (staging / f"{split}.json").write_text(json.dumps(manifest, indent=1))
            summary[f"{split}_pairs"] = len(indices)
        (staging / "prepare_report.json").write_text(json.dumps(summary, indent=1))
    return summary


def _whole(prompt: np.ndarray, ids: np.ndarray, labels: np.ndarray, source: str) -> EncodedChat:
    """One side of a pair as a whole conversation: the prompt (never trained), then the continuation."""
    return EncodedChat(
        np.concatenate([prompt, ids]), np.concatenate([np.full(len(prompt), IGNORE_INDEX), labels]), source
    )


class PreferenceDataset:
    """Pairs right-padded as ``ChatDataset`` pads examples, both sides of a batch to one width:
    ``batch(indices)`` gives ``input_ids`` and ``labels`` of shape (pairs, 2, width), chosen then rejected,
    and ``reference`` (pairs, 2) float32 when reference log-probs are given. ``seq_len``: a row's tokens at
    most (the split's longest, at most the given window); a pair is two rows of it."""

    def __init__(self, manifest_path: str | Path, seq_len: int, reference: np.ndarray | None = None) -> None:
        names = tuple(f"{side}_{name}" for side in SIDES for name in ("ids", "labels", "offsets"))
        self.manifest, arrays = open_split(manifest_path, KIND, "preference data", names)
        self.arrays = {name: np.asarray(a) if name.endswith("offsets") else a for name, a in arrays.items()}
        self.num_windows = int(self.manifest["num_items"])
        if self.num_windows == 0 or any(
            len(self.arrays[f"{s}_offsets"]) != self.num_windows + 1 for s in SIDES
        ):
            raise DataError(f"{manifest_path}: no pairs, or offsets that do not match; prepare it again")
        if reference is not None and reference.shape != (self.num_windows, 2):
            raise DataError(f"{manifest_path}: reference log-probs of {len(reference)} pairs for "
                            f"{self.num_windows}; delete {REFERENCE_FILE} beside it to compute them again")  # fmt: skip
        self.reference = reference
        self.num_tokens = int(self.manifest["num_tokens"])
        self.pad_id = int(self.manifest["pad_id"])
        self.end_of_turn_id = int(self.manifest["end_of_turn_id"])
        self.seq_len = max(1, min(seq_len, int(self.manifest["max_seq_length"]) - 1))

    @property
    def bytes_per_token(self) -> float:
        """Bytes of the chosen replies' text per trained token (validation's bits per byte are theirs)."""
        chosen = self.manifest["chosen"]
        return chosen["num_bytes"] / max(1, chosen["num_trained_tokens"])

    def example(self, index: int, side: str = "chosen") -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of one side of pair ``index``, aligned and unshifted."""
        offsets = self.arrays[f"{side}_offsets"]
        start, end = int(offsets[index]), int(offsets[index + 1])
        ids, labels = self.arrays[f"{side}_ids"], self.arrays[f"{side}_labels"]
        return np.asarray(ids[start:end], np.int64), np.asarray(labels[start:end], np.int64)

    def batch(self, indices) -> dict:
        import torch

        indices = [int(i) for i in indices]
        rows = [self.example(i, side) for i in indices for side in SIDES]  # pair i: rows 2i and 2i + 1
        width = batch_width(max(len(ids) - 1 for ids, _ in rows), self.seq_len)
        inputs, targets = pad_examples(rows, width, self.pad_id)
        batch = {
            "input_ids": torch.from_numpy(inputs).view(len(indices), 2, width),
            "labels": torch.from_numpy(targets).view(len(indices), 2, width),
        }
        if self.reference is not None:
            batch["reference"] = torch.from_numpy(np.asarray(self.reference[indices], np.float32))
        return batch


def save_reference(folder: str | Path, fingerprint: str, splits: dict[str, np.ndarray]) -> Path:
    """``<folder>/reference.npz``: each split's (pairs, 2) log-probs and their fingerprint, written whole
    (a temporary file renamed into place)."""
    path = Path(folder) / REFERENCE_FILE
    with atomic_open(path, "wb") as handle:
        np.savez(handle, fingerprint=np.array(fingerprint), **splits)
    return path


def load_reference(folder: str | Path) -> tuple[str, dict[str, np.ndarray]] | None:
    """(fingerprint, log-probs by split) of the cache in ``folder``; None when there is none or it cannot be
    read (then it is computed again)."""
    path = Path(folder) / REFERENCE_FILE
    try:
        with np.load(path, allow_pickle=False) as cache:
            return str(cache["fingerprint"]), {k: cache[k] for k in cache.files if k != "fingerprint"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
