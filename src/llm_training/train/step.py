"""The one training step: forward, loss, backward, clip and optimizer step, over accumulated micro-batches;
and micro-batches cut smaller (after an out-of-memory) for the same step."""

from __future__ import annotations

import torch

from llm_training.train.distributed import DistEnv, all_reduce
from llm_training.train.objectives import LanguageModelling, Objective


def train_step(
    model,
    micro_batches,
    optimizer,
    runtime,
    *,
    grad_clip: float,
    scaler=None,
    objective: Objective | None = None,
    env: DistEnv | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one optimizer step over ``micro_batches`` (dicts of tensors; with the default objective,
    language modelling, input_ids and labels). The objective makes each micro-batch's loss.

    The loss of each micro-batch is weighted by its share of the step's counted tokens (``objective.tokens``:
    labels other than -100 in language modelling), so accumulation equals one large batch even when
    micro-batches hold different numbers of them. With several processes (``env``) the share is of every
    process's tokens, so that DDP's and FSDP's mean of the processes' gradients is the gradient of the
    global batch (chat examples differ in trained tokens; a mean of per-process means would weigh a token
    of a process with few more). Returns (loss, gradient norm) as device tensors: the loss is this
    process's part of the step's mean (the mean over processes is the step's loss); reading them forces a
    host sync, so the caller does that only when it logs.
    """
    device = runtime.device
    objective = objective or LanguageModelling()
    counts = [objective.tokens(b) for b in micro_batches]  # on the batches' device: no GPU sync
    total_tokens = torch.stack(counts).sum().to(device)
    share = 1.0
    if env is not None and env.enabled:  # one scalar all-reduce, queued on the device: no host sync
        all_reduce(total_tokens, env)
        share = float(env.world_size)  # the processes' gradients are averaged: W x (mine / all of them)
    total_tokens = total_tokens.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for batch, count in zip(micro_batches, counts, strict=True):
        loss = objective.loss(model, batch, runtime, non_blocking=True)
        weight = count.to(device) * share / total_tokens
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


def split_batches(micro: list[dict], parts: int) -> list[dict]:
    """Each micro-batch cut into ``parts`` smaller ones (the step weighs them by tokens: same gradient).
    Every tensor of a batch has one row a sequence (or pair), whatever the objective names them."""
    if parts == 1:
        return micro
    out = []
    for batch in micro:
        rows = next(iter(batch.values())).shape[0]
        size = max(1, rows // parts)
        out += [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]
    return out
