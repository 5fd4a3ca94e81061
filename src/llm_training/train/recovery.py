"""Error recovery: what to do about a failure, how many times, and the record of what was done.

``ErrorRecovery`` classifies an error and returns the action: roll back to the last good checkpoint (a
non-finite loss or a loss spike), retry with a smaller micro-batch (CUDA out of memory), retry after a pause
(a transient I/O error), or stop. After ``max_retries`` failures of one kind in a row it stops with a report
of every attempt. The training loop uses it internally; user code can call ``recover_from_error(e)`` too.
Every action is logged and, with an event bus, published as a ``recovery`` event.
"""

from __future__ import annotations

import errno
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llm_training import events
from llm_training.errors import UserError

log = logging.getLogger("llm_training.recovery")

# errors worth retrying: the file system or network hiccuped
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                    errno.ECONNRESET, errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH}  # fmt: skip


_RETRIES = {
    "anomaly": "rollbacks",
    "oom": "micro-batch reductions",
    "io": "I/O retries",
    "disk_full": "retries",
}


class TrainingAnomaly(RuntimeError):
    """A loss the loop will not train on: ``kind`` is "nan" (not finite) or "spike"."""

    def __init__(self, kind: str, step: int, loss: float, detail: str = "") -> None:
        self.kind, self.step, self.loss = kind, step, loss
        what = "non-finite loss" if kind == "nan" else "loss spike"
        super().__init__(f"{what} {loss:.4g} at step {step}{': ' + detail if detail else ''}")


class RecoveryExhausted(UserError):
    """Recovery gave up; the message holds the report."""


@dataclass
class RecoveryAction:
    kind: str  # rollback | reduce_batch | retry | stop
    error: str  # what happened, one line
    attempt: int  # 1 for the first failure of this kind in a row
    checkpoint: Path | None = None  # rollback: the checkpoint to return to (None: the start of training)
    wait_seconds: float = 0.0  # retry: pause before trying again
    message: str = ""


@dataclass
class LossMonitor:
    """Flags a logged loss that is not finite or is ``spike_factor`` times its recent average."""

    spike_factor: float = 0.0  # 0 turns spike detection off
    warmup: int = 5  # logged losses seen before spikes are judged
    decay: float = 0.9
    average: float | None = None
    seen: int = 0

    def check(self, step: int, loss: float) -> TrainingAnomaly | None:
        if not math.isfinite(loss):
            return TrainingAnomaly("nan", step, loss)
        if (
            self.spike_factor
            and self.average is not None
            and self.seen >= self.warmup
            and loss > self.spike_factor * self.average
        ):
            return TrainingAnomaly("spike", step, loss, f"{loss / self.average:.1f}x the recent average")
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        self.seen += 1
        return None


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def classify(exc: BaseException) -> str:
    """nan | spike | oom | disk_full | io | fatal."""
    if isinstance(exc, TrainingAnomaly):
        return exc.kind
    if is_out_of_memory(exc):
        return "oom"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk_full"
        if exc.errno in TRANSIENT_ERRNOS or isinstance(exc, (TimeoutError, ConnectionError)):
            return "io"
    return "fatal"


@dataclass
class ErrorRecovery:
    """``ErrorRecovery(checkpoint_dir='checkpoints/', max_retries=3, backup_freq=1000)``.

    ``backup_freq``: optimizer steps between the checkpoints a rollback returns to (the training loop saves
    at least that often while recovery is on). ``backoff_seconds``: the first pause before an I/O retry; it
    doubles with each attempt.
    """

    checkpoint_dir: str | Path = "checkpoints/"
    max_retries: int = 3
    backup_freq: int = 1000
    event_bus: object | None = None
    backoff_seconds: float = 1.0
    # where a rollback returns to; default: the newest valid checkpoint in checkpoint_dir (the training loop
    # sets its own: the checkpoints of this run, not older files in the folder)
    rollback_target: Callable[[], Path | None] | None = None
    history: list[RecoveryAction] = field(default_factory=list)
    _streak: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise UserError(f"ErrorRecovery: max_retries must be 0 or more, got {self.max_retries}")
        if self.backup_freq < 1:
            raise UserError(f"ErrorRecovery: backup_freq must be at least 1 step, got {self.backup_freq}")
        self.checkpoint_dir = Path(self.checkpoint_dir)

    def recover_from_error(self, exc: BaseException, step: int | None = None) -> RecoveryAction:
        """The action for ``exc``; raises ``RecoveryExhausted`` after too many, re-raises what it cannot fix."""
        from llm_training.train.checkpoint import latest_checkpoint

        kind = classify(exc)
        if kind == "fatal":
            raise exc
        group = "anomaly" if kind in ("nan", "spike") else kind
        self._streak[group] += 1
        attempt = self._streak[group]
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        where = f" at step {step}" if step is not None and not isinstance(exc, TrainingAnomaly) else ""
        if kind == "disk_full":
            action = RecoveryAction("stop", text, attempt, message=f"disk full{where}: free space and resume")
        elif attempt > self.max_retries:
            action = RecoveryAction(
                "stop", text, attempt, message=f"gave up after {self.max_retries} {_RETRIES[group]}"
            )
        elif group == "anomaly":
            target = (
                self.rollback_target() if self.rollback_target else latest_checkpoint(self.checkpoint_dir)
            )
            action = RecoveryAction(
                "rollback",
                text,
                attempt,
                checkpoint=target,
                message=f"rolling back to {target or 'the start of training'} and skipping the batches since "
                "the last check",
            )
        elif kind == "oom":
            action = RecoveryAction(
                "reduce_batch",
                text,
                attempt,
                message="out of memory: halving the micro-batch, doubling accumulation",
            )
        else:
            wait = self.backoff_seconds * 2 ** (attempt - 1)
            action = RecoveryAction(
                "retry", text, attempt, wait_seconds=wait, message=f"I/O error{where}: retrying in {wait:g}s"
            )
        self.history.append(action)
        (log.error if action.kind == "stop" else log.warning)(
            "recovery %s (attempt %d): %s; %s", action.kind, attempt, text, action.message
        )
        if self.event_bus is not None:
            self.event_bus.publish(
                events.RECOVERY,
                action=action.kind,
                error=text,
                error_kind=kind,
                attempt=attempt,
                step=step if step is not None else getattr(exc, "step", None),
                checkpoint=str(action.checkpoint) if action.checkpoint else None,
                message=action.message,
            )
        if action.kind == "stop":
            log.error("%s", self.report(headline=f"training stopped: {action.message}"))
            raise RecoveryExhausted(self.summary(action)) from None
        return action

    def summary(self, last: RecoveryAction) -> str:
        """One line: why training stopped, what was tried, what to do."""
        kinds = Counter(a.kind for a in self.history if a is not last)
        tried = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "nothing"
        return (
            f"training stopped: {last.message} (last error: {last.error}; tried before: {tried}); checkpoints "
            f"are in {self.checkpoint_dir}, resume with --resume auto (see logs/system.log for the full report)"
        )

    def succeeded(self, group: str) -> None:
        """Progress was made past the failure: the next one of ``group`` starts a new count."""
        self._streak[group] = 0

    def report(self, headline: str = "recovery report") -> str:
        """A summary of the recovery actions taken so far, one line each."""
        lines = [f"{headline}; {len(self.history)} recovery action(s):"]
        lines += [f"  {i}. {a.kind} after: {a.error} ({a.message})" for i, a in enumerate(self.history, 1)]
        return "\n".join(lines)
