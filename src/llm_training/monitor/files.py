"""File sinks: ``logs/system.log`` (one line an event) and ``metrics.jsonl`` (one JSON object a step or eval)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import sys
from pathlib import Path

from llm_training import events
from llm_training.events import Event, EventBus, Sink

LOGGER = "llm_training"


class _LogFile(logging.handlers.RotatingFileHandler):
    """``system.log``; when it cannot be written (a full disk), one warning on stderr instead of a traceback
    per record, and the run goes on (it stops where its outputs cannot be saved)."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self.failed:
            self.failed = True
            exc = sys.exc_info()[1]
            print(f"warning: cannot write {self.baseFilename}: {getattr(exc, 'strerror', None) or exc}; "
                  "the log file stays incomplete", file=sys.stderr)  # fmt: skip

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the rest could not be flushed: reported above; the run's own error comes next
            self.failed = True


def setup_logging(log_dir: str | Path, level: str = "INFO", run_id: str = "-") -> logging.Handler:
    """Attach a rotating ``system.log`` handler to the package logger; returns it so callers can detach it."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(log_dir / "system.log", maxBytes=10 * 2**20, backupCount=5, encoding="utf-8")
    rank = os.environ.get("RANK", "0")
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s run={run_id} rank={rank} %(name)s: %(message)s")
    )
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level.upper())
    logger.addHandler(handler)
    return handler


def _short(value):
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return None
    return value if isinstance(value, (int, str, bool, type(None))) else str(value)


class LogSink(Sink):
    """Every event as one log line (the resolved config at run start is logged as JSON)."""

    def __init__(self, bus: EventBus) -> None:
        self.log = logging.getLogger(f"{LOGGER}.run")
        self.listen(bus, "*", self._event)

    def _event(self, event: Event) -> None:
        p = event.payload
        if event.topic == events.STEP_END and p.get("loss") is None:
            return  # steps between log intervals carry no metrics
        fields = " ".join(f"{k}={s}" for k, v in p.items() if (s := _short(v)) is not None)
        self.log.info("%s %s", event.topic, fields)
        if event.topic == events.RUN_START:
            self.log.debug("config %s", json.dumps(p.get("config")))


class MetricsFileSink(Sink):
    """Appends logged steps, validations, recoveries and custom metrics to ``metrics.jsonl``."""

    def __init__(self, bus: EventBus, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for topic in (events.STEP_END, events.EVAL_END, events.RECOVERY, events.METRIC):
            self.listen(bus, topic, self._write)

    def _write(self, event: Event) -> None:
        if event.topic == events.STEP_END and event.payload.get("loss") is None:
            return
        record = {"event": event.topic, "time": round(event.time, 3)}
        record.update({k: s for k, v in event.payload.items() if (s := _short(v)) is not None})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def step_losses(metrics_path: str | Path) -> dict[int, float]:
    """Training loss by step from a ``metrics.jsonl``; a step logged twice (replayed after a resume or a
    rollback) keeps its last value."""
    losses = {}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["event"] == events.STEP_END and "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses
