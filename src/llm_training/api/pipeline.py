"""``Pipeline``: the usage guide's mid-level API. Stages run in the order added, each consuming the output of
the ones before, over the same functions as the commands:

- ``data_collection(source=..., text_field=..., format=..., limit=...)``: any input ``llm-prepare-data`` reads
  (a file, folder, glob, ``http(s)://``, ``s3://`` through ``fsspec``, ``hf://``) streamed into
  ``<output_dir>/collected.jsonl`` with the document count;
- ``preprocessing(vocab_size=..., min_quality=..., deduplicate=..., ...)``: ``data`` config keys; cleaning,
  filtering, the tokenizer and token shards in ``<output_dir>/prepared_data``;
- ``training(num_epochs=..., ...)``: ``training`` keys (or dotted ``section.key`` names); checkpoints in
  ``<output_dir>/run``;
- ``evaluation(metrics=[...], test_data=None)``: ``llm-evaluate`` on ``test_data``, or on the prepared
  validation split when none is given;
- ``export(format='onnx', quantization=..., output_path=...)``: ``llm-export`` of the final checkpoint.

``run()`` returns ``{stage name: result dict}``. What each finished stage produced is recorded in
``<output_dir>/pipeline.json`` with its options; a stage that fails raises ``PipelineError`` naming it, and
running the same pipeline again starts at that stage (finished stages whose options did not change are
reused, so a failed export does not retrain the model). ``run(start_from='training')`` reruns from a stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from llm_training.errors import UserError
from llm_training.fileio import atomic_open, write_json
from llm_training.limits import read_json_file

log = logging.getLogger("llm_training.pipeline")

STAGES = ("data_collection", "preprocessing", "training", "evaluation", "export")
STATE_FILE = "pipeline.json"


class PipelineError(UserError):
    """A stage failed; ``stage`` names it and ``results`` holds what the stages before it produced."""

    def __init__(self, stage: str, cause: BaseException, results: dict) -> None:
        super().__init__(f"pipeline stage '{stage}' failed: {cause}")
        self.stage, self.cause, self.results = stage, cause, results


class Pipeline:
    """``Pipeline().add_stage(name, **options)`` ... ``.run()``: the stages of the module's description, in
    order, with their outputs and options recorded in ``<output_dir>/pipeline.json``."""

    def __init__(
        self, output_dir: str | Path = "pipeline_output", config_file: str | None = None, event_bus=None
    ):
        self.output_dir = Path(output_dir)
        self.config_file = config_file
        self.event_bus = event_bus
        self.stages: list[tuple[str, dict]] = []

    def add_stage(self, name: str, **options: Any) -> Pipeline:
        """Add a stage by name (data_collection, preprocessing, training, evaluation, export) with its options; returns the pipeline."""
        if name not in STAGES:
            raise UserError(f"unknown pipeline stage {name!r}; valid: {', '.join(STAGES)}")
        if any(existing == name for existing, _ in self.stages):
            raise UserError(f"pipeline stage {name!r} is already added")
        self.stages.append((name, options))
        return self

    # ------------------------------------------------------------------------------------------- running

    def run(self, start_from: str | None = None) -> dict[str, dict]:
        """Run the stages in order, each on the one before's output; returns the results by stage name."""
        if not self.stages:
            raise UserError("the pipeline has no stages; add some with add_stage(name, **options)")
        names = [n for n, _ in self.stages]
        if start_from is not None and start_from not in names:
            raise UserError(f"start_from {start_from!r} is not a stage of this pipeline ({', '.join(names)})")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        results: dict[str, dict] = {}
        rerun = False  # once a stage runs, every later one runs too
        for name, options in sorted(self.stages, key=lambda s: STAGES.index(s[0])):
            key = _fingerprint(name, options, results)
            done = state.get(name)
            rerun = rerun or name == start_from
            if not rerun and done and done.get("key") == key and _still_there(done["result"]):
                log.info("pipeline: %s already done, reused", name)
                results[name] = done["result"]
                continue
            rerun = True
            log.info("pipeline: running %s", name)
            try:
                result = getattr(self, "_" + name)(dict(options), results)
            except Exception as exc:
                state.pop(name, None)
                self._save_state(state)
                raise PipelineError(name, exc, results) from exc
            results[name] = result
            state[name] = {"key": key, "result": result}
            self._save_state(state)
            if self.event_bus is not None:
                self.event_bus.publish("pipeline_stage_done", stage=name, result=result)
        return results

    def _load_state(self) -> dict:
        path = self.output_dir / STATE_FILE
        try:
            return read_json_file(path) if path.is_file() else {}
        except ValueError:
            log.warning("%s is not valid JSON; every stage runs again", path)
            return {}

    def _save_state(self, state: dict) -> None:
        write_json(self.output_dir / STATE_FILE, state, default=str)

    # -------------------------------------------------------------------------------------------- stages

    def _data_collection(self, options: dict, results: dict) -> dict:
        from llm_training.data.sources import open_source

        source = options.pop("source", None) or options.pop("input_file", None)
        if source is None:
            raise UserError("data_collection needs source=... (a file, folder, glob, URL or hf:// dataset)")
        limit = options.pop("limit", None)
        unknown = set(options) - {"text_field", "format", "on_error"}
        if unknown:
            raise UserError(f"data_collection: unknown option {sorted(unknown)[0]!r}; valid: source, text_field, "
                            "format, on_error, limit")  # fmt: skip
        connector = open_source(source, fmt=options.get("format"), text_field=options.get("text_field", "text"),
                                on_error=options.get("on_error", "skip"))  # fmt: skip
        target = self.output_dir / "collected.jsonl"
        count = size = 0
        with atomic_open(target) as out:
            for doc in connector.documents():
                out.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
                count += 1
                size += len(doc.text.encode())
                if limit and count >= int(limit):
                    break
            if count == 0:  # raised inside: the temporary goes, an earlier file stays
                raise UserError(f"{source}: no documents could be read")
        return {"source": str(source), "path": str(target), "documents": count, "bytes": size}

    def _preprocessing(self, options: dict, results: dict) -> dict:
        from llm_training.api.data import DataPreparationPipeline

        collected = results.get("data_collection", {}).get("path") or options.pop("input_file", None)
        if collected is None:
            raise UserError("preprocessing needs a data_collection stage before it, or input_file=...")
        prepared = self.output_dir / "prepared_data"
        result = DataPreparationPipeline(prepared, self.event_bus, **options).run(collected)
        report = result.report
        keys = (
            "documents_read",
            "train_documents",
            "validation_documents",
            "train_tokens",
            "validation_tokens",
        )
        return {"data_dir": str(prepared), **{k: report.get(k) for k in keys}}

    def _training(self, options: dict, results: dict) -> dict:
        from llm_training.api.jobs import run_training_on
        from llm_training.config import load_config

        data_dir = results.get("preprocessing", {}).get("data_dir") or options.pop("data_dir", None)
        if data_dir is None:
            raise UserError("training needs a preprocessing stage before it, or data_dir=...")
        values = {"output_dir": str(self.output_dir / "run")}
        for key, value in options.items():
            values[key if "." in key else f"training.{key}"] = value
        cfg = load_config(self.config_file, cli=values)
        result = run_training_on(cfg, data_dir, console=cfg.logging.progress_bar, bus=self.event_bus)
        if result.status == "interrupted":
            raise UserError(
                f"training was interrupted at step {result.steps}; run the pipeline again to go on"
            )
        return {"status": result.status, "final_checkpoint": str(result.final_checkpoint), "steps": result.steps,
                "tokens": result.tokens, "seconds": round(result.seconds, 2), "val_loss": result.val_loss,
                "val_perplexity": result.val_perplexity, "val_bpb": result.val_bpb}  # fmt: skip

    def _checkpoint(self, options: dict, results: dict, stage: str) -> str:
        checkpoint = options.pop("checkpoint", None) or results.get("training", {}).get("final_checkpoint")
        if checkpoint is None:
            raise UserError(f"{stage} needs a training stage before it, or checkpoint=...")
        return str(checkpoint)

    def _evaluation(self, options: dict, results: dict) -> dict:
        from llm_training.eval.runner import evaluate_checkpoint, evaluate_prepared

        checkpoint = self._checkpoint(options, results, "evaluation")
        metrics = options.pop("metrics", None)
        test_data = options.pop("test_data", None)
        batch_size = int(options.pop("batch_size", 16))
        if options:
            raise UserError(f"evaluation: unknown option {sorted(options)[0]!r}; valid: metrics, test_data, "
                            "batch_size, checkpoint")  # fmt: skip
        if test_data is not None:
            return evaluate_checkpoint(checkpoint, test_data, metrics, batch_size)
        data_dir = results.get("preprocessing", {}).get("data_dir")
        if data_dir is None:
            raise UserError(
                "evaluation needs test_data=... (no preprocessing stage gives a validation split)"
            )
        return evaluate_prepared(checkpoint, data_dir, metrics, batch_size)

    def _export(self, options: dict, results: dict) -> dict:
        from llm_training.export.exporter import (
            ExportOptions,
            default_output,
            export_checkpoint,
            normalise_format,
        )

        checkpoint = self._checkpoint(options, results, "export")
        fmt = options.pop("format", "onnx")
        output = options.pop("output_path", None) or default_output(
            Path(checkpoint), normalise_format(fmt), self.output_dir / "exports", "model"
        )
        quantize = options.pop("quantization", options.pop("quantize", "none"))
        spec = ExportOptions(format=fmt, output=output, quantize=quantize, overwrite=True, **options)
        return export_checkpoint(checkpoint, spec).as_dict()


def _fingerprint(name: str, options: dict, before: dict) -> str:
    """A stage's identity: its options and what the stages before it produced."""
    text = json.dumps([name, options, before], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _still_there(result: dict) -> bool:
    """A finished stage is reused only if the files it made still exist."""
    paths = [result.get(k) for k in ("path", "data_dir", "final_checkpoint", "export_path")]
    return all(Path(p).exists() for p in paths if p)
