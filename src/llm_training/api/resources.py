"""``ComputeResourceManager``: what this machine has, which backend suits it, and the process group's life."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict

from llm_training.config import ResourcesConfig, parse_duration
from llm_training.train.distributed import (
    DistEnv,
    barrier,
    env_from_launcher,
    init_process_group,
    pick_backend,
    teardown,
)


class ComputeResourceManager:
    """``with ComputeResourceManager(bus, cfg.resources) as env:`` joins the process group that a launcher
    (torchrun, accelerate, ``llm-train --num-gpus``) set up, binds this process to its GPU, and leaves the
    group on exit; with one process it only reports."""

    def __init__(self, event_bus=None, resources: ResourcesConfig | None = None) -> None:
        self.event_bus = event_bus
        self.resources = resources or ResourcesConfig()
        self.env: DistEnv = DistEnv()
        self._owns_group = False

    def devices(self) -> list[dict]:
        """The devices this process can use: their kind, count and memory."""
        import torch

        found = []
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            found.append({"index": index, "name": props.name, "memory_gb": round(total / 2**30, 2),
                          "free_gb": round(free / 2**30, 2)})  # fmt: skip
        return found

    def device_type(self) -> str:
        """'cuda', 'mps' or 'cpu': what training on this machine will use."""
        import torch

        wanted = self.resources.device
        if wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available()):
            return "cuda" if self.resources.gpu_count != 0 else "cpu"
        return "cpu" if wanted == "auto" else wanted

    def report(self) -> dict:
        """Devices with memory, CPU cores, the backend that would be used and this process's place."""
        memory = None
        with contextlib.suppress(ValueError, OSError, AttributeError):
            memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        env = self.env if self.env.enabled else env_from_launcher()
        return {
            **asdict(env),
            "gpus": self.devices(),
            "cpu_cores": os.cpu_count(),
            "memory_gb": memory,
            "device_type": self.device_type(),
            "backend": pick_backend(self.resources.distributed_backend, self.device_type()),
            "strategy": self.resources.strategy,
        }

    def init(self) -> DistEnv:
        """Join the process group that torchrun or accelerate started (nothing for one process); returns this process's rank, world size and backend."""
        import torch.distributed as dist

        env = env_from_launcher()
        already = dist.is_available() and dist.is_initialized()
        timeout = parse_duration(self.resources.timeout, "resources.timeout")
        self.env = init_process_group(env, self.resources.distributed_backend, self.device_type(), timeout)
        self._owns_group = self.env.enabled and not already
        if self.event_bus is not None and self.env.enabled:
            self.event_bus.publish("process_group", **asdict(self.env))
        return self.env

    def teardown(self, clean: bool = True) -> None:
        """Leave the group; after a clean run first wait for every process, since destroying a gloo group
        while a peer still uses it can abort the process ("terminate called without an active exception")."""
        if self._owns_group:
            if clean:
                barrier(self.env)
            teardown()
            self._owns_group = False

    def __enter__(self) -> DistEnv:
        return self.init()

    def __exit__(self, exc_type, *exc) -> None:
        self.teardown(clean=exc_type is None)  # after a failure a barrier could wait for a dead process
