"""Rotary position embeddings: the cosine and sine tables (plain, linear or Llama 3.1 scaling) and the rotation.

The frequencies are computed as ``transformers`` computes them (``modeling_rope_utils``), in float32, so an
imported model rotates exactly as it was trained.
"""

from __future__ import annotations

import math

import torch

from llm_training.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, head_dim: int) -> torch.Tensor:
    """(D/2,) rotation speeds of the head's dimension pairs, after ``cfg.rope_type``."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = cfg.rope_type.lower()
    if kind == "linear":  # the same as dividing every position by the factor
        return inv_freq / cfg.rope_factor
    if kind != "llama3":
        return inv_freq
    # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by the factor,
    # shorter than / high_freq_factor kept, and those between blended smoothly
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D/2) cosines and sines for every position of the context."""
    inv_freq = inverse_frequencies(cfg, head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_length, dtype=torch.float32), inv_freq)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate pairs (first half, second half) as in Llama, in float32 (cos/sin are).
    # cos/sin: (T, D/2) shared by the batch, or (B, T, D/2) when each row has its own positions
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    x1, x2 = x.chunk(2, dim=-1)
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
    # eager inference: both halves written straight into one output of x's dtype, 6 kernels instead of 9
    # (a decoding step is launch-bound: this is a tenth of a Llama-style step at batch 1). Not in a trace
    # or an export: out= has no autograd, and the traced graph may later run with gradients
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    first, second = out.chunk(2, dim=-1)
    torch.sub(x1 * cos, x2 * sin, out=first)
    torch.add(x1 * sin, x2 * cos, out=second)
    return out
