"""Optimizers (AdamW, or Muon for hidden matrices with AdamW for the rest) and the learning-rate schedule."""

from __future__ import annotations

import math
import re

import torch

from llm_training.config import TrainingConfig
from llm_training.errors import ConfigError
from llm_training.train.distributed import is_dtensor
from llm_training.train.muon import BatchedMuon, CPUMuon


class CombinedOptimizer:
    """Several optimizers stepped as one (Muon + AdamW); enough of the Optimizer interface for the loop."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("checkpoint optimizer does not match training.optimizer")
        for opt, sub in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sub)


def _adamw(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device):
    """AdamW with weight decay on matrices only; or Muon on the 2-D weights inside the blocks (not embeddings
    or the output head, which Muon's orthogonalised updates do not suit) with AdamW on everything else."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seen: set[int] = set()
    params = []
    for name, p in named:  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            params.append((name, p))
    kind = cfg.optimizer.lower()
    if kind == "adamw":
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return _with_base_lr(_adamw(groups, cfg, device))
    if kind == "muon":
        # the transformer layers' matrices (a text-and-image model's too: lm.blocks, vision.encoder.layers)
        hidden = [p for n, p in params if p.dim() == 2 and re.search(r"(^|\.)(blocks|layers)\.\d+\.", n)]
        hidden_ids = {id(p) for p in hidden}
        rest_decay = [p for _, p in params if id(p) not in hidden_ids and p.dim() >= 2]
        rest_plain = [p for _, p in params if id(p) not in hidden_ids and p.dim() < 2]
        sharded = any(is_dtensor(p) for p in hidden)  # FSDP2: whole matrices needed
        if device.type == "cuda" and not sharded:  # bf16 Newton-Schulz, batched by shape: few kernels
            muon = BatchedMuon(hidden, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, momentum=0.95)
        else:
            muon = CPUMuon(hidden, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, momentum=0.95)
        adamw = _adamw(
            [
                {"params": rest_decay, "weight_decay": cfg.weight_decay},
                {"params": rest_plain, "weight_decay": 0.0},
            ],
            cfg,
            device,
        )
        return _with_base_lr(CombinedOptimizer([muon, adamw]))
    raise ConfigError(f"training.optimizer: {cfg.optimizer!r} is not one of adamw, muon")


def _with_base_lr(optimizer):
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


def lr_at(step: int, progress: float, cfg: TrainingConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then ``lr_schedule`` (cosine, linear or constant) down to
    ``learning_rate * min_lr_ratio``.

    ``progress`` in [0, 1] is the fraction of the run done, by steps or by the time budget, whichever is
    further along: that is how the schedule fits a budget given in seconds.
    """
    peak = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = peak * cfg.min_lr_ratio
    schedule = cfg.lr_schedule.lower()
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float, peak: float) -> None:
    """Scale every group's base learning rate by ``lr / peak`` (groups may start from different rates)."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", peak) * lr / peak
