"""What a model of a given config costs in memory, checked before anything is allocated, so that a config
asking for 2,000,000,000 vocabulary entries or a hidden size of 1,048,576 gets one line saying what fits
instead of an allocator's traceback (or minutes of swapping)."""

from __future__ import annotations

import math
import os

from llm_training.config import MODEL_TYPES, ModelConfig
from llm_training.errors import ConfigError

# fp32 weights (4) + gradients (4) + AdamW's two moments (8); Muon keeps one momentum, so this is an upper
# bound for it, and the lower bound of what training holds besides activations
TRAIN_BYTES_PER_PARAMETER = 16
WEIGHT_BYTES_PER_PARAMETER = 4


def parameter_count(cfg: ModelConfig) -> int:
    """The language model's parameters, counted from the config as ``Transformer`` lays them out."""
    from llm_training.model.transformer import head_size, mlp_width

    style = MODEL_TYPES[cfg.model_type.lower()]
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim, kv = head_size(cfg), cfg.num_kv_heads or heads
    bias = int(cfg.bias)
    qkv_bias = bias if cfg.qkv_bias is None else int(cfg.qkv_bias)
    width = mlp_width(cfg, style)
    attention = (
        h * (heads + 2 * kv) * head_dim
        + (heads * head_dim) * h
        + qkv_bias * (heads + 2 * kv) * head_dim
        + bias * h
    )
    mlp = (
        h * width * (2 if style == "llama" else 1)
        + width * h
        + bias * (width * (2 if style == "llama" else 1) + h)
    )
    per_norm = 1 if style == "llama" or not cfg.bias else 2  # RMSNorm: a weight; LayerNorm: and a bias
    norms = per_norm * (2 * h + (2 * head_dim if cfg.qk_norm else 0))
    vocab = cfg.vocab_size or 0
    embeddings = vocab * h * (1 if cfg.tie_embeddings else 2) + (
        cfg.max_seq_length * h if style == "gpt2" else 0
    )
    return cfg.num_layers * (attention + mlp + norms) + embeddings + per_norm * h


def buffer_bytes(cfg: ModelConfig) -> int:
    """Tables a model holds besides its parameters: RoPE's cosines and sines (fp32) for the whole context."""
    if MODEL_TYPES[cfg.model_type.lower()] != "llama":
        return 0
    from llm_training.model.transformer import head_size

    return 2 * cfg.max_seq_length * head_size(cfg) * 4


def available_bytes(device) -> tuple[int, str] | None:
    """Free memory where the model will live, and a name for it; None when it cannot be told."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free), f"{device} has"
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine has"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine has"
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _millions(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def check_fits(cfg: ModelConfig, device="cpu", training: bool = False, shards: int = 1) -> None:
    """Raise a ConfigError that says what fits when the model (and, ``training``, its gradients and
    optimizer state, split over ``shards`` processes under FSDP) cannot fit in the device's free memory."""
    params = parameter_count(cfg)
    per = TRAIN_BYTES_PER_PARAMETER if training else WEIGHT_BYTES_PER_PARAMETER
    need = math.ceil(params * per / max(1, shards)) + buffer_bytes(cfg)
    free = available_bytes(device)
    if free is None or need <= free[0]:
        return
    if buffer_bytes(cfg) >= free[0]:
        raise ConfigError(
            f"model.max_seq_length {cfg.max_seq_length:,} needs {_gb(buffer_bytes(cfg))} of position tables "
            f"alone, but {free[1]} {_gb(free[0])} free; lower model.max_seq_length"
        )
    what = "weights, gradients and optimizer state" if training else "its weights"
    fits = max(0, free[0] - buffer_bytes(cfg)) * max(1, shards) // per
    raise ConfigError(
        f"model of {_millions(params)} parameters (model.hidden_size {cfg.hidden_size:,}, num_layers "
        f"{cfg.num_layers:,}, vocab_size {cfg.vocab_size or 0:,}, max_seq_length {cfg.max_seq_length:,}) needs "
        f"at least {_gb(need)} for {what}, but {free[1]} {_gb(free[0])} free: about {_millions(fits)} "
        "parameters fit; lower model.hidden_size, num_layers, vocab_size or max_seq_length"
    )
