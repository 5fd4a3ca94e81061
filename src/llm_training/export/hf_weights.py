"""``transformers``' names for our weights: one table that export (``hf_state``) and import (``state_from_hf``)
both read, for GPT-2 (``GPT2LMHeadModel``) and the Llama layout (Llama, Mistral, Qwen2, Qwen3 share it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from llm_training.config import MODEL_TYPES, ModelConfig
from llm_training.errors import UserError
from llm_training.model.transformer import Transformer, head_size, mlp_width


def style_of(cfg: ModelConfig) -> str:
    return MODEL_TYPES[cfg.model_type.lower()]


class _Entry(NamedTuple):
    """One tensor of ``transformers``' state: which of ours it is, which rows of it, and whether it is
    transposed (GPT-2's Conv1D stores (in, out))."""

    hf: str
    ours: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


def _gpt2_table(cfg: ModelConfig) -> list[_Entry]:
    E = _Entry
    t = [E("transformer.wte.weight", "embed.weight"), E("transformer.wpe.weight", "pos_embed.weight")]
    for i in range(cfg.num_layers):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            t += [
                E(q + theirs + ".weight", p + ours + ".weight"),
                E(q + theirs + ".bias", p + ours + ".bias"),
            ]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):  # fmt: skip
            t += [E(q + theirs + ".weight", p + ours + ".weight", transpose=True),
                  E(q + theirs + ".bias", p + ours + ".bias")]  # fmt: skip
    return t + [E("transformer.ln_f.weight", "norm.weight"), E("transformer.ln_f.bias", "norm.bias")]


def _llama_table(cfg: ModelConfig) -> list[_Entry]:
    E = _Entry
    inner, dim = mlp_width(cfg, "llama"), head_size(cfg)
    q, kv = cfg.num_attention_heads * dim, (cfg.num_kv_heads or cfg.num_attention_heads) * dim
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    t = [E("model.embed_tokens.weight", "embed.weight")]
    for i in range(cfg.num_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        t += [E(h + "input_layernorm.weight", p + "norm1.weight"),
              E(h + "post_attention_layernorm.weight", p + "norm2.weight")]  # fmt: skip
        for part in ("weight", "bias") if qkv_bias else ("weight",):
            qkv = f"{p}attn.qkv.{part}"
            t += [E(f"{h}self_attn.q_proj.{part}", qkv, (0, q)), E(f"{h}self_attn.k_proj.{part}", qkv, (q, q + kv)),
                  E(f"{h}self_attn.v_proj.{part}", qkv, (q + kv, q + 2 * kv))]  # fmt: skip
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head of the queries and keys
            t += [E(f"{h}self_attn.q_norm.weight", f"{p}attn.q_norm.weight"),
                  E(f"{h}self_attn.k_norm.weight", f"{p}attn.k_norm.weight")]  # fmt: skip
        for part in ("weight", "bias") if cfg.bias else ("weight",):
            up = f"{p}mlp.up.{part}"
            t += [E(f"{h}self_attn.o_proj.{part}", f"{p}attn.proj.{part}"),
                  E(f"{h}mlp.gate_proj.{part}", up, (0, inner)), E(f"{h}mlp.up_proj.{part}", up, (inner, 2 * inner)),
                  E(f"{h}mlp.down_proj.{part}", f"{p}mlp.down.{part}")]  # fmt: skip
    return t + [E("model.norm.weight", "norm.weight")]


def _table(cfg: ModelConfig) -> list[_Entry]:
    """Every tensor of the ``transformers`` model, mapped to ours: the one table both directions read."""
    t = _gpt2_table(cfg) if style_of(cfg) == "gpt2" else _llama_table(cfg)
    return t if cfg.tie_embeddings else [*t, _Entry("lm_head.weight", "lm_head.weight")]


def hf_names(cfg: ModelConfig) -> list[str]:
    """The ``transformers`` names of every tensor, in the order ``hf_state`` gives them."""
    return [e.hf for e in _table(cfg)]


def hf_modules(cfg: ModelConfig, layer: str) -> list[tuple[str, tuple[int, int] | None]]:
    """The ``transformers`` modules that our Linear ``layer`` (``blocks.0.attn.qkv``) becomes, each with the
    rows of our weight it takes (None: all): q/k/v and gate/up are split from our fused layers."""
    return [(e.hf.removesuffix(".weight"), e.rows) for e in _table(cfg) if e.ours == f"{layer}.weight"]


def hf_state(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under ``transformers``' names (contiguous copies in ``dtype``); a bias we do not have
    (GPT-2 style without biases) is zeros, as ``GPT2LMHeadModel`` always has one."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for e in _table(model.cfg):
        if e.ours not in sd:
            shape = sd[e.ours.replace(".bias", ".weight")].shape[:1]
            out[e.hf] = torch.zeros(shape)
            continue
        value = sd[e.ours] if e.rows is None else sd[e.ours][e.rows[0] : e.rows[1]]
        out[e.hf] = value.t() if e.transpose else value
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def state_from_hf(
    cfg: ModelConfig, shapes: Mapping[str, torch.Size], hf: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Our state dict (new float32 tensors) from ``transformers``-named ones: the inverse of ``hf_state``.
    ``shapes``: ours (a meta model's state dict will do); ``hf`` may read each tensor only when asked
    (``hf_import.Shards``): each is copied into its place and dropped, so memory holds the result and the
    one tensor being copied."""
    groups: dict[str, list[_Entry]] = {}
    for e in _table(cfg):
        if e.ours in shapes:  # a bias the table names but this model does not have
            groups.setdefault(e.ours, []).append(e)
    missing = [e.hf for entries in groups.values() for e in entries if e.hf not in hf]
    if missing:
        raise UserError(f"{where}: weights missing for {missing[0]} (and {len(missing) - 1} more)")
    out = {}
    for ours, entries in groups.items():
        out[ours] = torch.empty(shapes[ours], dtype=torch.float32)
        for e in entries:
            value = hf[e.hf].t() if e.transpose else hf[e.hf]
            target = out[ours] if e.rows is None else out[ours][e.rows[0] : e.rows[1]]
            if value.shape != target.shape:
                raise UserError(
                    f"{where}: {e.hf} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(value)  # (and from bf16 or fp16 to float32 in the same pass)
    return out


def load_state(model: Transformer, hf: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``transformers``-named tensors into ``model`` (the inverse of ``hf_state``)."""
    shapes = {name: value.shape for name, value in model.state_dict().items()}
    model.load_state_dict(state_from_hf(model.cfg, shapes, hf, where), strict=False)
