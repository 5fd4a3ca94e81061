"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from llm_training.config import TrainingConfig


def build_optimizer(
    model: torch.nn.Module, cfg: TrainingConfig, device: torch.device
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in params if p.dim() < 2]  # norms and biases
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


def lr_at(step: int, progress: float, cfg: TrainingConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``learning_rate * min_lr_ratio``.

    ``progress`` in [0, 1] is the fraction of the run done, by steps or by the time budget, whichever is
    further along: that is how the schedule fits a budget given in seconds.
    """
    peak = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
