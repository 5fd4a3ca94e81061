"""The Hugging Face format: a folder ``transformers``' ``AutoModelForCausalLM`` and ``AutoTokenizer`` load as it
is (GPT-2 style -> ``GPT2LMHeadModel``, Llama style -> ``LlamaForCausalLM``), and the way back.

Weights go to ``model.safetensors`` under the names ``transformers`` uses; our GPT-2 style without biases
gets zero biases (``GPT2LMHeadModel`` always has them); the tokenizer is our byte-level BPE's
``tokenizer.json`` with a ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``. Shapes the target
classes cannot express (grouped-query attention or QK-norm in GPT-2 style, QK-norm in Llama style) are
refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from llm_training.config import MODEL_TYPES, ModelConfig
from llm_training.data.tokenizer import BOS, EOT, PAD, Tokenizer
from llm_training.errors import UserError
from llm_training.model.transformer import Transformer, mlp_width


def _style(cfg: ModelConfig) -> str:
    return MODEL_TYPES[cfg.model_type.lower()]


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32") -> dict:
    heads, width = cfg.num_attention_heads, cfg.hidden_size
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype}  # fmt: skip
    if _style(cfg) == "gpt2":
        if cfg.num_kv_heads not in (None, heads) or cfg.qk_norm:
            raise UserError("GPT-2 style with grouped-query attention or QK-norm has no transformers class; "
                            "export it in safetensors or ONNX instead")  # fmt: skip
        inner = mlp_width(cfg, "gpt2")
        return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": width,
                "n_layer": cfg.num_layers, "n_head": heads, "n_positions": cfg.max_seq_length, "n_inner": inner,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True}  # fmt: skip
    if cfg.qk_norm:
        raise UserError(
            "Llama style with QK-norm has no LlamaForCausalLM equivalent; export safetensors or ONNX"
        )
    inner = mlp_width(cfg, "llama")
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": width,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads,
            "num_key_value_heads": cfg.num_kv_heads or heads, "intermediate_size": inner,
            "max_position_embeddings": cfg.max_seq_length, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "head_dim": width // heads}  # fmt: skip


class _Entry(NamedTuple):
    """One tensor of ``transformers``' state: which of ours it is, which rows of it, and whether it is
    transposed (GPT-2's Conv1D stores (in, out))."""

    hf: str
    ours: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


def _table(cfg: ModelConfig) -> list[_Entry]:
    """Every tensor of the ``transformers`` model, mapped to ours: the one table both directions read."""
    width = cfg.hidden_size
    kv = (cfg.num_kv_heads or cfg.num_attention_heads) * (width // cfg.num_attention_heads)
    E = _Entry
    if _style(cfg) == "gpt2":
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
        t += [E("transformer.ln_f.weight", "norm.weight"), E("transformer.ln_f.bias", "norm.bias")]
    else:
        inner = mlp_width(cfg, "llama")
        t = [E("model.embed_tokens.weight", "embed.weight")]
        parts = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.num_layers):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            t += [E(q + "input_layernorm.weight", p + "norm1.weight"),
                  E(q + "post_attention_layernorm.weight", p + "norm2.weight")]  # fmt: skip
            for part in parts:
                qkv, up = f"{p}attn.qkv.{part}", f"{p}mlp.up.{part}"
                t += [E(f"{q}self_attn.q_proj.{part}", qkv, (0, width)),
                      E(f"{q}self_attn.k_proj.{part}", qkv, (width, width + kv)),
                      E(f"{q}self_attn.v_proj.{part}", qkv, (width + kv, width + 2 * kv)),
                      E(f"{q}self_attn.o_proj.{part}", f"{p}attn.proj.{part}"),
                      E(f"{q}mlp.gate_proj.{part}", up, (0, inner)), E(f"{q}mlp.up_proj.{part}", up, (inner, 2 * inner)),
                      E(f"{q}mlp.down_proj.{part}", f"{p}mlp.down.{part}")]  # fmt: skip
        t.append(E("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        t.append(E("lm_head.weight", "lm_head.weight"))
    return t


def hf_names(cfg: ModelConfig) -> list[str]:
    """The ``transformers`` names of every tensor, in the order ``hf_state`` gives them."""
    return [e.hf for e in _table(cfg)]


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


def load_state(model: Transformer, hf: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``transformers``-named tensors into ``model`` (the inverse of ``hf_state``)."""
    ours = model.state_dict()
    table = _table(model.cfg)
    missing = [e.hf for e in table if e.ours in ours and e.hf not in hf]
    if missing:
        raise UserError(f"{where}: weights missing for {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for e in table:
            if e.ours not in ours:
                continue
            value = hf[e.hf].t() if e.transpose else hf[e.hf]
            target = ours[e.ours] if e.rows is None else ours[e.ours][e.rows[0] : e.rows[1]]
            if target.shape != value.shape:
                raise UserError(
                    f"{where}: {e.hf} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(value)


def save_hf(model: Transformer, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write the folder: config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype  # fp16 when exported with --quantize fp16
    config = hf_config(model.cfg, tokenizer, str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id}, indent=2) + "\n"
    )
    save_file(hf_state(model, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT,
                  "pad_token": PAD, "model_max_length": model.cfg.max_seq_length,
                  "clean_up_tokenization_spaces": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}, indent=2) + "\n"
    )
    return folder


def load_hf(folder: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A Hugging Face GPT-2 or Llama folder (ours or another's) as our model, and its tokenizer if it has
    a ``tokenizer.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    c = json.loads(config_path.read_text())
    kind = c.get("model_type")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (pytorch_model.bin is not read: it can run code)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    if kind == "gpt2":
        width, layers = c["n_embd"], c["n_layer"]
        has_bias = any(v.abs().sum() > 0 for k, v in hf.items() if k.endswith(".bias"))
        cfg = ModelConfig(model_type="gpt2", num_layers=layers, hidden_size=width, num_attention_heads=c["n_head"],
                          vocab_size=c["vocab_size"], max_seq_length=c["n_positions"],
                          intermediate_size=c.get("n_inner") or 4 * width, bias=has_bias,
                          tie_embeddings=c.get("tie_word_embeddings", True),
                          norm_eps=c.get("layer_norm_epsilon", 1e-5))  # fmt: skip
    elif kind == "llama":
        cfg = ModelConfig(model_type="llama", num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                          num_attention_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads"),
                          intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                          max_seq_length=c["max_position_embeddings"], bias=c.get("attention_bias", False),
                          tie_embeddings=c.get("tie_word_embeddings", False), norm_eps=c.get("rms_norm_eps", 1e-6),
                          rope_theta=c.get("rope_theta", 10000.0))  # fmt: skip
    else:
        raise UserError(f"{folder}: model_type {kind!r} is not supported (gpt2 or llama)")
    model = Transformer(cfg)
    load_state(model, hf, str(folder))
    tokenizer = Tokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer
