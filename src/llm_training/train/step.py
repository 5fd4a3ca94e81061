"""The one training step: forward, loss, backward, clip and optimizer step, over accumulated micro-batches."""

from __future__ import annotations

import torch


def forward_loss(
    model, batch: dict, runtime, non_blocking: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, labels on the device) of one batch: ``input_ids`` and ``labels``, and any other tensors (the
    images of a text-and-image model) passed to the model as keywords."""
    device = runtime.device
    moved = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    input_ids, labels = moved.pop("input_ids"), moved.pop("labels")
    with runtime.autocast():
        return model(input_ids, labels, **moved), labels


def train_step(
    model, micro_batches, optimizer, runtime, *, grad_clip: float, scaler=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one optimizer step over ``micro_batches`` (a list of dicts with input_ids and labels).

    The loss of each micro-batch is weighted by its share of the step's counted tokens (labels other than
    -100), so accumulation equals one large batch even when micro-batches hold different numbers of them. Returns (mean loss, gradient norm) as device tensors: reading them forces a host sync, so
    the caller does that only when it logs.
    """
    device = runtime.device
    counts = [(b["labels"] != -100).sum() for b in micro_batches]  # on the labels' device: no GPU sync
    total_tokens = torch.stack(counts).sum().clamp(min=1).to(device)
    loss_sum = torch.zeros((), device=device)
    for batch, count in zip(micro_batches, counts, strict=True):
        loss, _ = forward_loss(model, batch, runtime, non_blocking=True)
        weight = count.to(device) / total_tokens
        scaled = loss * weight
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += scaled.detach()
    # fp16 only: the scaler works on torch optimizers, so a combined one is unscaled and stepped part by part
    parts = getattr(optimizer, "optimizers", [optimizer])
    if scaler is not None:
        for part in parts:
            scaler.unscale_(part)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
    if scaler is not None:
        for part in parts:
            scaler.step(part)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm
