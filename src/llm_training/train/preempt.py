"""Preemption: SIGTERM (a scheduler taking the machine) or SIGINT (Ctrl-C) asks the loop to save a checkpoint
and stop cleanly after the current step; a second signal acts as it normally would."""

from __future__ import annotations

import signal
import threading

import torch

from llm_training.train.distributed import DistEnv, all_reduce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """A context manager whose ``requested`` names the first signal received, else None.

    Signal handlers can only be installed from the main thread; elsewhere (training started from a worker
    thread) the guard does nothing and signals keep their usual effect.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        self._restore()  # a second signal stops at once (Ctrl-C twice)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        if self.enabled:
            for signum in SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def agree(self, done: bool, env: DistEnv, device: torch.device) -> tuple[bool, str | None]:
        """(done, the signal to stop for) as every process sees them: several processes stop together, and a
        time budget or a signal is seen at different moments, so they are compared."""
        flags = torch.tensor([float(done), float(self.requested is not None)], device=device)
        all_reduce(flags, env, "max")
        if flags[1] and self.requested is None:
            self.requested = "a signal to another process"
        return bool(flags[0]), self.requested if flags[1] else None
