"""Continuing a run from a checkpoint: which one, with the same tokenizer and architecture; the weights,
optimizer and loss scaler back (saved by any number of processes); each process's random generators."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llm_training import events
from llm_training.config import Config, config_from_dict
from llm_training.data.tokenizer import Tokenizer, check_same_tokenizer
from llm_training.errors import UserError
from llm_training.events import EventBus
from llm_training.train.checkpoint import CHECKPOINT_VERSION, find_resume, set_rng_state
from llm_training.train.distributed import DistEnv, get_full_state, set_full_state

log = logging.getLogger("llm_training.train")


def resolve_resume(
    cfg: Config, data_dir: Path, bus: EventBus, resume_from: str | Path | dict | None
) -> tuple[Path | None, dict | None]:
    """(path, state) of the checkpoint to continue from, or (None, None) to start afresh. A resumed run keeps
    the architecture it was trained with (``cfg.model`` is the checkpoint's) and must use its tokenizer."""
    resume = resume_from if resume_from is not None else cfg.checkpoint.resume
    path, state = None, None
    if isinstance(resume, dict):
        state = resume
    elif resume is not None:
        warn = lambda message: bus.publish(events.WARNING, message=message)  # noqa: E731
        path, state = find_resume(resume, Path(cfg.output_dir) / "checkpoints", warn)
        if state is None:
            log.info("resume auto: no valid checkpoint in %s, starting from the beginning", cfg.output_dir)
    vocab = data_dir / "vocab.json"
    if state is not None and state.get("tokenizer_json") and vocab.is_file():
        fix = "resume on the data that checkpoint was trained on"
        check_same_tokenizer(
            Tokenizer.from_json(state["tokenizer_json"]), vocab, f"{path or 'the checkpoint'}'s", fix
        )
    if state is not None:  # the architecture comes from the checkpoint: the model is built before restoring
        cfg.model = config_from_dict({"model": state["config"]["model"]}, str(path or "checkpoint")).model
    return path, state


def weights_state(model, optimizer, scaler, env: DistEnv) -> dict[str, Any]:
    """The weights, optimizer and scaler part of a checkpoint, whole on every process."""
    model_state, optim_state = get_full_state(model, optimizer)
    return {
        "model": model_state,
        "optimizer": optim_state,
        "world_size": env.world_size,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def load_weights(model, optimizer, scaler, state: dict[str, Any], source: str, optimizer_name: str) -> None:
    """``weights_state`` back into this run's parts; a checkpoint of another optimizer or model is refused."""
    saved = (state.get("config") or {}).get("training", {}).get("optimizer")
    if saved and saved != optimizer_name:
        raise UserError(
            f"{source}: saved with training.optimizer {saved!r}, this run uses "
            f"{optimizer_name!r}; resume with the same optimizer"
        )
    try:
        if state.get("checkpoint_version", CHECKPOINT_VERSION) >= 2:  # name-keyed, any process count
            set_full_state(model, optimizer, state["model"], state.get("optimizer"))
        else:
            model.load_state_dict(state["model"])
            if state.get("optimizer"):
                optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{source}: does not match this model ({str(exc).splitlines()[0][:200]})") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def restore_rngs(state: dict[str, Any], env: DistEnv, seed: int) -> None:
    """Each process's generators as saved; with another number of processes, rank 0's generators, then a
    stream of each process's own."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == env.world_size:
        set_rng_state(ranks[env.rank])
    else:
        set_rng_state(ranks[0])
        if env.enabled:
            torch.manual_seed(seed + 1_000_003 * env.rank + int(state["step"]))
