"""``Trainer``: the usage guide's high-level API, over the same jobs as the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_training.config import Config, load_config


class Trainer:
    """``Trainer(config_file=..., data_dir=..., output_dir=...)``, then ``train(**training keys)`` and
    ``evaluate(test_data=...)``. Keyword arguments are ``training.*`` keys, or dotted ``section.key`` names."""

    def __init__(
        self,
        config_file: str | None = None,
        data_dir: str | None = None,
        output_dir: str | None = None,
        event_bus=None,
        **overrides: Any,
    ) -> None:
        self.config_file, self.data_dir, self.output_dir = config_file, data_dir, output_dir
        self.event_bus = event_bus
        self.overrides = overrides
        self.result = None

    def config(self, **more: Any) -> Config:
        """The configuration a train() with these keyword arguments would use."""
        values = {"data.data_dir": self.data_dir, "output_dir": self.output_dir}
        for key, value in {**self.overrides, **more}.items():
            values[key if "." in key else f"training.{key}"] = value
        return load_config(self.config_file, cli=values)

    def train(self, resume: str | None = None, **training: Any):
        """Train (preparing raw data first if ``data_dir`` holds text); returns the run's result."""
        from llm_training.api.jobs import run_training

        self.result = run_training(self.config(**training), resume_from=resume, bus=self.event_bus)
        return self.result

    def finetune(
        self,
        model: str,
        data: str,
        method: str = "sft",
        chat_template: str | None = None,
        train_on_prompt: bool = False,
        max_length: int | None = None,
        lora_rank: int = 0,
        packing: bool | None = None,
        resume: str | None = None,
        qlora: bool = False,
        beta: float | None = None,
        **training: Any,
    ):
        """``llm-finetune``: fine-tune ``model`` (a Hugging Face folder or a .pt checkpoint) on the chat file
        ``data`` into ``output_dir``; ``method`` "dpo" or "simpo" trains on a file of preference pairs
        (``beta``: their reward scale, default 0.1 for dpo and 2.0 for simpo); ``lora_rank`` > 0 trains LoRA
        adapters instead of every weight (other LoRA settings as ``**{"finetune.lora_alpha": 32}``); ``qlora``
        keeps the adapted weights in 4 bits (LoRA of rank 16 unless given); ``packing`` packs examples into
        full windows (None: the config's ``finetune.packing``); keyword arguments as in train(). Returns the
        run's result."""
        from llm_training.api.finetune import finetune_config, run_finetune

        values = {"output_dir": self.output_dir, "finetune.method": method, "finetune.chat_template": chat_template,
                  "finetune.train_on_prompt": train_on_prompt, "finetune.max_length": max_length,
                  "finetune.lora_rank": lora_rank, "finetune.qlora": qlora or None,
                  "finetune.packing": packing, "finetune.beta": beta}  # fmt: skip
        for key, value in {**self.overrides, **training}.items():
            values[key if "." in key else f"training.{key}"] = value
        cfg = finetune_config(self.config_file, values)
        self.result = run_finetune(cfg, model, data, resume_from=resume, bus=self.event_bus)
        return self.result

    def final_checkpoint(self) -> Path:
        """The checkpoint that evaluate() and export() use: the last train()'s final one, or the output folder's."""
        if self.result is not None:
            return Path(self.result.final_checkpoint)
        return Path(self.config().output_dir) / "checkpoints" / "model_final.pt"

    def evaluate(
        self,
        test_data: str,
        metrics: str | list[str] | None = None,
        checkpoint: str | None = None,
        batch_size: int = 16,
    ) -> dict:
        """The dictionary of ``llm-evaluate`` (``results['perplexity']``...) for the trained model."""
        from llm_training.eval.runner import evaluate_checkpoint

        return evaluate_checkpoint(checkpoint or self.final_checkpoint(), test_data, metrics, batch_size)

    def export(
        self,
        format: str = "onnx",  # noqa: A002 (the usage guide's keyword)
        output_path: str | None = None,
        quantization: str = "none",
        checkpoint: str | None = None,
        overwrite: bool = False,
        **options: Any,
    ):
        """``llm-export`` for the trained model: writes, checks and returns the export's result
        (``.export_path``, ``.size_bytes``, ``.check``). ``options``: past, pruning, validation_data, ..."""
        from llm_training.export.exporter import ExportOptions, export_checkpoint

        spec = ExportOptions(
            format=format, output=output_path, quantize=quantization, overwrite=overwrite, **options
        )
        return export_checkpoint(checkpoint or self.final_checkpoint(), spec)
