"""``ModelExporter``: the usage guide's export component, over the same ``export_checkpoint`` as ``llm-export``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPORT_DONE = "export_done"

_OPTIMIZATION_KEYS = {"quantization", "pruning", "past_key_values", "max_perplexity_increase"}


@dataclass
class ModelExporterInput:
    """``export_format``: onnx, torchscript, safetensors, hf or gguf. ``optimization``: ``quantization``
    (none, int8, fp16), ``pruning`` (False, a sparsity such as 0.3, or ``{'sparsity': 0.3, 'scope':
    'global'}``), ``past_key_values`` (ONNX: inputs for fast generation; default True), ``max_perplexity_increase``.
    ``output_path``: None writes ``exports/<checkpoint name>.<ext>``."""

    checkpoint_path: str | Path
    export_format: str = "onnx"
    optimization: dict = field(default_factory=dict)
    output_path: str | Path | None = None
    overwrite: bool = False
    validation_data: str | Path | None = None


@dataclass
class ModelExporterOutput:
    export_path: Path
    export_format: str
    size_bytes: int
    check: dict
    pruning: dict | None
    files: list[Path]
    result: Any  # the full llm_training.export.exporter.ExportResult


class ModelExporter:
    """``export(ModelExporterInput(...))`` writes, checks and reports one export; publishes ``export_done``."""

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus

    def export(self, spec: ModelExporterInput | None = None, **fields: Any) -> ModelExporterOutput:
        """Export a checkpoint (a ModelExporterInput or its fields as keywords); returns the path, size and self-check, and publishes export_done."""
        from llm_training.errors import ConfigError
        from llm_training.export.exporter import ExportOptions, export_checkpoint

        spec = spec or ModelExporterInput(**fields)
        opt = dict(spec.optimization or {})
        unknown = set(opt) - _OPTIMIZATION_KEYS
        if unknown:
            raise ConfigError(
                f"optimization: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(_OPTIMIZATION_KEYS))}"
            )
        options = ExportOptions(
            format=spec.export_format, output=spec.output_path, quantize=str(opt.get("quantization") or "none"),
            past=bool(opt.get("past_key_values", True)), pruning=opt.get("pruning"), overwrite=spec.overwrite,
            validation_data=spec.validation_data,
            max_perplexity_increase=float(opt.get("max_perplexity_increase", 0.05)),
        )  # fmt: skip
        result = export_checkpoint(spec.checkpoint_path, options)
        if self.event_bus is not None:
            self.event_bus.publish(EXPORT_DONE, **result.as_dict())
        return ModelExporterOutput(result.export_path, result.format, result.size_bytes, result.check,
                                   result.pruning, result.files, result)  # fmt: skip
