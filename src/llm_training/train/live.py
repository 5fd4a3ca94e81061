"""Runtime overrides (``ConfigurationAdaptor.update_config``) during a run: the keys that are safe between two
steps take effect at the next step; the others are noted once and left to the next run."""

from __future__ import annotations

import logging

import torch

from llm_training.config import Config
from llm_training.events import EventBus
from llm_training.overrides import LIVE_KEYS, RUNTIME
from llm_training.train.distributed import DistEnv, all_reduce

log = logging.getLogger("llm_training.train")


class LiveOverrides:
    """Applies the overrides made since the last call to ``cfg``. With several processes, rank 0's overrides
    are sent to every process at a log interval, so that all replicas change at the same step."""

    def __init__(self, cfg: Config, bus: EventBus, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.bus, self.env, self.device = cfg, bus, env, device
        self.version = RUNTIME.snapshot()[0]  # the config already has the overrides made so far
        self.deferred: set[str] = set()

    def apply(self, step: int) -> None:
        """Before step ``step + 1``."""
        version, values = RUNTIME.snapshot()
        if self.env.enabled:
            if step % self.cfg.training.log_interval:
                return
            changed = torch.tensor([float(self.env.is_main and version != self.version)], device=self.device)
            if not all_reduce(changed, self.env, "max").item():
                return
            box = [values]
            torch.distributed.broadcast_object_list(box, src=0)
            values = box[0]
        elif version == self.version:
            return
        self.version = version
        for dotted, value in values.items():
            section, _, key = dotted.partition(".")
            holder = getattr(self.cfg, section, None)
            if dotted not in LIVE_KEYS:
                if dotted not in self.deferred:
                    self.deferred.add(dotted)
                    log.warning("%s changed at runtime: it applies to the next run, not this one", dotted)
            elif getattr(holder, key) != value:
                setattr(holder, key, value)
                log.info("runtime override %s=%s from step %d", dotted, value, step + 1)
                self.bus.publish("config_applied", key=dotted, value=value, step=step + 1)
