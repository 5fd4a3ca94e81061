"""The jobs behind the commands: prepare data if needed, attach the sinks, train, report."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from llm_training import __version__, events
from llm_training.api.data import options_from_config, source_from_config
from llm_training.config import Config, is_resolved_config, save_config
from llm_training.data.notes import job_notes
from llm_training.data.prepare import existing_fingerprint, fingerprint_of, prepare
from llm_training.data.sources import sample_data_path
from llm_training.errors import DataError, UserError
from llm_training.events import EventBus
from llm_training.fileio import check_output_file
from llm_training.monitor.console import ConsoleSink, StageProgress, is_tty
from llm_training.monitor.files import LogSink, MetricsFileSink, setup_logging
from llm_training.monitor.tensorboard import TensorBoardSink
from llm_training.monitor.tensorboard import available as tensorboard_available
from llm_training.train.distributed import broadcast_object, one_process_hint
from llm_training.train.loop import TrainResult, train

log = logging.getLogger("llm_training.jobs")

JOB_START_VARIABLE = "LLM_TRAINING_JOB_START"  # Unix time a launcher started the job, for its workers

# Applied just above the hard-coded defaults when no data is given: the built-in sample trains for a fixed
# budget so the first run ends in a couple of minutes on a laptop CPU, and for at most 10 epochs so a GPU
# does not overfit the small sample (any file, variable or flag can change either).
QUICKSTART = {"training.max_time": "100s", "training.num_epochs": 10, "training.eval_interval": 100}


def uses_sample(cfg: Config) -> bool:
    return not cfg.data.input_file and not cfg.data.data_dir


def _input_spec(cfg: Config) -> str:
    if cfg.data.input_file:
        return cfg.data.input_file
    if cfg.data.data_dir:
        folder = Path(cfg.data.data_dir)
        if not folder.exists():
            raise DataError(f"data directory not found: {folder}")
        return str(folder)
    return str(sample_data_path())


def _size_and_mtime(path: str) -> tuple[int, ...]:
    try:
        info = os.stat(path)
    except OSError:  # a URL or dataset name: its name alone identifies it
        return ()
    return info.st_size, info.st_mtime_ns


def _plan_preparation(cfg: Config):
    """(source, target folder, fingerprint) of the text preparation ``prepare_data`` would run; resolving the
    input checks it exists and is not empty, before anything is written."""
    try:
        source = source_from_config(cfg.data, _input_spec(cfg), on_error="fail")
    except DataError as exc:
        if cfg.data.data_dir and not cfg.data.input_file and "no input files" in str(exc):
            raise DataError(
                f"{cfg.data.data_dir}: no train.json (prepared data) and no input files to prepare"
            ) from None
        raise
    target = Path(cfg.output_dir) / cfg.data.prepared_dir
    paths = getattr(source, "paths", [source.describe()])
    stats = [(p, *_size_and_mtime(p)) for p in paths]
    return source, target, fingerprint_of(__version__, stats, sorted(vars(cfg.data).items()))


def prepare_data(cfg: Config, bus: EventBus | None = None, progress: bool = False, plan=None) -> Path:
    """Return a folder of prepared data: ``data.data_dir`` when it already is one, else prepare the input
    (``plan``: ``_plan_preparation``'s, when the caller made it already)."""
    if cfg.data.data_dir and (Path(cfg.data.data_dir) / "train.json").is_file():
        return Path(cfg.data.data_dir)
    from llm_training.multimodal.data import is_image_text, prepare_from_config, summary

    spec = _input_spec(cfg)
    if is_image_text(spec):  # JSON Lines of captions and image paths: a text-and-image run
        target = Path(cfg.output_dir) / cfg.data.prepared_dir
        report = prepare_from_config(cfg, spec, target)
        log.info(summary(report, target))
        if bus is not None:
            bus.publish(events.DATA_PREPARED, path=str(target), **report)
        return target
    source, target, fingerprint = plan or _plan_preparation(cfg)
    if existing_fingerprint(target) == fingerprint:
        log.info("reusing prepared data in %s", target)
        return target
    options = options_from_config(cfg.data, source=source.describe(), fingerprint=fingerprint)
    bar = StageProgress(progress and is_tty(sys.stderr))  # in a log or pipe the stage timings suffice
    try:
        result = prepare(source, target, options, on_progress=bar)
    finally:
        bar.close()
    dropped = sum(result.report["dropped"].values()) + sum(result.report["problems"]["counts"].values())
    if dropped:
        log.warning("data preparation left out %d records; see %s", dropped, target / "prepare_report.json")
    if bus is not None:
        bus.publish(events.DATA_PREPARED, path=str(target), **result.report)
    return target


def _save_config(cfg: Config, path: Path) -> None:
    try:
        save_config(cfg, path)
    except UserError as exc:  # a full disk: one line (a handler's error would be logged with a traceback)
        log.error("%s", exc)


def _data_tokenizer(cfg: Config, data_dir: str | Path | None):
    """(the tokenizer the run's data is or will be in: a vocab.json path, a Tokenizer, None when preparation
    trains a new one, "unknown"; the preparation plan or None), without writing anything."""
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.multimodal.data import is_image_text

    if data_dir is None and cfg.data.data_dir and (Path(cfg.data.data_dir) / "train.json").is_file():
        data_dir = cfg.data.data_dir
    if data_dir is not None:
        vocab = Path(data_dir) / "vocab.json"
        return (vocab if vocab.is_file() else "unknown"), None
    if is_image_text(_input_spec(cfg)):
        return "unknown", None
    plan = _plan_preparation(cfg)
    if existing_fingerprint(plan[1]) == plan[2]:
        return plan[1] / "vocab.json", plan
    return (Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else None), plan


def check_checkpoints_fit(cfg: Config, data_dir: str | Path | None, resume) -> tuple[tuple | None, bool]:
    """Before anything is written: a resumed run's data must be in the tokenizer of the checkpoint it
    resumes from, and a fresh run must not replace the checkpoints of a run on data in another tokenizer in
    ``<output_dir>/checkpoints`` (a re-run of the same job on the same data may). Returns the preparation
    plan when it made one (for ``prepare_data``), and whether to check again once the data is prepared: a
    fresh run whose input gets a new tokenizer is refused after preparing, so that a bad input file is
    reported first, as in an empty folder (preparing may replace the folder's prepared data, which its input
    makes again, never its checkpoints)."""
    from llm_training.data.tokenizer import Tokenizer, check_same_tokenizer
    from llm_training.train.checkpoint import checkpoint_tokenizer, resume_candidates

    folder = Path(cfg.output_dir) / "checkpoints"
    if isinstance(resume, dict):
        source, theirs = "the checkpoint", resume.get("tokenizer_json")
    else:
        explicit = resume is not None and str(resume) != "auto"
        paths = [Path(resume)] if explicit else [e.path for e in resume_candidates(folder)]
        source, theirs = next(((p, t) for p in paths if (t := checkpoint_tokenizer(p))), (None, None))
    if not theirs:
        return None, False
    vocab, plan = _data_tokenizer(cfg, data_dir)
    if vocab == "unknown":
        return plan, False
    if resume is not None:
        whose = f"{source}'s"
        fix = (
            "resume on the data that checkpoint was trained on (the same --input-file and settings, or "
            "--data-dir with its prepared data)"
        )
    else:
        whose = f"the checkpoints already in {folder}"
        fix = f"continue that run with --resume auto, or train into another --output-dir (or remove {folder})"
    if vocab is None and resume is None:
        return plan, True
    if vocab is None:
        raise UserError(
            f"{_input_spec(cfg)} would be prepared with a newly trained tokenizer, not with {whose} tokenizer; {fix}"
        )
    check_same_tokenizer(Tokenizer.from_json(theirs), vocab, whose, fix)
    return plan, False


def run_training(
    cfg: Config, resume_from: str | Path | None = None, *, console: bool = True, bus: EventBus | None = None
) -> TrainResult:
    """Prepare (if needed) and train with the console, log and metrics sinks attached."""
    return run_training_on(cfg, None, resume_from, console=console, bus=bus)


def run_training_on(
    cfg: Config,
    data_dir: str | Path | None,
    resume_from: str | Path | dict | None = None,
    *,
    model=None,
    console: bool = True,
    bus: EventBus | None = None,
) -> TrainResult:
    """Train on prepared ``data_dir`` (None: prepare the config's input first) with the sinks attached.

    Under a launcher (several processes) rank 0 prepares the data while the others wait, and rank 0 alone
    prints, logs and writes files."""
    from llm_training.api.resources import ComputeResourceManager

    # the job's start: a launcher (llm-train --num-gpus) passes its own, so start-up includes the processes'
    try:
        job_start = float(os.environ.get(JOB_START_VARIABLE) or time.time())
    except ValueError:  # not a launcher's: the job starts now
        job_start = time.time()
    resume = resume_from if resume_from is not None else cfg.checkpoint.resume
    if isinstance(resume, (str, Path)) and str(resume) != "auto" and not Path(resume).is_file():
        raise UserError(f"checkpoint not found: {resume} (give a .pt file, or --resume auto)")
    # before anything is written: the run's config.yaml may replace only an earlier run's, never the user's
    check_output_file(Path(cfg.output_dir) / "config.yaml", "--output-dir's", ours=is_resolved_config)
    plan, check_again = check_checkpoints_fit(cfg, data_dir, resume)
    bus = bus or EventBus()
    with ComputeResourceManager(bus, cfg.resources) as env:
        hint = None if env.enabled else one_process_hint(cfg.resources.distributed)
        if hint:
            log.warning("%s", hint)
        if not env.is_main:  # the other ranks train silently and write nothing
            data_dir = broadcast_object(None, env)  # waits for rank 0 to have the data ready
            return train(cfg, data_dir, bus, resume, model=model, env=env)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        run_id = time.strftime("%Y%m%d-%H%M%S")
        handler = setup_logging(
            out / cfg.logging.log_dir, "DEBUG" if cfg.logging.debug else cfg.logging.level, run_id
        )
        sinks = [
            ConsoleSink(bus, enabled=console and cfg.logging.progress_bar),
            LogSink(bus),
            MetricsFileSink(bus, out / "metrics.jsonl"),
        ]
        if cfg.logging.tensorboard and tensorboard_available():
            sinks.append(TensorBoardSink(bus, out / cfg.logging.tensorboard_dir / run_id))
        elif cfg.logging.tensorboard:
            log.info(
                "TensorBoard logging is off: pip install tensorboard (or the 'monitor' extra) to turn it on"
            )
        unsubscribe = [bus.subscribe(events.RUN_START, lambda e: _save_config(cfg, out / "config.yaml"))]
        try:
            log.info("run %s starting in %s (%d process(es))", run_id, out.resolve(), env.world_size)
            if data_dir is None:
                data_dir = prepare_data(cfg, bus, progress=console and cfg.logging.progress_bar, plan=plan)
                if check_again:
                    check_checkpoints_fit(cfg, data_dir, resume)
            if env.enabled:
                broadcast_object(str(data_dir), env)
            result = train(cfg, data_dir, bus, resume, model=model, env=env)
            result.notes = job_notes(cfg, data_dir)
            if result.timings:
                loop = result.timings.pop("loop")
                total = time.time() - job_start
                result.timings = {"start-up": max(0.0, total - loop), **result.timings, "total": total}
            return result
        except BaseException as exc:
            # the log records how the run ended, so llm-logs lists it and --follow stops on it
            if isinstance(exc, UserError):
                log.error("%s", exc)
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
            bus.publish(events.RUN_END, status="stopped" if stopped else "failed", error=type(exc).__name__)
            raise
        finally:
            for sink in sinks:
                try:
                    sink.close()
                except OSError as exc:  # a full disk: the error that stopped the run is the one to show
                    log.warning("%s could not finish writing: %s", type(sink).__name__, exc)
            for stop in unsubscribe:
                stop()
            logging.getLogger("llm_training").removeHandler(handler)
            handler.close()
