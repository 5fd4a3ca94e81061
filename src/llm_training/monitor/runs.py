"""Finding training runs and their log lines: what ``llm-logs`` reads.

A run is identified by the id in each of its ``logs/system.log`` lines (``run=20260101-120000``, the time it
started); its folder is the output directory that holds that log. Runs are looked for under a root folder
(default: the current one), a few levels deep.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llm_training.limits import json_loads

LOG_NAME = "system.log"
_RUN = re.compile(r" run=(\S+) rank=")
_FIELD = re.compile(r"(\w+)=(\S+)")
SKIP_DIRS = {"venv", ".venv", ".git", "node_modules", "__pycache__", "prepared_data", "checkpoints", "runs"}


@dataclass
class Run:
    run_id: str
    folder: Path  # the output directory
    log: Path
    last_step: int | None = None
    last_loss: float | None = None
    status: str = "running or stopped"  # from its run_end line, when there is one
    num_parameters: int | None = None  # from its run_start line


def log_files(root: Path, depth: int = 4) -> list[Path]:
    found = []

    def walk(folder: Path, level: int) -> None:
        candidate = folder / "logs" / LOG_NAME
        if candidate.is_file():
            found.append(candidate)
        if level >= depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS)
        except OSError:
            return
        for child in children:
            walk(child, level + 1)

    walk(root, 0)
    return found


def _all_lines(log: Path) -> list[str]:
    """The log and its rotated predecessors (system.log.5 ... system.log.1, system.log), oldest first."""
    parts = sorted(
        log.parent.glob(LOG_NAME + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0
    )
    lines: list[str] = []
    for part in [*parts, log]:
        lines += part.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines


def runs_in_log(log: Path) -> list[Run]:
    """The runs one log (with its rotated parts) has lines of, with their last step, loss and status."""
    runs: dict[str, Run] = {}
    for line in _all_lines(log):
        match = _RUN.search(line)
        if not match:
            continue
        run = runs.setdefault(match.group(1), Run(match.group(1), log.parent.parent, log))
        if " run_start " in line and (count := re.search(r" num_parameters=(\d+)", line)):
            run.num_parameters = int(count.group(1))
        if " step_end " in line or " run_end " in line:
            values = dict(_FIELD.findall(line.split(": ", 1)[-1]))
            if "step" in values or "steps" in values:
                run.last_step = int(values.get("step", values.get("steps")))
            loss = values.get("loss") or values.get("train_loss")
            if loss:
                run.last_loss = float(loss)
            if " run_end " in line:
                run.status = values.get("status", "ended")
    return list(runs.values())


def merge_runs(per_log: Iterable[list[Run]]) -> list[Run]:
    """One run per id, by id: a run seen in several logs keeps its first log and folder, and takes what
    the later logs say of it (copies: the parsed lists are not changed)."""
    runs: dict[str, Run] = {}
    for found in per_log:
        for run in found:
            known = runs.get(run.run_id)
            if known is None:
                runs[run.run_id] = dataclasses.replace(run)
                continue
            known.last_step = run.last_step if run.last_step is not None else known.last_step
            known.last_loss = run.last_loss if run.last_loss is not None else known.last_loss
            known.status = run.status if run.status != Run.status else known.status
            known.num_parameters = run.num_parameters or known.num_parameters
    return sorted(runs.values(), key=lambda r: r.run_id)


def find_runs(root: str | Path = ".") -> list[Run]:
    return merge_runs(runs_in_log(log) for log in log_files(Path(root)))


def run_lines(run: Run) -> list[str]:
    return [line for line in _all_lines(run.log) if f" run={run.run_id} " in line]


def started_at(run: Run) -> float:
    """The run's start as a Unix time, from its id (the local time it started); 0 when the id is not one."""
    try:
        return datetime.datetime.strptime(run.run_id[:15], "%Y%m%d-%H%M%S").timestamp()
    except ValueError:
        return 0.0


def parse_records(text: str) -> list[dict]:
    """JSON lines as records; a damaged line (or one still being written) is skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json_loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``."""
    return parse_records(path.read_text(encoding="utf-8", errors="replace"))


class RecordTail:
    """A ``metrics.jsonl`` read from where the last read stopped (the file only grows while a run trains)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.records = path, 0, []

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return self.records
        if size < self.offset:  # replaced or truncated: start again
            self.offset, self.records = 0, []
        if size > self.offset:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(size - self.offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for next time
            self.offset += len(complete)
            self.records += parse_records(complete.decode("utf-8", errors="replace"))
        return self.records


def records_of(run: Run, records: list[dict], runs: list[Run]) -> list[dict]:
    """The records of ``run`` among its folder's ``metrics.jsonl`` records: one folder may hold several runs
    (a resume starts a new one), each owns the records from its start to the next run's start."""
    start = started_at(run) - 1
    later = [started_at(r) - 1 for r in runs if r.folder == run.folder and started_at(r) > started_at(run)]
    end = min(later, default=float("inf"))
    return [r for r in records if start <= r.get("time", 0) < end]
