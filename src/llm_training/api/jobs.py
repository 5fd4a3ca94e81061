"""The jobs behind the commands: prepare data if needed, attach the sinks, train, report."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from llm_training import __version__, events
from llm_training.config import Config, save_config
from llm_training.data.prepare import existing_fingerprint, fingerprint_of, prepare_documents
from llm_training.data.sources import Document, read_documents, sample_data_path
from llm_training.errors import DataError, UserError
from llm_training.events import EventBus
from llm_training.monitor.console import ConsoleSink
from llm_training.monitor.files import LogSink, MetricsFileSink, setup_logging
from llm_training.train.loop import TrainResult, train

log = logging.getLogger("llm_training.jobs")

# Applied just above the hard-coded defaults when no data is given: the built-in sample trains for a fixed
# budget so the first run ends in a couple of minutes on a laptop CPU, and for at most 10 epochs so a GPU
# does not overfit the small sample (any file, variable or flag can change either).
QUICKSTART = {"training.max_time": "100s", "training.num_epochs": 10, "training.eval_interval": 100}
RAW_SUFFIXES = (".txt", ".jsonl", ".json", ".ndjson", ".gz")


def uses_sample(cfg: Config) -> bool:
    return not cfg.data.input_file and not cfg.data.data_dir


def _input_files(cfg: Config) -> list[Path]:
    if cfg.data.input_file:
        return [Path(cfg.data.input_file)]
    if cfg.data.data_dir:
        folder = Path(cfg.data.data_dir)
        if not folder.exists():
            raise DataError(f"data directory not found: {folder}")
        if folder.is_file():
            return [folder]
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RAW_SUFFIXES)
        if not files:
            raise DataError(
                f"{folder}: no train.json (prepared data) and no .txt/.jsonl/.json files to prepare"
            )
        return files
    return [sample_data_path()]


def _documents(files: list[Path], text_field: str) -> Iterator[Document]:
    for path in files:
        yield from read_documents(path, text_field)


def prepare_data(cfg: Config, bus: EventBus | None = None) -> Path:
    """Return a folder of prepared data: ``data.data_dir`` when it already is one, else prepare the input."""
    if cfg.data.data_dir and (Path(cfg.data.data_dir) / "train.json").is_file():
        return Path(cfg.data.data_dir)
    files = _input_files(cfg)
    for path in files:  # fail before anything is written
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"input file is empty: {path}")
    d = cfg.data
    target = Path(cfg.output_dir) / d.prepared_dir
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    fingerprint = fingerprint_of(
        __version__, stats, d.vocab_size, d.validation_fraction, d.seed, d.text_field, d.tokenizer
    )
    if existing_fingerprint(target) == fingerprint:
        log.info("reusing prepared data in %s", target)
        return target
    result = prepare_documents(
        _documents(files, d.text_field),
        target,
        vocab_size=d.vocab_size,
        validation_fraction=d.validation_fraction,
        seed=d.seed,
        tokenizer_path=d.tokenizer,
        max_seq_length=d.max_seq_length,
        source=", ".join(str(p) for p in files),
        fingerprint=fingerprint,
    )
    if bus is not None:
        bus.publish(events.DATA_PREPARED, path=str(target), **result.report)
    return target


def run_training(
    cfg: Config, resume_from: str | Path | None = None, *, console: bool = True, bus: EventBus | None = None
) -> TrainResult:
    """Prepare (if needed) and train with the console, log and metrics sinks attached."""
    out = Path(cfg.output_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError(
            f"started as {world} processes (torchrun/accelerate), but this version trains in one process only; "
            "run it without a launcher"
        )
    if resume_from and not Path(resume_from).is_file():
        raise UserError(f"checkpoint not found: {resume_from}")
    out.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    handler = setup_logging(out / cfg.logging.log_dir, cfg.logging.level, run_id)
    bus = bus or EventBus()
    ConsoleSink(bus, enabled=console and cfg.logging.progress_bar)
    LogSink(bus)
    MetricsFileSink(bus, out / "metrics.jsonl")
    bus.subscribe(events.RUN_START, lambda e: save_config(cfg, out / "config.yaml"))
    try:
        log.info("run %s starting in %s", run_id, out.resolve())
        if cfg.resources.distributed:
            log.warning("resources.distributed is set but training runs in one process in this version")
        data_dir = prepare_data(cfg, bus)
        return train(cfg, data_dir, bus, resume_from)
    except UserError as exc:
        log.error("%s", exc)
        raise
    finally:
        logging.getLogger("llm_training").removeHandler(handler)
        handler.close()
