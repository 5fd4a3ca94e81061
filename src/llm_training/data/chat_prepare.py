"""Chat and instruction data as a prepared folder of kind ``"chat"``, and the dataset the SFT objective reads.

A folder holds, per split, ``<split>_ids.npy`` and ``<split>_labels.npy`` (every example's token ids and
loss labels, int32, concatenated; labels aligned with the ids, -100 where not trained) with
``<split>_offsets.npy`` (int64, one more than the examples), the manifest ``<split>.json``
(``"kind": "chat"``, counts, the end-of-turn id, the fingerprint of what made it), ``vocab.json`` (the
tokenizer the ids are in) and ``prepare_report.json`` (what encoding kept, cut and dropped). Ragged arrays
rather than windows: an example is one sequence, never cut across windows, right-padded at batch time
(``ChatDataset``) or packed with others into full windows when the split is opened (``PackedChatDataset``).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_training.data.chat import IGNORE_INDEX, ChatEncoder, EncodedChat, encode_sft
from llm_training.data.chat_formats import read_chat_file
from llm_training.data.chat_template import ChatTemplate
from llm_training.data.loader import open_split
from llm_training.data.packing import best_fit, window_of
from llm_training.data.prepare import FORMAT_VERSION
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError
from llm_training.fileio import building_dir, check_output_dir

KIND = "chat"
PAD_MULTIPLE = 64  # a batch's width: its longest example rounded up to this (at most the window)
CHAT_NAMES = r"(train|validation)(\.json|_(ids|labels|offsets)\.npy)|vocab\.json|prepare_report\.json"


@dataclass
class ChatPrepareOptions:
    max_length: int = 2048  # tokens an example at most
    truncation: str = "truncate"  # or "drop" (chat.encode_sft)
    train_on_prompt: bool = False
    validation_fraction: float = 0.05  # of the examples, at least one
    seed: int = 1234
    fingerprint: str = ""  # of the inputs and settings: an unchanged folder is re-used


def prepare_chat(
    source: str | Path,
    output_dir: str | Path,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    options: ChatPrepareOptions,
    overwrite: bool = False,
) -> dict:
    """Read, encode, split and store a chat file; returns the report. The folder is built beside the target
    and renamed into place; an existing one is replaced only when this tool wrote it (or ``overwrite``)."""
    out = Path(output_dir)
    check = functools.partial(check_output_dir, out, names=CHAT_NAMES, overwrite=overwrite, inputs=[source])
    check()
    data = read_chat_file(source)
    if data.format == "preference":
        raise DataError(f"{source}: preference pairs (chosen/rejected) train with --method dpo or simpo; "
                        "--method sft needs prompts with one reply (messages, prompt/completion, alpaca, ...)")  # fmt: skip
    encoder = ChatEncoder(tokenizer, template, options.train_on_prompt)
    encoded, report = encode_sft(data.examples, encoder, options.max_length, options.truncation)
    splits = split_indices(source, len(encoded), options, "example")
    end_of_turn = end_of_turn_id(encoded)
    summary = encoding_summary(source, data.format, template, report, encoder, end_of_turn)
    with building_dir(out, "llm-finetune", check) as staging:
        tokenizer.save(staging / "vocab.json")
        for split, indices in splits.items():
            counts = write_examples(staging, split, [encoded[i] for i in indices], tokenizer)
            manifest = split_manifest(KIND, split, counts, tokenizer, options.fingerprint, end_of_turn)
            (staging / f"{split}.json").write_text(json.dumps(manifest, indent=1))
            summary[f"{split}_examples"] = len(indices)
        (staging / "prepare_report.json").write_text(json.dumps(summary, indent=1))
    return summary


def split_indices(source, count: int, options: ChatPrepareOptions, what: str) -> dict[str, np.ndarray]:
    """Indices of the validation and train splits: a seeded shuffle, ``validation_fraction`` (at least one)
    held out, at least one left to train on."""
    if count < 2:
        raise DataError(f"{source}: {count} trainable {what}(s) after encoding; at least 2 are needed "
                        "(one to train on, one to validate)")  # fmt: skip
    order = np.random.default_rng(options.seed).permutation(count)
    n_val = min(count - 1, max(1, round(count * options.validation_fraction)))
    return {"validation": order[:n_val], "train": order[n_val:]}


def encoding_summary(source, data_format: str, template, report, encoder, end_of_turn: int) -> dict:
    """The head of a prepared folder's ``prepare_report.json``: what was read and how it was encoded."""
    return {"source": str(source), "format": data_format, "template": template.name,
            "encoding": report.to_dict(), "end_of_turn_id": end_of_turn,
            "end_of_turn": encoder.decode([end_of_turn])}  # fmt: skip


def end_of_turn_id(encoded: list[EncodedChat]) -> int:
    """The id most examples end their training on: the template's end-of-turn markup."""
    ends = Counter(int(e.input_ids[np.flatnonzero(e.labels != IGNORE_INDEX)[-1]]) for e in encoded)
    return ends.most_common(1)[0][0]


