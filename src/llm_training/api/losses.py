"""``LossCalculator``: the usage guide's loss component for custom training loops; the same token-level
cross entropy the model's own training step computes (fp32, labels of -100 ignored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_training.errors import ConfigError

FUNCTIONS = ("cross_entropy", "nll")
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class LossCalculatorInput:
    """``predictions``: logits (..., vocab) (``nll``: log-probabilities); ``targets``: token ids (...), -100
    where a position does not count. ``label_smoothing`` as in ``torch.nn.functional.cross_entropy``."""

    predictions: Any
    targets: Any
    loss_function: str = "cross_entropy"
    reduction: str = "mean"
    label_smoothing: float = 0.0
    ignore_index: int = -100


@dataclass
class LossCalculatorOutput:
    """``loss_value``: a tensor that backpropagates (a scalar unless the reduction is "none").
    ``num_tokens`` and ``perplexity`` are read from the device only when asked for."""

    loss_value: Any
    reduction: str
    counted: Any  # a 0-d tensor: the positions that counted

    @property
    def num_tokens(self) -> int:
        return int(self.counted)

    @property
    def perplexity(self) -> float | None:
        """exp(mean loss); None unless the reduction is "mean"."""
        import math

        return math.exp(min(float(self.loss_value.detach()), 50.0)) if self.reduction == "mean" else None

    def __float__(self) -> float:
        return float(self.loss_value.detach().float().mean())


class LossCalculator:
    """``calculate(LossCalculatorInput(predictions=logits, targets=labels))`` -> ``loss_value`` to
    ``.backward()``; publishes nothing (it runs every step)."""

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus

    def calculate(self, spec: LossCalculatorInput | None = None, **fields: Any) -> LossCalculatorOutput:
        """The loss of ``predictions`` against ``targets`` (a LossCalculatorInput or its fields as keywords)."""
        import torch
        import torch.nn.functional as F

        spec = spec or LossCalculatorInput(**fields)
        if spec.loss_function not in FUNCTIONS:
            raise ConfigError(f"loss_function {spec.loss_function!r} is not one of {', '.join(FUNCTIONS)}")
        if spec.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction {spec.reduction!r} is not one of {', '.join(REDUCTIONS)}")
        predictions, targets = spec.predictions, torch.as_tensor(spec.targets)
        if not isinstance(predictions, torch.Tensor) or predictions.dim() < 2:
            raise ConfigError("predictions must be a tensor of logits shaped (..., vocab_size)")
        if tuple(predictions.shape[:-1]) != tuple(targets.shape):
            raise ConfigError(
                f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} do not match: "
                "predictions are (..., vocab_size) for targets (...)"
            )
        flat = predictions.reshape(-1, predictions.size(-1)).float()  # fp32 sums over a large vocabulary
        labels = targets.reshape(-1).to(flat.device, torch.long)
        if spec.loss_function == "nll":
            loss = F.nll_loss(flat, labels, ignore_index=spec.ignore_index, reduction=spec.reduction)
        else:
            loss = F.cross_entropy(flat, labels, ignore_index=spec.ignore_index, reduction=spec.reduction,
                                   label_smoothing=spec.label_smoothing)  # fmt: skip
        if spec.reduction == "none":
            loss = loss.view(targets.shape)
        return LossCalculatorOutput(loss, spec.reduction, (labels != spec.ignore_index).sum())
