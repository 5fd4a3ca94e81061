"""Saving checkpoints for the training loop: in the background or not, with I/O retries, a policy for a full
disk, and retention after each save."""

from __future__ import annotations

import errno
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from llm_training import events
from llm_training.config import CheckpointConfig
from llm_training.errors import UserError
from llm_training.events import EventBus
from llm_training.train.checkpoint import latest_checkpoint, save_checkpoint
from llm_training.train.device import on_for_device
from llm_training.train.recovery import ErrorRecovery, classify
from llm_training.train.retention import apply_cleanup, plan_cleanup

log = logging.getLogger("llm_training.checkpoint")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; nothing half-written was left behind."""


class HostSnapshot:
    """Copies a state dict's tensors to host memory, reusing pinned buffers between saves on CUDA, so the
    training loop waits only for a device-to-host copy and the disk write happens on a thread."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.copied_from_cuda = False  # the last call queued device-to-host copies (to wait for)

    def __call__(self, value: Any, key: tuple = ()) -> Any:
        if not key:
            self.copied_from_cuda = False
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return value.detach().clone()
            self.copied_from_cuda = True
            buf = self._buffers.get(key)
            if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
                buf = self._buffers[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return buf.copy_(value.detach(), non_blocking=True)
        if isinstance(value, dict):
            return {k: self(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self(v, (*key, i)) for i, v in enumerate(value))
        return value


class Checkpointer:
    """Writes the loop's checkpoints into ``directory``; at most one background save is in flight."""

    def __init__(
        self,
        directory: str | Path,
        cfg: CheckpointConfig,
        device: torch.device,
        bus: EventBus,
        recovery: ErrorRecovery | None = None,
        writer: bool = True,
    ) -> None:
        """``writer``: whether this process writes (with several processes, only rank 0 does)."""
        self.directory, self.cfg, self.bus, self.recovery = Path(directory), cfg, bus, recovery
        self.writer = writer
        self.background = on_for_device(cfg.async_save, device)
        self._snapshot = HostSnapshot()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if self.background else None
        self._pending: Future | None = None
        self.stall_seconds: list[tuple[str, float]] = []  # (name, how long its save held up the loop)
        self.last_saved: Path | None = None
        self.unsaved: dict[str, str] = {}  # name -> why, for saves that failed under on_save_error=continue

    # ----------------------------------------------------------------------------------------- saving

    def save(self, name: str, state: dict[str, Any], meta: dict[str, Any], *, wait: bool = False) -> None:
        """Save ``state`` as ``name``; with ``wait`` (or not in the background) return once it is on disk."""
        start = time.perf_counter()
        self.wait()  # one save at a time: the previous one's errors surface here
        if not self.writer:
            self.last_saved = self.directory / name
        elif self._pool is None or wait:
            self._write(name, state, meta)
        else:
            host = self._snapshot(state)
            if self._snapshot.copied_from_cuda:
                torch.cuda.current_stream().synchronize()  # the pinned copies are complete
            self._pending = self._pool.submit(self._write, name, host, meta)
        self.stall_seconds.append((name, time.perf_counter() - start))

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def poll(self) -> None:
        """Raise the error of a finished background save, if it failed (the loop calls this every step)."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _write(self, name: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
        path = self.directory / name
        while True:
            try:
                save_checkpoint(path, state, meta)
                break
            except OSError as exc:
                kind = classify(exc)
                if kind == "io" and self.recovery is not None:
                    action = self.recovery.recover_from_error(exc, meta.get("step"))
                    time.sleep(action.wait_seconds)
                    continue
                self._failed(path, exc, kind)
                return
        if self.recovery is not None:
            self.recovery.succeeded("io")
        self.last_saved = path
        self.unsaved.pop(name, None)
        self.bus.publish(events.CHECKPOINT_SAVED, path=str(path), **meta)
        if meta.get("kind") == "step":
            self.retain(known_valid=path)

    def _failed(self, path: Path, exc: OSError, kind: str) -> None:
        reason = "disk full" if kind == "disk_full" else f"write failed ({exc.strerror or exc})"
        previous = latest_checkpoint(self.directory)
        keep = f"the last good checkpoint is {previous}" if previous else "no earlier checkpoint exists"
        message = f"could not save {path}: {reason}; nothing half-written was left, {keep}"
        self.bus.publish(events.ERROR, error=message, errno=errno.errorcode.get(exc.errno or 0, ""))
        if self.cfg.on_save_error == "continue":
            self.unsaved[path.name] = reason
            self.bus.publish(
                events.WARNING, message=f"{message}; training continues (checkpoint.on_save_error=continue)"
            )
            return
        raise CheckpointWriteError(
            f"{message}; free space (or set checkpoint.on_save_error=continue), then resume with --resume auto"
        )

    # ----------------------------------------------------------------------------------------- retention

    def retain(self, known_valid: Path | None = None) -> None:
        plan = plan_cleanup(self.directory, self.cfg.keep_last, self.cfg.keep_best, known_valid)
        for path in apply_cleanup(plan):
            log.info(
                "removed %s (checkpoint.keep_last=%s, keep_best=%s)",
                path,
                self.cfg.keep_last,
                self.cfg.keep_best,
            )
