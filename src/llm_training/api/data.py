"""``DataPreparationPipeline``: the usage guide's data preparation entry point, and the config-to-pipeline
glue that the CLI and the main job share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_training.config import DataConfig, load_config
from llm_training.data.prepare import PrepareOptions, PrepareResult, prepare
from llm_training.data.sources import DataSourceConnector, open_source


def source_from_config(
    d: DataConfig, spec: str | Path | DataSourceConnector, on_error: str = "skip"
) -> DataSourceConnector:
    """The connector for ``spec``; ``on_error`` is the caller's default when ``data.on_error`` is unset."""
    return open_source(
        spec,
        fmt=d.format,
        text_field=d.text_field,
        max_document_bytes=d.max_document_bytes,
        on_error=d.on_error or on_error,
    )


def options_from_config(d: DataConfig, **extra: Any) -> PrepareOptions:
    return PrepareOptions(
        vocab_size=d.vocab_size,
        validation_fraction=d.validation_fraction,
        seed=d.seed,
        tokenizer_path=d.tokenizer,
        max_seq_length=d.max_seq_length,
        min_quality=d.min_quality,
        deduplicate=d.deduplicate,
        dedup_threshold=d.dedup_threshold,
        tokenizer_sample_bytes=d.tokenizer_sample_bytes,
        workers=d.workers,
        **extra,
    )


class DataPreparationPipeline:
    """Raw text -> ``train.json``, ``validation.json``, ``vocab.json`` and token shards in ``output_dir``.

    Keyword arguments are ``data`` config keys (``vocab_size``, ``min_quality``, ``deduplicate``,
    ``text_field``, ``format``, ``tokenizer``, ``on_error``, ...); the rest come from the configuration
    hierarchy (``config/default.yaml``, ``LLM_TRAINING__DATA__*`` variables).
    """

    def __init__(self, output_dir: str | Path = "prepared_data", event_bus=None, **data: Any) -> None:
        overrides = {f"data.{key}": value for key, value in data.items() if value is not None}
        self.config = load_config(cli=overrides).data
        self.output_dir = Path(output_dir)
        self.event_bus = event_bus

    def run(
        self,
        input_file: str | Path | DataSourceConnector,
        max_seq_length: int | None = None,
        vocab_size: int | None = None,
        on_progress=None,
    ) -> PrepareResult:
        """Prepare ``input_file`` (a path, folder, glob, URL, ``hf://`` dataset or a connector)."""
        d = self.config
        source = source_from_config(d, input_file)
        options = options_from_config(d, source=source.describe())
        options.max_seq_length = max_seq_length or d.max_seq_length
        options.vocab_size = vocab_size or d.vocab_size
        result = prepare(source, self.output_dir, options, on_progress=on_progress)
        if self.event_bus is not None:
            self.event_bus.publish("data_prepared", path=str(self.output_dir), **result.report)
        return result
