"""Debug switches of a run (``logging.debug``, ``logging.profile_steps``): autograd anomaly detection, which
names the operation that produced a NaN or Inf in the backward pass (slow: for hunting, not for training),
and a ``torch.profiler`` trace of a few steps written for TensorBoard's profiler plugin
(``<output_dir>/runs/profile``; ``tensorboard --logdir <output_dir>/runs``)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger("llm_training.profiling")


class StepProfiler:
    """``step()`` after every training step; records ``active`` steps after one of wait and one of warm-up."""

    def __init__(self, folder: Path, active: int, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.remaining = folder, 2 + active
        self.profile = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active, repeat=1),
                               on_trace_ready=tensorboard_trace_handler(str(folder)), record_shapes=True,
                               profile_memory=True, with_stack=False)  # fmt: skip
        self.profile.__enter__()
        log.info("profiling %d training steps to %s", active, folder)

    def step(self) -> None:
        if self.remaining <= 0:
            return
        self.profile.step()
        self.remaining -= 1
        if self.remaining == 0:
            self.close()

    def close(self) -> None:
        if self.profile is not None:
            self.profile.__exit__(None, None, None)
            self.profile = None
            log.info("profiler trace written to %s", self.folder)


def anomaly_detection(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    log.warning("debug mode: autograd anomaly detection is on (much slower)")
    return torch.autograd.set_detect_anomaly(True)
