"""Byte-level BPE tokenizer, trained and run by Hugging Face ``tokenizers``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from llm_training.errors import DataError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
SPECIAL_TOKENS = (EOT, PAD, BOS)


class Tokenizer:
    """A thin wrapper that knows the special tokens; ``vocab.json`` in prepared data is its saved form."""

    def __init__(self, backend) -> None:
        self.backend = backend
        eot = backend.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer has no end-of-text token {EOT!r}")
        self.eot_id: int = eot
        self.pad_id: int | None = backend.token_to_id(PAD)
        self.bos_id: int | None = backend.token_to_id(BOS)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
            raise DataError(f"{path}: not a tokenizer file ({str(exc).splitlines()[0]})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.backend.to_str(pretty=False), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> dict:
        return json.loads(self.backend.to_str())
