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

import torch

from llm_training.config import MODEL_TYPES, ModelConfig
from llm_training.data.tokenizer import BOS, EOT, PAD, Tokenizer
from llm_training.errors import UserError
from llm_training.model.transformer import MLP, Transformer


def _style(cfg: ModelConfig) -> str:
    return MODEL_TYPES[cfg.model_type.lower()]


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    heads, width = cfg.num_attention_heads, cfg.hidden_size
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}  # fmt: skip
    if _style(cfg) == "gpt2":
        if cfg.num_kv_heads not in (None, heads) or cfg.qk_norm:
            raise UserError("GPT-2 style with grouped-query attention or QK-norm has no transformers class; "
                            "export it in safetensors or ONNX instead")  # fmt: skip
        inner = cfg.intermediate_size or 4 * width
        return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": width,
                "n_layer": cfg.num_layers, "n_head": heads, "n_positions": cfg.max_seq_length, "n_inner": inner,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True}  # fmt: skip
    if cfg.qk_norm:
        raise UserError(
            "Llama style with QK-norm has no LlamaForCausalLM equivalent; export safetensors or ONNX"
        )
    inner = MLP(cfg, "llama").down.in_features  # the width rule lives in the model
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": width,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads,
            "num_key_value_heads": cfg.num_kv_heads or heads, "intermediate_size": inner,
            "max_position_embeddings": cfg.max_seq_length, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "head_dim": width // heads}  # fmt: skip


def hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under ``transformers``' names (contiguous fp32 copies)."""
    cfg, sd = model.cfg, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    hd = cfg.hidden_size // cfg.num_attention_heads
    kv = (cfg.num_kv_heads or cfg.num_attention_heads) * hd
    if _style(cfg) == "gpt2":
        out["transformer.wte.weight"] = sd["embed.weight"]
        out["transformer.wpe.weight"] = sd["pos_embed.weight"]
        for i in range(cfg.num_layers):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[q + theirs + ".weight"] = sd[p + ours + ".weight"]
                out[q + theirs + ".bias"] = sd.get(p + ours + ".bias", torch.zeros(cfg.hidden_size))
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):  # fmt: skip
                weight = sd[p + ours + ".weight"]
                out[q + theirs + ".weight"] = weight.t()  # Conv1D stores (in, out)
                out[q + theirs + ".bias"] = sd.get(p + ours + ".bias", torch.zeros(weight.size(0)))
        out["transformer.ln_f.weight"] = sd["norm.weight"]
        out["transformer.ln_f.bias"] = sd.get("norm.bias", torch.zeros(cfg.hidden_size))
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        out["model.embed_tokens.weight"] = sd["embed.weight"]
        for i in range(cfg.num_layers):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            out[q + "input_layernorm.weight"] = sd[p + "norm1.weight"]
            out[q + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
            qw, kw, vw = sd[p + "attn.qkv.weight"].split([cfg.hidden_size, kv, kv])
            out[q + "self_attn.q_proj.weight"], out[q + "self_attn.k_proj.weight"] = qw, kw
            out[q + "self_attn.v_proj.weight"] = vw
            out[q + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
            if cfg.bias:
                qb, kb, vb = sd[p + "attn.qkv.bias"].split([cfg.hidden_size, kv, kv])
                out[q + "self_attn.q_proj.bias"], out[q + "self_attn.k_proj.bias"] = qb, kb
                out[q + "self_attn.v_proj.bias"] = vb
                out[q + "self_attn.o_proj.bias"] = sd[p + "attn.proj.bias"]
            gate, up = sd[p + "mlp.up.weight"].chunk(2, dim=0)
            out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
            out[q + "mlp.down_proj.weight"] = sd[p + "mlp.down.weight"]
            if cfg.bias:
                gb, ub = sd[p + "mlp.up.bias"].chunk(2, dim=0)
                out[q + "mlp.gate_proj.bias"], out[q + "mlp.up_proj.bias"] = gb, ub
                out[q + "mlp.down_proj.bias"] = sd[p + "mlp.down.bias"]
        out["model.norm.weight"] = sd["norm.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def save_hf(model: Transformer, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write the folder: config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.cfg, tokenizer)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id}, indent=2) + "\n"
    )
    save_file(hf_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
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
    expected = hf_state(model)
    missing = [k for k in expected if k not in hf and not k.endswith(".bias")]
    if missing:
        raise UserError(f"{folder}: weights missing for {missing[0]} (and {len(missing) - 1} more)")
    ours = model.state_dict()
    with torch.no_grad():
        for name, theirs in _our_names(model, hf).items():
            ours[name].copy_(theirs)
    tokenizer = Tokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer


def _our_names(model: Transformer, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_state``: our parameter name -> tensor, from a transformers state dict."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    ours = set(model.state_dict())

    def put(name: str, value: torch.Tensor | None) -> None:
        if name in ours and value is not None:
            out[name] = value

    if _style(cfg) == "gpt2":
        put("embed.weight", hf["transformer.wte.weight"])
        put("pos_embed.weight", hf["transformer.wpe.weight"])
        for i in range(cfg.num_layers):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                put(p + a + ".weight", hf[q + b + ".weight"])
                put(p + a + ".bias", hf.get(q + b + ".bias"))
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                         ("mlp.down", "mlp.c_proj")):  # fmt: skip
                put(p + a + ".weight", hf[q + b + ".weight"].t())
                put(p + a + ".bias", hf.get(q + b + ".bias"))
        put("norm.weight", hf["transformer.ln_f.weight"])
        put("norm.bias", hf.get("transformer.ln_f.bias"))
    else:
        put("embed.weight", hf["model.embed_tokens.weight"])
        for i in range(cfg.num_layers):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            put(p + "norm1.weight", hf[q + "input_layernorm.weight"])
            put(p + "norm2.weight", hf[q + "post_attention_layernorm.weight"])
            put(p + "attn.qkv.weight", torch.cat([hf[q + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            put(p + "attn.proj.weight", hf[q + "self_attn.o_proj.weight"])
            if q + "self_attn.q_proj.bias" in hf:
                put(p + "attn.qkv.bias", torch.cat([hf[q + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
                put(p + "attn.proj.bias", hf.get(q + "self_attn.o_proj.bias"))
            put(
                p + "mlp.up.weight", torch.cat([hf[q + "mlp.gate_proj.weight"], hf[q + "mlp.up_proj.weight"]])
            )
            put(p + "mlp.down.weight", hf[q + "mlp.down_proj.weight"])
            if q + "mlp.gate_proj.bias" in hf:
                put(p + "mlp.up.bias", torch.cat([hf[q + "mlp.gate_proj.bias"], hf[q + "mlp.up_proj.bias"]]))
                put(p + "mlp.down.bias", hf.get(q + "mlp.down_proj.bias"))
        put("norm.weight", hf["model.norm.weight"])
    if not cfg.tie_embeddings:
        put("lm_head.weight", hf.get("lm_head.weight", hf.get("transformer.wte.weight")))
    return out
