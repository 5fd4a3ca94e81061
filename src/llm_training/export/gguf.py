"""GGUF (llama.cpp's format) through the ``gguf`` package, and reading it back.

Tensor names come from ``gguf``'s own name map for the architecture (``llama`` or ``gpt2``), fed the Hugging
Face names of ``export.hf``: the same route as llama.cpp's ``convert_hf_to_gguf.py``, including its two
layout changes: Llama-style query and key rows (and biases) are permuted from the rotate-half RoPE layout to
GGML's interleaved pairs, and GPT-2's Conv1D matrices keep PyTorch's (out, in) orientation. Metadata: the
architecture's hyper-parameters under ``{arch}.*`` and the byte-level BPE vocabulary, merges and special ids
under ``tokenizer.ggml.*`` (model ``gpt2``, pre-tokenizer ``gpt-2``). A chat fine-tuned model also gets its
Jinja template as ``tokenizer.chat_template`` (what llama.cpp's chat formats the conversation with) and its
end-of-turn markup (``<|im_end|>``) as ``tokenizer.ggml.eot_token_id``: llama.cpp ends generation at the
end-of-turn as at ``eos``, and ``eos`` stays the end-of-text token, which is what the tokenizer's end of a
document is (llama.cpp's converter writes a model's ``eos_token``; ours is ``<|endoftext|>``).

Types: ``f32`` (default), ``f16``, or ``q8_0`` (llama.cpp's 8-bit blocks of 32, what ``--quantize int8``
maps to); 1-D tensors (norms, biases) are always f32 and a matrix whose rows are not a multiple of 32 falls
back to f16 under q8_0, as llama.cpp's converter does.

``gpt2.context_length`` is the position table's size, which llama.cpp reads it as. ``transformers``' GGUF
loader (4.x and 5.x) maps it to ``n_ctx``, which ``GPT2Config`` does not read, so it builds 1024 positions
whatever the file says: a GPT-2-style file of another context loads there with ``n_positions=<context>``
passed to ``from_pretrained`` (no key reaches it; a padded 1024-row table would let llama.cpp run past the
trained context). The export says so in its log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from llm_training.config import ModelConfig, model_config_from_json, model_config_json
from llm_training.data.tokenizer import OURS, SpecialTokens, Tokenizer
from llm_training.errors import UserError
from llm_training.export.hf_weights import hf_names, hf_state, load_state, style_of
from llm_training.model.transformer import Transformer

GGUF_TYPES = ("f32", "f16", "q8_0")
META_CONFIG = "llm_training.config"  # our ModelConfig as JSON, so that reading back needs no guessing

log = logging.getLogger("llm_training.export")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half rows -> interleaved pairs, per head (llama.cpp's ``LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(cfg: ModelConfig):
    """``gguf``'s own map from Hugging Face names to llama.cpp's, for the architecture of ``cfg``."""
    import gguf

    arch = gguf.MODEL_ARCH.GPT2 if style_of(cfg) == "gpt2" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)
    return {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in hf_names(cfg)}


def _relayout(cfg: ModelConfig, hf_name: str, data: np.ndarray, to_gguf: bool) -> np.ndarray:
    """llama.cpp's layout of a tensor (``to_gguf``) or back: GPT-2's Conv1D matrices as (out, in), and the
    rows of Llama-style queries and keys permuted per head."""
    if style_of(cfg) == "gpt2":
        return data.T if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) else data
    permute = _permute if to_gguf else _unpermute
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute(data, cfg.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute(data, cfg.num_kv_heads or cfg.num_attention_heads)
    return data


def _gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array, in llama.cpp's layout."""
    cfg = model.cfg
    if cfg.qk_norm:
        raise UserError("GGUF: QK-norm has no llama.cpp equivalent in the llama and gpt2 architectures")
    gpt2 = style_of(cfg) == "gpt2"
    if gpt2 and cfg.num_kv_heads not in (None, cfg.num_attention_heads):
        raise UserError("GGUF: llama.cpp's gpt2 architecture has no grouped-query attention; use Llama style")
    if (
        cfg.head_dim not in (None, cfg.hidden_size // cfg.num_attention_heads)
        or cfg.rope_type.lower() != "default"
        or cfg.qkv_bias not in (None, cfg.bias)
    ):
        raise UserError("GGUF: a head_dim of its own, scaled RoPE (model.rope_type) or biases on queries, keys "
                        "and values only are not written here; export safetensors or Hugging Face instead")  # fmt: skip
    names = _name_map(cfg)
    out: dict[str, np.ndarray] = {}
    for name, tensor in hf_state(model).items():
        if names[name] is None:
            raise RuntimeError(f"GGUF: no llama.cpp name for {name}")  # a bug, not bad input
        out[names[name]] = np.ascontiguousarray(_relayout(cfg, name, tensor.numpy(), True), dtype=np.float32)
    if gpt2 and "output.weight" not in out:  # llama.cpp's converter writes the tied head out for gpt2
        out["output.weight"] = out["token_embd.weight"]
    return out


def _tokenizer_fields(writer, tokenizer: Tokenizer, rows: int) -> None:
    """The vocabulary, one token per row of the embedding (``rows``): training rounds the model's vocabulary
    up to a multiple of 64, and llama.cpp (like transformers' GGUF loader) wants as many tokens as rows, so
    the rows no token reaches are named ``[PAD<i>]`` of type UNUSED, as llama.cpp's converter names them."""
    import gguf

    spec = tokenizer.to_json()
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or spec.get("normalizer"):
        # another pre-tokenizer (Llama 3's, Qwen's split regex) would split text otherwise in llama.cpp
        raise UserError("GGUF: only GPT-2's byte-level BPE tokenizers can be written (llama.cpp's 'gpt2' "
                        "vocabulary with the 'gpt-2' pre-tokenizer)")  # fmt: skip
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if tokenizer.vocab_size > rows:
        raise UserError(f"GGUF: the tokenizer has {tokenizer.vocab_size} tokens, the model only {rows} rows")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [gguf.TokenType.UNUSED] * rows
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)


