"""The preference part of ``llm-finetune`` (``--method dpo|simpo``): the model made ready (dropout off) and
DPO's reference log-probs scored once by the starting model, cached beside the prepared pairs and re-used
while the model's weights, the data and the settings are the same (so ``--resume auto`` never scores again)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from llm_training.config import Config
from llm_training.errors import ConfigError
from llm_training.monitor.console import CountProgress

PREFERENCE_METHODS = ("dpo", "simpo")
REFERENCE_VERSION = 1  # of how reference log-probs are computed: a change scores again


def is_preference(cfg: Config) -> bool:
    return cfg.finetune.method in PREFERENCE_METHODS


def ready_for_preference(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with dropout off (as TRL does for DPO): with it, the policy's log-probs would differ from
    the reference's by noise alone, and the loss would not start at ln 2."""
    if cfg.finetune.train_on_prompt:
        raise ConfigError("finetune.train_on_prompt: preference methods score the replies only; leave it off")
    if not model.cfg.dropout:
        return model
    return type(model).from_state(dataclasses.replace(model.cfg, dropout=0.0), dict(model.state_dict()))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor of ``model``'s state (names, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def cache_reference(cfg: Config, model: torch.nn.Module, data_dir: Path, progress: bool) -> str:
    """DPO's reference log-probs of every train and validation pair under ``model`` (the starting model,
    before any adapter), in ``<data_dir>/reference.npz``: scored unless the cache there is of the same
    weights, data and settings. Sets ``finetune.reference`` to its fingerprint; returns a line for the
    summary."""
    from llm_training.data.preference_prepare import PreferenceDataset, load_reference, save_reference
    from llm_training.data.prepare import existing_fingerprint, fingerprint_of
    from llm_training.train.device import resolve_runtime
    from llm_training.train.objectives import training_window
    from llm_training.train.preference import score_pairs

    runtime = resolve_runtime(cfg)
    window = training_window(cfg)  # rows are cut as training cuts them
    key = fingerprint_of(REFERENCE_VERSION, weights_fingerprint(model), existing_fingerprint(data_dir),
                         runtime.precision, window)  # fmt: skip
    cfg.finetune.reference = key
    cached = load_reference(data_dir)
    if cached is not None and cached[0] == key:
        return f"re-used the reference log-probs cached in {data_dir / 'reference.npz'}"
    sets = {split: PreferenceDataset(data_dir / f"{split}.json", window) for split in ("train", "validation")}
    total = sum(s.num_windows for s in sets.values())
    bar = CountProgress(total, unit="pair", desc="reference log-probs") if progress else None
    batch = cfg.training.batch_size if isinstance(cfg.training.batch_size, int) else 8
    model.to(runtime.device)
    try:
        scores = {
            split: score_pairs(model, s, runtime, batch, bar and bar.update) for split, s in sets.items()
        }
    finally:
        if bar is not None:
            bar.close()
    path = save_reference(data_dir, key, scores)
    return f"scored {total:,} pairs with the starting model: reference log-probs cached in {path}"


def preference_note(metrics: dict) -> str | None:
    """The final validation's reward accuracy and margin, for the summary."""
    if "val_reward_accuracy" not in metrics:
        return None
    return (f"validation reward accuracy {metrics['val_reward_accuracy']:.1%} (chosen reply's reward above the "
            f"rejected one's), mean reward margin {metrics['val_margin']:.3f}")  # fmt: skip