def write_examples(folder: Path, prefix: str, examples: list[EncodedChat], tokenizer: Tokenizer) -> dict:
    """``<prefix>_ids.npy``, ``_labels.npy`` and ``_offsets.npy`` of ``examples``; returns their counts."""
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    ids = np.concatenate([e.input_ids for e in examples]).astype(np.int32)
    labels = np.concatenate([e.labels for e in examples]).astype(np.int32)
    np.save(folder / f"{prefix}_ids.npy", ids)
    np.save(folder / f"{prefix}_labels.npy", labels)
    np.save(folder / f"{prefix}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    trained = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples)
    return {"num_items": len(examples), "num_tokens": int(lengths.sum()), "num_trained_tokens": trained,
            "num_bytes": sum(trained_bytes(e.labels, tokenizer) for e in examples),
            "max_seq_length": int(lengths.max())}  # fmt: skip


def trained_bytes(labels: np.ndarray, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the text a loss counts in one example: its labels after the first position (nothing
    predicts that one)."""
    trained = labels[1:][labels[1:] != IGNORE_INDEX]
    return len(tokenizer.decode(trained.tolist()).encode("utf-8"))


def split_manifest(
    kind: str, split: str, counts: dict, tokenizer: Tokenizer, fingerprint: str, end_of_turn: int
) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": kind, "split": split, "shards": [], **counts,
            "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "eot_id": tokenizer.eot_id,
            "fingerprint": fingerprint, "end_of_turn_id": end_of_turn}  # fmt: skip


def batch_width(longest: int, seq_len: int) -> int:
    """A batch's width: its longest input, in steps of ``PAD_MULTIPLE`` (few shapes for torch.compile), at
    most ``seq_len``."""
    return min(seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def pad_examples(examples, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of aligned (ids, labels) examples: ids[:-1] against labels[1:], right-padded to
    ``width`` with ``pad_id`` and -100 (cut at ``width``)."""
    inputs = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, labels) in enumerate(examples):
        n = min(len(ids) - 1, width)
        inputs[row, :n] = ids[:n]
        targets[row, :n] = labels[1 : n + 1]
    return inputs, targets


class ChatDataset:
    """Examples right-padded: ``batch(indices)`` gives ``input_ids`` (ids[:-1], then the pad id) and ``labels``
    (labels[1:], then -100) as wide as the batch's longest example, rounded up to ``PAD_MULTIPLE`` and at most
    ``seq_len`` (the split's longest example, at most the given length). ``bytes_per_token``: bytes of the trained text per trained token, so bits per byte stay
    comparable with plain-text runs."""

    def __init__(self, manifest_path: str | Path, seq_len: int) -> None:
        names = ("ids", "labels", "offsets")
        self.manifest, arrays = open_split(manifest_path, KIND, "chat data", names)
        self.ids, self.labels, self.offsets = (arrays[n] for n in names)
        self.num_windows = int(self.manifest["num_items"])
        if self.num_windows == 0 or len(self.offsets) != self.num_windows + 1:
            raise DataError(f"{manifest_path}: no examples, or offsets that do not match; prepare it again")
        self.num_tokens = int(self.manifest["num_tokens"])
        self.pad_id = int(self.manifest["pad_id"])
        self.end_of_turn_id = int(self.manifest["end_of_turn_id"])
        self.seq_len = max(1, min(seq_len, int(self.manifest["max_seq_length"]) - 1))

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["num_bytes"] / max(1, self.manifest["num_trained_tokens"])

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of example ``index``, aligned and unshifted."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return np.asarray(self.ids[start:end], np.int64), np.asarray(self.labels[start:end], np.int64)

    def batch(self, indices) -> dict:
        import torch

        examples = [self.example(int(index)) for index in indices]
        width = batch_width(max(len(ids) - 1 for ids, _ in examples), self.seq_len)
        inputs, targets = pad_examples(examples, width, self.pad_id)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}


class PackedChatDataset(ChatDataset):
    """Examples packed into windows of ``seq_len`` + 1 tokens (``data/packing.py``: whole examples, best fit;
    one longer than that is cut, as a padded batch cuts it). ``batch(indices)`` of windows gives
    ``input_ids`` and ``labels`` shifted as in ``ChatDataset``, with ``position_ids`` (restarting at each
    example) and ``segment_ids`` (which example; -1 on the padding) of the inputs, all (B, ``seq_len``).
    Only the plan (which examples go in which window) is held; windows are built when batched."""

    def __init__(self, manifest_path: str | Path, seq_len: int) -> None:
        super().__init__(manifest_path, seq_len)
        self.seq_len = seq_len  # the full window: packing fills it whatever the longest example
        lengths = np.minimum(np.diff(self.offsets), seq_len + 1)
        self.plan = best_fit(lengths.tolist(), seq_len + 1)
        self.num_windows = len(self.plan)
        self.num_examples, self.packed_tokens = len(lengths), int(lengths.sum())

    def describe(self) -> str:
        fill = self.packed_tokens / (self.num_windows * (self.seq_len + 1))
        return (f"packed {self.num_examples:,} training examples into {self.num_windows:,} windows of "
                f"{self.seq_len} tokens ({fill:.0%} example tokens, the rest padding)")  # fmt: skip

    def window(self, index: int):
        members = self.plan[index]
        examples = [self.example(i) for i in members]
        ids, labels = ([e[part][: self.seq_len + 1] for e in examples] for part in (0, 1))
        return window_of(ids, labels, members, self.seq_len + 1, self.pad_id)

    def batch(self, indices) -> dict:
        import torch

        windows = [self.window(int(index)) for index in indices]

        def stacked(name: str, start: int, stop: int | None):
            return torch.from_numpy(np.stack([getattr(w, name)[start:stop] for w in windows]))

        return {"input_ids": stacked("input_ids", 0, -1), "labels": stacked("labels", 1, None),
                "position_ids": stacked("position_ids", 0, -1),
                "segment_ids": stacked("segment_ids", 0, -1)}  # fmt: skip