def save_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: Path,
    dtype: str = "f32",
    name: str = "",
    chat_template: str | None = None,
) -> None:
    import gguf

    if dtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {dtype!r} is not supported; valid: {', '.join(GGUF_TYPES)}")
    cfg = model.cfg
    tensors = _gguf_tensors(model)
    gpt2 = style_of(cfg) == "gpt2"
    writer = gguf.GGUFWriter(str(path), "gpt2" if gpt2 else "llama")
    writer.add_name(name or "llm_training model")
    writer.add_context_length(cfg.max_seq_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(model.blocks[0].mlp.down.in_features)
    writer.add_head_count(cfg.num_attention_heads)
    if gpt2:
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.num_kv_heads or cfg.num_attention_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(
            cfg.hidden_size // cfg.num_attention_heads
        )  # (head_dim refused above)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(
        {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    )  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
    writer.add_string(META_CONFIG, model_config_json(cfg))
    _tokenizer_fields(writer, tokenizer, cfg.vocab_size)
    if chat_template:
        _chat_fields(writer, tokenizer, chat_template)
    for tensor_name, data in tensors.items():
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(tensor_name, data)
        elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            writer.add_tensor(tensor_name, data.astype(np.float16))
    if gpt2:
        _transformers_hint(cfg, model.blocks[0].mlp.down.in_features)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _chat_fields(writer, tokenizer: Tokenizer, chat_template: str) -> None:
    """The template, and the end-of-turn token the template's replies end with (when it is a markup token)."""
    from llm_training.data.chat_reply import ChatPrompts, template_for

    writer.add_chat_template(chat_template)
    chat = ChatPrompts(tokenizer, template_for(chat_template, tokenizer, "the chat template"))
    if chat.stop_ids:  # a markup token other than the end-of-text
        writer.add_eot_token_id(chat.end_of_turn)


def read_chat_template(path: str | Path) -> str | None:
    """The ``tokenizer.chat_template`` of a GGUF file, or None."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    except Exception as exc:  # the reader raises bare ValueErrors and struct errors on damaged files
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
    return None if field is None else str(field.contents())


def _transformers_hint(cfg: ModelConfig, inner: int) -> None:
    """The arguments transformers' GGUF loader needs for this GPT-2-style file (see the module docstring)."""
    args = [f"n_positions={cfg.max_seq_length}"] if cfg.max_seq_length != 1024 else []
    args += [f"n_inner={inner}"] if inner != 4 * cfg.hidden_size else []
    if args:
        log.info("GPT-2-style GGUF: transformers' GGUF loader reads it with from_pretrained(..., gguf_file=..., %s)",
                 ", ".join(args))  # fmt: skip


def load_gguf(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A GGUF file written by ``save_gguf`` as our model (dequantized to fp32), read with ``gguf``'s reader."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueErrors and struct errors on damaged files
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
    field = reader.fields.get(META_CONFIG)
    if field is None:
        raise UserError(f"{path}: GGUF without llm_training's config; only files this tool wrote can be read")
    cfg = model_config_from_json(field.contents(), str(path))
    names = {v: k for k, v in _name_map(cfg).items()}  # gguf name -> hf name
    hf: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue  # gpt2's duplicated tied head
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists dimensions fastest first
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        hf[hf_name] = torch.from_numpy(np.ascontiguousarray(_relayout(cfg, hf_name, data, False)))
    model = Transformer(cfg)
    load_state(model, hf, str(path))
    return model, _tokenizer_from(reader)


def _tokenizer_from(reader) -> Tokenizer | None:
    """The byte-level BPE back from ``tokenizer.ggml.*`` (vocabulary, merges, special tokens), without the
    UNUSED padding rows."""
    import gguf
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        return None
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    special = [t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL]
    vocab = {
        t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != gguf.TokenType.UNUSED
    }
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in special])
    if any(backend.token_to_id(t) != tokens.index(t) for t in special):
        raise UserError("GGUF: special tokens are not where the vocabulary puts them")

    def role(name: str) -> str | None:
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        return None if field is None else tokens[int(field.contents())]

    roles = SpecialTokens(role("eos"), role("bos"), role("padding"))  # a model's own tokens (Qwen's, ...)
    return Tokenizer(backend, roles if roles.eos is not None and roles != OURS else None)
