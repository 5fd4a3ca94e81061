"""Checkpoints: written to a temporary name, flushed and renamed; read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain values: model, optimizer, step, epoch, loader position, RNG
states, the resolved config and the tokenizer (its JSON text, so a checkpoint alone can generate text).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from llm_training.errors import UserError

CHECKPOINT_VERSION = 1
_STEP_FILE = re.compile(r"model_step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: a crash mid-write leaves the previous file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without running any code from it (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not an llm_training checkpoint (no model or config inside)")
    return state


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The model_step_N.pt with the largest N, or model_final.pt when no step file exists."""
    checkpoint_dir = Path(checkpoint_dir)
    steps = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.glob("model_step_*.pt")
        if (m := _STEP_FILE.search(p.name))
    ]
    if steps:
        return max(steps)[1]
    final = checkpoint_dir / "model_final.pt"
    return final if final.is_file() else None
