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

from llm_training.config import MODEL_TYPES, Config, ModelConfig, validate
from llm_training.data.tokenizer import BOS, EOT, PAD, Tokenizer
from llm_training.errors import ConfigError, UserError
from llm_training.limits import json_loads
from llm_training.model.transformer import Transformer, mlp_width


def _style(cfg: ModelConfig) -> str:
    return MODEL_TYPES[cfg.model_type.lower()]


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32"):
    """``transformers``' own config object for ``cfg`` (``GPT2Config`` or ``LlamaConfig``): its
    ``save_pretrained`` writes the keys the installed ``transformers`` reads (``dtype``, ``rope_parameters``)."""
    from transformers import GPT2Config, LlamaConfig

    heads, width = cfg.num_attention_heads, cfg.hidden_size
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id,
              "pad_token_id": tokenizer.pad_id, "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype}  # fmt: skip
    if _style(cfg) == "gpt2":
        if cfg.num_kv_heads not in (None, heads) or cfg.qk_norm:
            raise UserError("GPT-2 style with grouped-query attention or QK-norm has no transformers class; "
                            "export it in safetensors or ONNX instead")  # fmt: skip
        return GPT2Config(**common, architectures=["GPT2LMHeadModel"], n_embd=width, n_layer=cfg.num_layers,
                          n_head=heads, n_positions=cfg.max_seq_length, n_inner=mlp_width(cfg, "gpt2"),
                          activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True)  # fmt: skip
    if cfg.qk_norm:
        raise UserError(
            "Llama style with QK-norm has no LlamaForCausalLM equivalent; export safetensors or ONNX"
        )
    config = LlamaConfig(**common, architectures=["LlamaForCausalLM"], hidden_size=width,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
                         num_key_value_heads=cfg.num_kv_heads or heads, intermediate_size=mlp_width(cfg, "llama"),
                         max_position_embeddings=cfg.max_seq_length, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, hidden_act="silu", attention_bias=cfg.bias, mlp_bias=cfg.bias,
                         head_dim=width // heads)  # fmt: skip
    # transformers 5 keeps the base in rope_parameters only; 4.x reads the top-level key and, without it,
    # would rotate with 10000 whatever the model was trained with
    config.rope_theta = cfg.rope_theta
    return config


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
    """Write the folder with ``transformers``' own classes: config.json, generation_config.json,
    model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer as Backend
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype  # fp16 when exported with --quantize fp16
    hf_config(model.cfg, tokenizer, str(dtype).removeprefix("torch.")).save_pretrained(folder)
    ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
    }
    GenerationConfig(**ids).save_pretrained(folder)
    save_file(hf_state(model, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    # model_input_names: without it transformers 4 adds token_type_ids, which GPT2LMHeadModel adds to the
    # embeddings (other logits) and LlamaForCausalLM.generate refuses
    PreTrainedTokenizerFast(
        tokenizer_object=Backend.from_str(tokenizer.backend.to_str()), bos_token=BOS, eos_token=EOT, pad_token=PAD,
        model_max_length=model.cfg.max_seq_length, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(folder)  # fmt: skip
    # our tokenizer.json as it is: transformers 5 adds a post-processor of its own (the same ids, another
    # fingerprint, and an import compares fingerprints with the prepared data's)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    # transformers 5 names its class TokenizersBackend, which 4.x has not; both resolve this name to it
    tok_config = read_json_object(folder / "tokenizer_config.json")
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    return folder


def read_json_object(path: Path) -> dict:
    """A JSON file's object ({} for another JSON value); unreadable or invalid JSON is one line naming it."""
    try:
        data = json_loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def load_hf(folder: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A Hugging Face GPT-2 or Llama folder (ours or another's) as our model, and its tokenizer if it has
    a ``tokenizer.json``. A config field that changes the computation in a way our model cannot (another
    activation, scaled RoPE, a head size of its own, ...) is refused with its key, never ignored."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    c = read_json_object(config_path)
    kind = c.get("model_type")
    if kind not in ("gpt2", "llama"):
        raise UserError(f"{folder}: model_type {kind!r} is not supported (gpt2 or llama)")
    if c.get("quantization_config"):
        raise UserError(f"{config_path}: quantization_config is set: quantized weights cannot be imported; "
                        "use the model's fp32, fp16 or bf16 weights")  # fmt: skip
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (pytorch_model.bin is not read: it can run code)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    where = str(config_path)
    cfg = _gpt2_config(c, hf, where) if kind == "gpt2" else _llama_config(c, hf, where)
    try:
        validate(Config(model=cfg))
    except ConfigError as exc:
        raise UserError(f"{where}: {exc}") from None
    model = Transformer(cfg)
    load_state(model, hf, str(folder))
    tokenizer = Tokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer


# transformers' defaults for the keys a config.json may leave out (GPT2Config, LlamaConfig)
_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                  "add_cross_attention": False, "tie_word_embeddings": True}  # fmt: skip
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "attention_bias": False, "mlp_bias": False, "head_dim": None}  # fmt: skip


def _refuse(where: str, key: str, value, supported: str) -> UserError:
    return UserError(f"{where}: {key} = {json.dumps(value)} cannot be imported: {supported}")


def _require_fields(c: dict, where: str, checks: list[tuple[str, bool, str]]) -> None:
    """(key, whether its value is one our model computes, what is supported) -> the first refusal."""
    for key, ok, supported in checks:
        if not ok:
            raise _refuse(where, key, c[key], supported)


def _gpt2_config(c: dict, hf: dict[str, torch.Tensor], where: str) -> ModelConfig:
    c = {**_GPT2_DEFAULTS, **{k: v for k, v in c.items() if v is not None}}
    _require_fields(c, where, [
        # our MLP computes GELU with the tanh approximation: these two names are that function
        ("activation_function", c["activation_function"] in ("gelu_new", "gelu_pytorch_tanh"),
         "the GPT-2 style here computes gelu_new (= gelu_pytorch_tanh)"),
        ("scale_attn_weights", c["scale_attn_weights"] is True, "attention here is scaled by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", not c["scale_attn_by_inverse_layer_idx"],
         "attention here is not scaled per layer"),
        ("add_cross_attention", not c["add_cross_attention"], "a decoder-only model has no cross-attention"),
    ])  # fmt: skip
    # (reorder_and_upcast_attn only computes attention in fp32: the same function)
    # saved from GPT2Model (no head): wte.weight, h.0..., without the transformer. prefix
    if not any(k.startswith("transformer.") for k in hf):
        hf.update({"transformer." + k: hf.pop(k) for k in list(hf) if not k.startswith("lm_head.")})
    # GPT2LMHeadModel always has biases; a model trained without them (ours, bias=False) has them all zero.
    # (Old files also store the causal mask as h.<i>.attn.bias: not a weight.)
    has_bias = any(
        v.abs().sum() > 0 for k, v in hf.items() if k.endswith(".bias") and k.split(".")[-2] != "attn"
    )
    width = c["n_embd"]
    return ModelConfig(model_type="gpt2", num_layers=c["n_layer"], hidden_size=width, num_attention_heads=c["n_head"],
                       vocab_size=c["vocab_size"], max_seq_length=c["n_positions"],
                       intermediate_size=c["n_inner"] or 4 * width, bias=has_bias,
                       tie_embeddings=c["tie_word_embeddings"], norm_eps=c["layer_norm_epsilon"])  # fmt: skip


def _llama_config(c: dict, hf: dict[str, torch.Tensor], where: str) -> ModelConfig:
    c = {**_LLAMA_DEFAULTS, **{k: v for k, v in c.items() if v is not None}}
    heads = c["num_attention_heads"]
    head_dim = c["hidden_size"] // max(1, heads)  # (0 heads is refused by validate)
    _require_fields(c, where, [
        ("hidden_act", c["hidden_act"] in ("silu", "swish"), "the Llama style here computes silu (SwiGLU)"),
        ("head_dim", c["head_dim"] in (None, head_dim),
         f"the head size here is hidden_size / num_attention_heads = {head_dim}"),
    ])  # fmt: skip
    theta = _rope_theta(c, where)
    if not any(k.startswith("model.") for k in hf):  # saved from LlamaModel (no head): no model. prefix
        hf.update({"model." + k: hf.pop(k) for k in list(hf) if not k.startswith("lm_head.")})
    # one bias switch here covers attention and MLP: a part without biases gets zeros, the same function
    bias = bool(c["attention_bias"] or c["mlp_bias"])
    for part, key in (("self_attn", "attention_bias"), ("mlp", "mlp_bias")):
        if bias and not c[key]:
            for name in [k for k in hf if f".{part}." in k and k.endswith(".weight")]:
                hf.setdefault(name.removesuffix(".weight") + ".bias", torch.zeros(hf[name].shape[0]))
    return ModelConfig(model_type="llama", num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                       num_attention_heads=heads, num_kv_heads=c["num_key_value_heads"],
                       intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                       max_seq_length=c["max_position_embeddings"], bias=bias,
                       tie_embeddings=c["tie_word_embeddings"], norm_eps=c["rms_norm_eps"], rope_theta=theta)  # fmt: skip


def _rope_theta(c: dict, where: str) -> float:
    """RoPE's base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4); any scaled RoPE (linear,
    dynamic, llama3, yarn, ...) or partial rotation is refused: our RoPE is the plain one."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    for key, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(spec, dict):
            raise _refuse(where, key, spec, "only the default RoPE (rope_type default)")
        field = "rope_type" if "rope_type" in spec else "type"  # transformers 4 wrote "type" too
        if spec.get(field, "default") != "default":
            raise _refuse(where, f"{key}.{field}", spec[field], "only the default RoPE (rope_type default)")
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(where, f"{key}.partial_rotary_factor", spec["partial_rotary_factor"],
                          "RoPE here rotates the whole head")  # fmt: skip
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(
            where, "partial_rotary_factor", c["partial_rotary_factor"], "RoPE here rotates the whole head"
        )
    return float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)
