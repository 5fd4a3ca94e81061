"""The Hugging Face format: a folder ``transformers``' ``AutoModelForCausalLM`` and ``AutoTokenizer`` load as it
is (GPT-2 style -> ``GPT2LMHeadModel``, Llama style -> ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
``Qwen3ForCausalLM``); the way back, ``load_hf``, is ``hf_import``'s.

Weights go to ``model.safetensors`` under the names ``transformers`` uses; our GPT-2 style without biases
gets zero biases (``GPT2LMHeadModel`` always has them); the tokenizer is our byte-level BPE's
``tokenizer.json`` with a ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``. Shapes the target
classes cannot express (grouped-query attention or QK-norm in GPT-2 style, QK-norm with biases in Llama
style) are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_training.config import ModelConfig
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.export.hf_import import load_hf, read_json_object
from llm_training.export.hf_weights import hf_names, hf_state, load_state, style_of
from llm_training.model.transformer import Transformer, head_size, mlp_width

__all__ = ["hf_config", "hf_names", "hf_state", "load_hf", "load_state", "read_json_object", "save_hf"]


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32"):
    """``transformers``' own config object for ``cfg``: ``GPT2Config``, or for the Llama style
    ``LlamaConfig``, ``Qwen2Config`` (biases on queries, keys and values only) or ``Qwen3Config`` (QK-norm).
    Its ``save_pretrained`` writes the keys the installed ``transformers`` reads (``dtype``, ``rope_parameters``)."""
    import transformers

    heads, width = cfg.num_attention_heads, cfg.hidden_size
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id,
              "pad_token_id": tokenizer.pad_id, "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype}  # fmt: skip
    if style_of(cfg) == "gpt2":
        if cfg.num_kv_heads not in (None, heads) or cfg.qk_norm or cfg.head_dim not in (None, width // heads):
            raise UserError("GPT-2 style with a head_dim of its own, grouped-query attention or QK-norm has no "
                            "transformers class; export it in safetensors or ONNX instead")  # fmt: skip
        return transformers.GPT2Config(
            **common, architectures=["GPT2LMHeadModel"], n_embd=width, n_layer=cfg.num_layers, n_head=heads,
            n_positions=cfg.max_seq_length, n_inner=mlp_width(cfg, "gpt2"), activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True)  # fmt: skip
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    family = "qwen3" if cfg.qk_norm else "qwen2" if qkv_bias and not cfg.bias else "llama"
    if (family == "qwen3" and cfg.bias) or (family != "qwen2" and qkv_bias != cfg.bias):
        raise UserError("Llama style with these biases (model.bias, model.qkv_bias) and QK-norm has no transformers "
                        "class; export safetensors or ONNX")  # fmt: skip
    rope = {} if cfg.rope_type.lower() == "default" else {"rope_scaling": _rope_parameters(cfg)}
    keys = {**common, **rope, "hidden_size": width, "num_hidden_layers": cfg.num_layers, "num_attention_heads": heads,
            "num_key_value_heads": cfg.num_kv_heads or heads, "intermediate_size": mlp_width(cfg, "llama"),
            "max_position_embeddings": cfg.max_seq_length, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "hidden_act": "silu", "head_dim": head_size(cfg)}  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**keys, architectures=["LlamaForCausalLM"], attention_bias=cfg.bias,
                                          mlp_bias=cfg.bias)  # fmt: skip
    elif family == "qwen2":
        config = transformers.Qwen2Config(**keys, architectures=["Qwen2ForCausalLM"])
    else:
        config = transformers.Qwen3Config(**keys, architectures=["Qwen3ForCausalLM"], attention_bias=False)
    # transformers 5 keeps the base in rope_parameters only; 4.x reads the top-level key and, without it,
    # would rotate with 10000 whatever the model was trained with
    config.rope_theta = cfg.rope_theta
    return config


def _rope_parameters(cfg: ModelConfig) -> dict:
    """The scaled RoPE as transformers names it (read by 4.x as rope_scaling, by 5 into rope_parameters)."""
    spec = {"rope_type": cfg.rope_type.lower(), "factor": cfg.rope_factor, "rope_theta": cfg.rope_theta}
    if spec["rope_type"] == "llama3":
        spec |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                 "original_max_position_embeddings": cfg.rope_original_context}  # fmt: skip
    return spec


def save_hf(
    model: Transformer, tokenizer: Tokenizer, folder: str | Path, chat_template: str | None = None
) -> Path:
    """Write the folder with ``transformers``' own classes: config.json, generation_config.json,
    model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json, and the chat template of a
    fine-tuned chat model where this transformers version keeps it)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer as Backend
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype  # fp16 when exported with --quantize fp16
    hf_config(model.cfg, tokenizer, str(dtype).removeprefix("torch.")).save_pretrained(folder)
    # a chat model ends its turn with ChatML's <|im_end|> (which a base model's end-of-text is not): generate()
    # stops at either
    end_of_turn = (
        tokenizer.backend.token_to_id("<|im_end|>")
        if chat_template and "<|im_end|>" in chat_template
        else None
    )
    ends = [tokenizer.eot_id] + ([end_of_turn] if end_of_turn not in (None, tokenizer.eot_id) else [])
    ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": ends if len(ends) > 1 else tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
    }
    GenerationConfig(**ids).save_pretrained(folder)
    save_file(hf_state(model, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    # model_input_names: without it transformers 4 adds token_type_ids, which GPT2LMHeadModel adds to the
    # embeddings (other logits) and LlamaForCausalLM.generate refuses
    PreTrainedTokenizerFast(
        tokenizer_object=Backend.from_str(tokenizer.backend.to_str()), bos_token=tokenizer.special.bos,
        eos_token=tokenizer.special.eos, pad_token=tokenizer.special.pad,
        model_max_length=model.cfg.max_seq_length, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"], chat_template=chat_template,
    ).save_pretrained(folder)  # fmt: skip
    # our tokenizer.json as it is: transformers 5 adds a post-processor of its own (the same ids, another
    # fingerprint, and an import compares fingerprints with the prepared data's)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    # transformers 5 names its class TokenizersBackend, which 4.x has not; both resolve this name to it
    tok_config = read_json_object(folder / "tokenizer_config.json")
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    return folder
