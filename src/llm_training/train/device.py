"""Device choice and mixed precision."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from llm_training.config import Config
from llm_training.errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    precision: str  # "bf16", "fp16" or "fp32"
    compile: bool

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "resources.device: 'cuda' was asked for but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"resources.device: {name} does not exist; {torch.cuda.device_count()} GPU(s) visible"
            )
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("resources.device: 'mps' is not available on this machine; use 'auto' or 'cpu'")
    return device


def pick_precision(setting, device: torch.device) -> str:
    """'auto' and true: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (bf16 is slow on most CPUs)."""
    value = str(setting).lower()
    if value in ("no", "false", "fp32"):
        return "fp32"
    if value in ("auto", "true"):
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return value


def on_for_device(setting, device: torch.device) -> bool:
    """A true/false/"auto" setting: "auto" means on with CUDA (``training.compile``, ``checkpoint.async_save``)."""
    value = str(setting).lower()
    if value == "auto":
        return device.type == "cuda"
    return value in ("true", "yes")


pick_compile = on_for_device


def resolve_runtime(cfg: Config) -> Runtime:
    r = cfg.resources
    if r.num_threads:
        torch.set_num_threads(r.num_threads)
    device = pick_device(r.device)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a launcher decided the processes and GPUs
    if r.gpu_count is not None and not launched:
        if r.gpu_count > visible:
            raise ConfigError(
                f"resources.gpu_count is {r.gpu_count} but {visible} GPU(s) are visible; lower it (0 trains on the CPU)"
            )
        if r.gpu_count == 0:
            if device.type == "cuda":
                raise ConfigError(
                    f"resources.gpu_count is 0 but resources.device is {r.device!r}; set one of them"
                )
            device = torch.device("cpu") if r.device == "auto" else device
    # nccl asked for without GPUs (a GPU config on a CPU machine): the process group uses gloo and says so
    if device.type == "cuda" and launched and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(
        device,
        pick_precision(cfg.training.mixed_precision, device),
        pick_compile(cfg.training.compile, device),
    )


# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets, for MFU = achieved FLOP/s / peak. Matched
# by substring of torch.cuda.get_device_name(); unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
    ("A10G", 70.0e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71.0e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak resident memory elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Tokens a second since the last reading, with peak memory and model FLOPs utilisation (where the
    device's peak is known)."""

    def __init__(self, flops_per_token: float, device: torch.device, tokens_per_step: int, step: int) -> None:
        self.flops_per_token, self.device, self.tokens_per_step = flops_per_token, device, tokens_per_step
        self.peak = peak_flops(device)
        self.restart(step)

    def restart(self, step: int) -> None:
        self.since, self.step = time.perf_counter(), step

    def reading(self, step: int, now: float) -> dict:
        """At ``step``, timed at ``now`` (taken before the loss is read: that waits for the device)."""
        speed = (step - self.step) * self.tokens_per_step / max(now - self.since, 1e-9)
        out = {"tokens_per_second": speed, "memory_gb": round(memory_gb(self.device), 3)}
        if self.peak:
            out["mfu"] = speed * self.flops_per_token / self.peak
        self.since, self.step = now, step
        return out
