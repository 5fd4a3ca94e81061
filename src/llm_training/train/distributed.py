"""Several processes: the process group, the model's data-parallel (DDP) or fully sharded (FSDP2) wrapping,
full-state checkpoints that load on any number of processes, and the few collectives the loop needs.

A process belongs to a distributed run when a launcher (``torchrun``, ``accelerate launch``, ``llm-train
--num-gpus``) set ``WORLD_SIZE`` above 1. With one process nothing here wraps or communicates, so a plain run
and ``torchrun --nproc_per_node=1`` cost the same.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm_training.errors import ConfigError, UserError

log = logging.getLogger("llm_training.distributed")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_launcher() -> DistEnv:
    """Rank and world size set by torchrun / accelerate / the elastic launcher (or a single process)."""
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise ConfigError(
            f"launcher environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})"
        ) from None


def current_env() -> DistEnv:
    """The process group this process already belongs to, or a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    return DistEnv()


def pick_backend(setting: str, device_type: str) -> str:
    """The backend for ``setting`` on ``device_type``; nccl asked for where training runs on CPUs (a GPU
    config on a machine without GPUs) is gloo, which init_process_group says in one line."""
    setting = setting.lower()
    if setting == "auto" or setting == "nccl" and device_type != "cuda":
        return "nccl" if device_type == "cuda" else "gloo"
    if setting == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ConfigError(
            "resources.distributed_backend 'nccl' needs CUDA GPUs and an NCCL build; use 'gloo'"
        )
    if setting == "gloo" and not dist.is_gloo_available():
        raise ConfigError("resources.distributed_backend 'gloo' is not available in this PyTorch build")
    return setting


def init_process_group(env: DistEnv, backend_setting: str, device_type: str, timeout_s: float) -> DistEnv:
    """Join the process group (once); on CUDA, bind this process to GPU ``LOCAL_RANK``."""
    if not env.enabled:
        return env
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {env.world_size} but {', '.join(missing)} not set: start several processes with "
            "torchrun, accelerate launch or llm-train --num-gpus N, or unset WORLD_SIZE"
        )
    backend = pick_backend(backend_setting, device_type)
    joined = dist.is_initialized()  # by an outer ComputeResourceManager (llm-finetune's): it warned already
    asked = backend_setting.lower()
    if backend != asked and asked != "auto" and env.rank == 0 and not joined:
        log.warning(
            "warning: resources.distributed_backend is %s but training runs on %s here (no CUDA GPU): "
            "using %s",
            backend_setting,
            device_type,
            backend,
        )
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise ConfigError(
                f"process {env.rank} has LOCAL_RANK {env.local_rank} but this node has {visible} GPU(s); "
                f"start at most {visible} processes per node"
            )
        torch.cuda.set_device(env.local_rank)
    if not joined:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(env.rank, env.world_size, env.local_rank, backend)


def one_process_hint(distributed: bool, environ=None) -> str | None:
    """Why this run has one process where several were wanted, and the command that starts them: an
    ``accelerate launch`` without --multi_gpu runs one process (it sets ACCELERATE_* and, for
    --num_processes above 1, MASTER_ADDR, but no WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    if "ACCELERATE_MIXED_PRECISION" in environ and ("MASTER_ADDR" in environ or distributed):
        return (
            "accelerate launch started one process: it starts several only with --multi_gpu "
            "(accelerate launch --multi_gpu --num_processes N -m llm_training.main ...); without GPUs use "
            "llm-train --num-gpus N --distributed-backend gloo, or torchrun --nproc_per_node N"
        )
    if distributed:
        return (
            "resources.distributed is set but this is one process: start several with torchrun "
            "--nproc_per_node N, accelerate launch --multi_gpu --num_processes N, or llm-train --num-gpus N"
        )
    return None


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In place across processes; a no-op for one process."""
    if env.enabled:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def gather_objects(value, env: DistEnv) -> list:
    """Every process's ``value``, in rank order, on every process (one for a single process)."""
    if not env.enabled:
        return [value]
    out = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value, env: DistEnv):
    """Rank 0's ``value`` on every rank."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def computed_once(env: DistEnv, compute):
    """``compute()`` run by rank 0 alone (preparing data, say) and its value on every rank, which wait for
    it. When it fails on rank 0 the others stop too, with a line that points to rank 0's error."""
    if not env.enabled:
        return compute()
    if env.is_main:
        try:
            value = compute()
        except BaseException:
            broadcast_object((False, None), env)
            raise
        return broadcast_object((True, value), env)[1]
    done, value = broadcast_object(None, env)
    if not done:
        raise UserError(f"process {env.rank} stopped because process 0 failed (its error is above)")
    return value


# --------------------------------------------------------------------------------------------- wrapping


def fully_shard_fn():
    try:  # PyTorch 2.6+
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # 2.4 and 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def wrap_model(model: torch.nn.Module, strategy: str, env: DistEnv, precision: str) -> torch.nn.Module:
    """DDP or FSDP2 around ``model`` (applied from outside: the model class knows nothing of it)."""
    if not env.enabled:
        return model
    if strategy == "fsdp":
        fully_shard, MixedPrecisionPolicy = fully_shard_fn()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else None
        kwargs = {"mp_policy": policy} if policy else {}
        for block in model.blocks:  # one all-gather per block, freed after use
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """A parameter sharded by FSDP2 (a ``DTensor``; named, not imported, for PyTorch builds without it)."""
    return type(tensor).__name__ == "DTensor"


def is_sharded(model: torch.nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


# --------------------------------------------------------------------------------------------- state


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def get_full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state keyed by parameter name, whole (not sharded), as CPU tensors on rank 0:
    the same checkpoint whatever the number of processes that wrote it. A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    sharded = is_sharded(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_state_dict(model, _optimizers(optimizer), options=options)


def set_full_state(model: torch.nn.Module, optimizer, model_state: dict, optim_state: dict | None) -> None:
    """Load a full (name-keyed) state into a plain, DDP or FSDP2 model on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, strict=True)
    optimizers = _optimizers(optimizer)
    set_state_dict(
        model, optimizers, model_state_dict=model_state, optim_state_dict=optim_state or {}, options=options
    )
