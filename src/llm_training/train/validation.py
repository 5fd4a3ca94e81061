"""Validation loss over a prepared split, with perplexity and bits per byte: what the loop reports at each
evaluation and ``llm-evaluate`` reports of captions."""

from __future__ import annotations

import math

import torch

from llm_training.data.loader import TokenDataset
from llm_training.train.device import Runtime
from llm_training.train.distributed import DistEnv, all_reduce
from llm_training.train.objectives import LanguageModelling, Objective

SINGLE = DistEnv()


@torch.no_grad()
def evaluate_loss(
    model,
    dataset: TokenDataset,
    runtime: Runtime,
    batch_size: int,
    max_batches: int = 0,
    env: DistEnv = SINGLE,
    objective: Objective | None = None,
) -> dict:
    """Mean loss over validation windows (next-token loss with the default objective, language modelling),
    with perplexity and bits per byte.

    Bits per byte = total NLL in nats / (UTF-8 bytes of the text those tokens encode x ln 2); the bytes of a
    subset of windows are its tokens times the split's bytes per token. With several processes each takes
    every world_size-th window of the same set and the sums are added up; every process runs the same number
    of forward passes (a sharded model needs all of them), padding with a window that counts for nothing.
    """
    objective = objective or LanguageModelling()
    # an objective with more to report than its loss (preference pairs' reward accuracy) measures sums of
    # its figures with the loss and turns their totals into figures at the end
    measure = getattr(objective, "measure", None)
    extra: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    n = dataset.num_windows
    if max_batches:
        n = min(n, max_batches * batch_size * env.world_size)
    mine = list(range(env.rank, n, env.world_size))
    batches = math.ceil(math.ceil(n / env.world_size) / batch_size)
    sums = torch.zeros(2, device=runtime.device, dtype=torch.float64)  # loss x tokens, tokens
    for b in range(batches):
        indices = mine[b * batch_size : (b + 1) * batch_size]
        batch = dataset.batch(indices or [0])
        loss, parts = (
            measure(model, batch, runtime) if measure else (objective.loss(model, batch, runtime), {})
        )
        if indices:
            counted = objective.tokens(batch).to(runtime.device)  # padding after a caption does not count
            sums[0] += loss.double() * counted
            sums[1] += counted
        for name, value in parts.items():  # every process, padding counting 0: the same names everywhere
            extra[name] = extra.get(name, 0.0) + value.double() * bool(indices)
    model.train(was_training)
    names = sorted(extra)  # the same on every process: one all-reduce for everything
    totals = torch.cat([sums, torch.stack([extra[n] for n in names]) if names else sums[:0]])
    all_reduce(totals, env)
    tokens = int(totals[1])
    mean = float(totals[0]) / tokens
    figures = {
        "val_loss": mean,
        "val_perplexity": math.exp(min(mean, 50.0)),
        "val_bpb": mean / math.log(2) / dataset.bytes_per_token,
        "val_tokens": tokens,
    }
    if names:
        figures.update(objective.figures(dict(zip(names, totals[2:].tolist(), strict=True)), tokens, dataset))
    return figures
