"""``DataPreparationPipeline``: the usage guide's data preparation entry point."""

from __future__ import annotations

from pathlib import Path

from llm_training.config import load_config
from llm_training.data.prepare import PrepareResult, prepare_documents
from llm_training.data.sources import read_documents


class DataPreparationPipeline:
    """Raw text -> ``train.json``, ``validation.json``, ``vocab.json`` and token shards in ``output_dir``."""

    def __init__(
        self,
        output_dir: str | Path = "prepared_data",
        *,
        vocab_size: int | None = None,
        validation_fraction: float | None = None,
        seed: int | None = None,
        text_field: str | None = None,
    ) -> None:
        overrides = {
            "data.vocab_size": vocab_size,
            "data.validation_fraction": validation_fraction,
            "data.seed": seed,
            "data.text_field": text_field,
        }
        self.config = load_config(cli=overrides, default_file=None).data
        self.output_dir = Path(output_dir)

    def run(
        self, input_file: str | Path, max_seq_length: int = 2048, vocab_size: int | None = None
    ) -> PrepareResult:
        d = self.config
        return prepare_documents(
            read_documents(input_file, d.text_field),
            self.output_dir,
            vocab_size=vocab_size or d.vocab_size,
            validation_fraction=d.validation_fraction,
            seed=d.seed,
            tokenizer_path=d.tokenizer,
            max_seq_length=max_seq_length,
            source=str(input_file),
        )
