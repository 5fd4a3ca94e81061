"""Sampling text from a model: temperature and top-k, context cropped to the model's window."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 50,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``input_ids`` (B, T) by up to ``max_new_tokens``; temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    context = model.cfg.max_seq_length
    out = input_ids
    for _ in range(max_new_tokens):
        logits = model(out[:, -context:])[:, -1, :].float()
        if temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        out = torch.cat([out, next_id], dim=1)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
    model.train(was_training)
    return out
