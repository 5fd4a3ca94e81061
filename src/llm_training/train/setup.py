"""Everything a training run needs, built from the config before the loop starts: the tokenizer, the
objective (chosen by the prepared data's kind) with its datasets, the model, the batch size, the distributed
wrapping, the optimizer, error recovery and the checkpointer."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_training.config import Config
from llm_training.data.loader import BatchLoader
from llm_training.data.prepare import read_manifest
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import ConfigError, DataError
from llm_training.events import EventBus
from llm_training.model.footprint import check_fits
from llm_training.train.autobatch import global_batch, resolve_batch
from llm_training.train.checkpointer import Checkpointer
from llm_training.train.device import Runtime, resolve_runtime
from llm_training.train.distributed import DistEnv, all_reduce, wrap_model
from llm_training.train.objectives import Objective
from llm_training.train.optim import build_optimizer
from llm_training.train.recovery import ErrorRecovery, LossMonitor

# the objective of each kind of prepared data (a manifest's "kind"; plain text has none), as module and
# class: imported only when a run trains that kind, so train/ never imports the layers that provide them
OBJECTIVES = {
    "text": ("llm_training.train.objectives", "LanguageModelling"),
    "image_text": ("llm_training.multimodal.objective", "Captioning"),
    "chat": ("llm_training.train.sft", "ChatSFT"),
    "preference": ("llm_training.train.preference", "PreferenceTuning"),
}


@dataclass
class RunSetup:
    runtime: Runtime
    tokenizer: Tokenizer
    objective: Objective
    model: torch.nn.Module  # the module whose state checkpoints hold
    fwd: torch.nn.Module  # what the step calls: the model wrapped for distribution, compiled if asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    micro_batch: int
    accum: int  # micro-batches a step
    loader: BatchLoader
    recovery: ErrorRecovery | None
    monitor: LossMonitor  # of the logged loss: spikes are judged only while recovery can roll back
    save_interval: int  # steps between step checkpoints: at least as often as recovery's backups
    checkpointer: Checkpointer


def objective_for(cfg: Config, data_dir: Path) -> Objective:
    """The objective that trains the prepared folder ``data_dir``, with its datasets open."""
    manifest = read_manifest(data_dir / "train.json")
    kind = manifest.get("kind", "text")
    if kind not in OBJECTIVES:
        raise DataError(
            f"{data_dir / 'train.json'}: prepared data of kind {kind!r}, which no training objective reads "
            f"(known: {', '.join(OBJECTIVES)})"
        )
    module, name = OBJECTIVES[kind]
    return getattr(importlib.import_module(module), name).from_data(cfg, data_dir, manifest)


def build_run(
    cfg: Config,
    data_dir: Path,
    bus: EventBus,
    env: DistEnv,
    *,
    model: torch.nn.Module | None = None,
    recovery: ErrorRecovery | None = None,
) -> RunSetup:
    """The parts of a run, in the order that keeps runs reproducible: the seed before the weights are made, a
    different dropout stream per process after, the optimizer over the model's shards."""
    t = cfg.training
    runtime = resolve_runtime(cfg)
    torch.manual_seed(t.seed)
    tokenizer = Tokenizer.load(data_dir / "vocab.json")
    _resolve_vocab(cfg, tokenizer)
    objective = objective_for(cfg, data_dir)
    if model is None:  # weights, gradients and optimizer state must fit where training runs
        shards = env.world_size if cfg.resources.strategy == "fsdp" else 1
        check_fits(cfg.model, runtime.device, training=True, shards=shards)
    model = (model if model is not None else objective.build_model(cfg)).to(runtime.device)
    if env.enabled:  # the same initial weights everywhere, then a different dropout stream per process
        torch.manual_seed(t.seed + 1_000_003 * env.rank)
    micro_batch, accum = _batch_size(cfg, model, runtime, objective.train_set.seq_len, env)
    loader = BatchLoader(
        objective.train_set, micro_batch, seed=t.seed, rank=env.rank, world_size=env.world_size
    )
    wrapped = wrap_model(model, cfg.resources.strategy, env, runtime.precision)
    optimizer = build_optimizer(model, t, runtime.device)  # after sharding: over the shards
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    rc = cfg.recovery
    if recovery is None and rc.enabled:
        recovery = ErrorRecovery(ckpt_dir, rc.max_retries, rc.backup_freq or t.checkpoint_interval, bus,
                                 rc.backoff_seconds)  # fmt: skip
    if recovery is not None:
        recovery.event_bus = recovery.event_bus or bus
    save_interval = (
        min(t.checkpoint_interval, recovery.backup_freq) if recovery is not None else t.checkpoint_interval
    )
    return RunSetup(
        runtime=runtime,
        tokenizer=tokenizer,
        objective=objective,
        model=model,
        fwd=torch.compile(wrapped) if runtime.compile else wrapped,
        optimizer=optimizer,
        scaler=scaler,
        micro_batch=micro_batch,
        accum=accum,
        loader=loader,
        recovery=recovery,
        monitor=LossMonitor(rc.loss_spike_factor if recovery is not None else 0.0),
        save_interval=save_interval,
        checkpointer=Checkpointer(
            ckpt_dir, cfg.checkpoint, runtime.device, bus, recovery, writer=env.is_main
        ),
    )


def _resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
    if cfg.model.vocab_size is None:
        # round up to a multiple of 64: faster matrix products, unused rows never get a label
        cfg.model.vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); leave it unset to use the tokenizer's"
        )


def _batch_size(cfg: Config, model, runtime: Runtime, seq_len: int, env: DistEnv) -> tuple[int, int]:
    """(micro-batch, accumulation steps); with several processes "auto" takes the size every one can hold."""
    t = cfg.training
    micro_batch, accum = resolve_batch(model, t, runtime, seq_len, cfg.model.vocab_size)
    if env.enabled and not isinstance(t.batch_size, int):
        smallest = all_reduce(torch.tensor([-micro_batch], device=runtime.device), env, "max")
        micro_batch = -int(smallest)
        accum = max(1, round(global_batch(t) / (micro_batch * env.world_size)))
    return micro_batch, accum
