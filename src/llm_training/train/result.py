"""What a training run returns: ``TrainResult``, and where the run's time went."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    status: str
    steps: int
    tokens: int
    seconds: float
    final_checkpoint: Path
    train_loss: float
    first_val_loss: float | None
    val_loss: float
    val_perplexity: float
    val_bpb: float
    sample: str
    num_parameters: int
    device: str
    precision: str
    metrics: dict = field(default_factory=dict)
    interrupted_by: str | None = None  # the signal that stopped an interrupted run
    resumed_from: Path | None = None
    recoveries: int = 0  # rollbacks, batch reductions and retries during the run
    unsaved: dict = field(default_factory=dict)  # name -> why it was not saved (on_save_error=continue)
    notes: list[str] = field(default_factory=list)  # what the job did other than asked, and why
    timings: dict = field(default_factory=dict)  # where the time went: training, evaluation, saving, ...
    model: Any = field(default=None, repr=False)  # the trained torch module


def time_spent(spent: dict, in_budget: dict, ran: float, since: float) -> dict:
    """Seconds of training, of each of ``spent`` (evaluation, saving), of the final sample and of the whole
    loop. ``in_budget``: ``spent`` when training ended; ``ran``: the training time of this process;
    ``since``: the loop's time so far."""
    before_end, after = sum(in_budget.values()), sum(spent.values()) - sum(in_budget.values())
    return {
        "training": max(0.0, ran - before_end),
        **spent,
        "sample": max(0.0, since - ran - after),
        "loop": since,
    }
