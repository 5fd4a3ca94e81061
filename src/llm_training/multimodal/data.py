"""Image-caption data: preparation from JSON Lines (``{"text": ..., "image": path or URL}``) into a folder
the training loop reads, and the dataset of (image, caption) windows it trains on.

A prepared folder holds, per split, ``<split>_images.npy`` (N x H x W x 3 uint8, memory-mapped: images are
decoded, checked and resized once), ``<split>_captions.npy`` (every caption's tokens, each followed by
end-of-text) with ``<split>_offsets.npy``, and the manifest ``<split>.json`` (``"kind": "image_text"``), beside
``vocab.json`` (the tokenizer) and ``report.json`` (what was read, skipped and why)."""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_training.data.prepare import FORMAT_VERSION, PREPARED_NAMES
from llm_training.errors import DataError
from llm_training.fileio import building_dir, check_output_dir
from llm_training.limits import MAX_LINE_BYTES, bad_text, json_loads
from llm_training.multimodal.images import ImageProblem, load_image, resized

KIND = "image_text"


@dataclass
class ImageTextOptions:
    vocab_size: int = 512
    tokenizer: str | None = None  # an existing tokenizer instead of one trained on the captions
    image_size: int = 64
    validation_fraction: float = 0.1
    on_error: str = "skip"  # bad records and images: "skip" (count them) or "fail" (stop at the first)
    text_field: str = "text"
    image_field: str = "image"
    seed: int = 1234


