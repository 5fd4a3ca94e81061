"""``training.batch_size: auto``: the largest micro-batch that fits, with gradient accumulation keeping the
global batch (``training.global_batch_size`` sequences per optimizer step)."""

from __future__ import annotations

import gc
import logging

import torch

from llm_training.config import TrainingConfig
from llm_training.train.device import Runtime

log = logging.getLogger("llm_training.autobatch")


def global_batch(t: TrainingConfig) -> int:
    if t.global_batch_size:
        return t.global_batch_size
    size = t.batch_size if isinstance(t.batch_size, int) else 16
    return size * t.gradient_accumulation_steps


def _fits(model, runtime: Runtime, batch: int, seq_len: int, vocab: int) -> bool:
    """One forward and backward pass of ``batch`` sequences, with a margin for the optimizer's state."""
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=runtime.device)
    try:
        with runtime.autocast():
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.cuda.synchronize(runtime.device)
        # the optimizer's state comes later: keep room for it (AdamW: 8 bytes a parameter, Muon less)
        state = 8 * sum(p.numel() for p in model.parameters())
        total = torch.cuda.get_device_properties(runtime.device).total_memory
        return torch.cuda.max_memory_allocated(runtime.device) + state <= 0.92 * total
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        del ids
        gc.collect()
        torch.cuda.empty_cache()


def resolve_batch(model, t: TrainingConfig, runtime: Runtime, seq_len: int, vocab: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for ``t``; measured only when ``batch_size`` is ``auto``."""
    if isinstance(t.batch_size, int):
        return t.batch_size, t.gradient_accumulation_steps
    target = global_batch(t)
    if runtime.device.type != "cuda":  # host memory: no reliable out-of-memory signal, take it in one piece
        log.info("batch_size auto on %s: micro-batch %d, no accumulation", runtime.device, target)
        return target, 1
    micro = 1 << (target.bit_length() - 1) if target & (target - 1) else target  # a power of two <= target
    while micro > 1:
        torch.cuda.reset_peak_memory_stats(runtime.device)
        if _fits(model, runtime, micro, seq_len, vocab) and target % micro == 0:
            break
        micro //= 2
    accumulation = max(1, target // micro)
    log.info("batch_size auto: micro-batch %d x %d accumulation steps = %d sequences a step",
             micro, accumulation, micro * accumulation)  # fmt: skip
    return micro, accumulation