def is_image_text(path: str | Path, image_field: str = "image") -> bool:
    """Whether a JSON Lines file's first record names an image."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    with open(path, "rb") as handle:
        while line := handle.readline(MAX_LINE_BYTES):  # an over-long first line is no caption record
            if line.strip():
                try:
                    first = json_loads(line.decode("utf-8-sig"))
                except ValueError:
                    return False
                return isinstance(first, dict) and image_field in first
    return False


def prepare_image_text(
    input_path: str | Path, output_dir: str | Path, options: ImageTextOptions, overwrite: bool = False
) -> dict:
    """Read, check, tokenize and store; returns the report. Nothing is left half-written: the folder is
    built beside the target and renamed into place, and an existing one is replaced only when this tool
    wrote all of it, or with ``overwrite``."""
    from llm_training.data.tokenizer import Tokenizer

    if options.on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be skip or fail, got {options.on_error!r}")
    source, out = Path(input_path), Path(output_dir)
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    inputs = [source, options.tokenizer]
    check = functools.partial(check_output_dir, out, names=PREPARED_NAMES, overwrite=overwrite, inputs=inputs)
    check()
    problems: Counter = Counter()
    examples: dict[str, str] = {}
    texts, pixels = [], []

    def bad(kind: str, where: str) -> None:
        if options.on_error == "fail":
            raise DataError(f"{where} (on_error=fail; use skip to leave such records out)")
        problems[kind] += 1
        examples.setdefault(kind, where)

    with open(source, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), 1):
            where = f"{source}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line without holding it
                    raw = handle.readline(1 << 20)
                bad("line_too_long", f"{where}: line longer than {MAX_LINE_BYTES:,} bytes")
                continue
            if not raw.strip():
                continue
            try:
                record = json_loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                bad("not_utf8", f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            except ValueError as exc:
                bad("invalid_json", f"{where}: not valid JSON ({exc.msg})")
                continue
            text = record.get(options.text_field) if isinstance(record, dict) else None
            image = record.get(options.image_field) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip() or not isinstance(image, str):
                bad("missing_field", f"{where}: needs a '{options.text_field}' string and an "
                                     f"'{options.image_field}' path or URL")  # fmt: skip
                continue
            if why := bad_text(text) or bad_text(image):
                bad("invalid_unicode", f"{where}: {why}")
                continue
            try:
                pixels.append(resized(load_image(image, base=source.parent), options.image_size))
            except ImageProblem as exc:
                bad(f"image_{exc.kind}", f"{where}: {exc}")
                continue
            texts.append(text.strip())
    if len(texts) < 2:
        raise DataError(f"{source}: {len(texts)} usable image-caption pair(s); at least 2 are needed")
    tokenizer = (
        Tokenizer.load(options.tokenizer) if options.tokenizer else Tokenizer.train(texts, options.vocab_size)
    )
    order = np.random.default_rng(options.seed).permutation(len(texts))
    n_val = max(1, min(len(texts), round(len(texts) * options.validation_fraction)))
    splits = {"validation": order[:n_val], "train": order[n_val:]}
    with building_dir(out, "llm-prepare-data", check) as staging:
        tokenizer.save(staging / "vocab.json")
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        report = {"source": str(source), "pairs": len(texts), "skipped": dict(problems), "examples": examples,
                  "vocab_size": tokenizer.vocab_size, "image_size": options.image_size}  # fmt: skip
        for split, indices in splits.items():
            if len(indices) == 0:  # evaluation data: everything in one split
                continue
            ids = [row + [tokenizer.eot_id] for row in tokenizer.encode_batch([texts[i] for i in indices])]
            lengths = np.array([len(x) for x in ids], dtype=np.int64)
            np.save(staging / f"{split}_images.npy", np.stack([pixels[i] for i in indices]))
            np.save(
                staging / f"{split}_captions.npy", np.concatenate([np.array(x, dtype=dtype) for x in ids])
            )
            np.save(staging / f"{split}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
            manifest = {"format_version": FORMAT_VERSION, "kind": KIND, "split": split, "shards": [],
                        "num_items": len(indices), "num_tokens": int(lengths.sum()),
                        "num_bytes": sum(len(texts[i].encode()) + 1 for i in indices),
                        "max_caption_tokens": int(lengths.max()), "image_size": options.image_size,
                        "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "eot_id": tokenizer.eot_id,
                        "max_seq_length": int(lengths.max())}  # fmt: skip
            (staging / f"{split}.json").write_text(json.dumps(manifest, indent=1))
        for split, indices in splits.items():
            report[f"{split}_pairs"] = len(indices)
        (staging / "report.json").write_text(json.dumps(report, indent=1))
    return report


class CaptionDataset:
    """The windows the loop trains on, one an image: ``batch(indices)`` gives ``images`` (B, H, W, 3) uint8,
    ``input_ids`` (end-of-text, then the caption) and ``labels`` (the caption, then end-of-text; -100 past
    it), padded to ``seq_len`` (the longest caption, at most the given length)."""

    def __init__(self, manifest_path: str | Path, seq_len: int) -> None:
        from llm_training.data.loader import open_split

        names = ("images", "captions", "offsets")
        self.manifest, arrays = open_split(manifest_path, KIND, "image-text data", names)
        self.images, self.captions, self.offsets = (arrays[n] for n in names)
        self.num_windows = int(self.manifest["num_items"])
        self.num_tokens = int(self.manifest["num_tokens"])
        self.eot_id = int(self.manifest["eot_id"])
        self.seq_len = max(1, min(seq_len, int(self.manifest["max_caption_tokens"])))
        if self.num_windows == 0:
            raise DataError(f"{manifest_path}: no image-caption pairs")

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["num_bytes"] / max(1, self.num_tokens)

    def batch(self, indices) -> dict:
        import torch

        rows = len(indices)
        inputs = np.full((rows, self.seq_len), self.eot_id, dtype=np.int64)
        labels = np.full((rows, self.seq_len), -100, dtype=np.int64)
        for row, index in enumerate(indices):
            tokens = np.asarray(self.captions[self.offsets[index] : self.offsets[index + 1]], dtype=np.int64)
            tokens = tokens[: self.seq_len]
            inputs[row, 1 : len(tokens)] = tokens[:-1]
            labels[row, : len(tokens)] = tokens
        images = torch.from_numpy(np.stack([self.images[int(i)] for i in indices]))
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels), "images": images}


def prepare_from_config(
    cfg, input_path: str | Path, output_dir: str | Path, on_error: str | None = None, overwrite: bool = False
) -> dict:
    """``prepare_image_text`` with the ``data`` and ``vision`` settings of a config."""
    d = cfg.data
    options = ImageTextOptions(vocab_size=d.vocab_size, tokenizer=d.tokenizer, image_size=cfg.vision.image_size,
                               validation_fraction=d.validation_fraction, on_error=on_error or d.on_error or "skip",
                               text_field=d.text_field, seed=d.seed)  # fmt: skip
    return prepare_image_text(input_path, output_dir, options, overwrite)


def summary(report: dict, output: str | Path) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    return (f"prepared {report['pairs']} image-caption pairs ({report['train_pairs']} train, "
            f"{report['validation_pairs']} validation) into {output}; skipped: {skipped}")  # fmt: skip
