"""A local Hugging Face model folder as our model, with its own tokenizer.

Families (``FAMILIES``: each ``model_type`` and the defaults ``transformers`` gives keys a config.json leaves
out): ``gpt2``, and the Llama layout: ``llama`` (1 to 3.x: plain, ``linear``, ``dynamic`` and ``llama3`` RoPE),
``mistral`` and ``ministral``, ``qwen2`` (Qwen2 and 2.5: biases on queries, keys and values only) and ``qwen3``
(RMSNorm over each query and key head, a head size of its own). A sliding window shorter than the context
becomes the context, where it computes the same. A config field that changes the computation in a way our
model cannot follow is refused in one line naming the key and what is supported, never ignored.

Weights are safetensors only (``pytorch_model.bin`` can run code): ``model.safetensors``, or the shards that
``model.safetensors.index.json`` lists. Each tensor is mapped from its file when its turn comes and copied
(as float32) into a new tensor of the model, which is built on the meta device and then given those: memory
holds one model and the tensor being copied, never every file's contents beside a model
(``bench/hf_import_memory.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llm_training.config import Config, ModelConfig, validate
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import ConfigError, UserError
from llm_training.export.hf_weights import state_from_hf
from llm_training.limits import json_loads
from llm_training.model.transformer import Transformer

log = logging.getLogger("llm_training.export")

# transformers' defaults for the keys a config.json may leave out (GPT2Config, LlamaConfig, ...)
_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                  "add_cross_attention": False, "tie_word_embeddings": True}  # fmt: skip
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "attention_bias": False, "mlp_bias": False, "head_dim": None, "sliding_window": None}  # fmt: skip
_QWEN2_DEFAULTS = {**_LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                   "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                   "max_window_layers": 28}  # fmt: skip
_MISTRAL_DEFAULTS = {**_LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                     "max_position_embeddings": 131072, "sliding_window": 4096}  # fmt: skip
FAMILIES = {
    "gpt2": _GPT2_DEFAULTS,
    "llama": _LLAMA_DEFAULTS,
    "mistral": _MISTRAL_DEFAULTS,
    "ministral": _MISTRAL_DEFAULTS,  # Mistral whose layer_types say which layers slide
    "qwen2": _QWEN2_DEFAULTS,
    "qwen3": {**_QWEN2_DEFAULTS, "head_dim": 128},
}
_NULLABLE = {"sliding_window"}  # keys whose null means something (no window), not "the default"
_ROPE_TYPES = "the RoPE types computed here: default, linear, dynamic, llama3"
_WHOLE_HEAD = "RoPE here rotates the whole head"


def read_json_object(path: Path) -> dict:
    """A JSON file's object ({} for another JSON value); unreadable or invalid JSON is one line naming it."""
    try:
        data = json_loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _refuse(where: str, key: str, value, supported: str) -> UserError:
    return UserError(f"{where}: {key} = {json.dumps(value)} cannot be imported: {supported}")


def _require_fields(c: dict, where: str, checks: list[tuple[str, bool, str]]) -> None:
    """(key, whether its value is one our model computes, what is supported) -> the first refusal."""
    for key, ok, supported in checks:
        if not ok:
            raise _refuse(where, key, c.get(key), supported)


class Shards(Mapping):
    """``transformers``' tensor name -> tensor, read from its safetensors file only when asked for: a view of
    the file mapped for that tensor alone, which ``state_from_hf`` copies into the model and drops (a model
    left on the mapping would be tied to the file: one rewritten in place would change or crash it)."""

    def __init__(self, where: dict[str, tuple[Path, str]]) -> None:
        self.where = where  # name -> (file, name in the file)
        self.extra: dict[str, torch.Tensor] = {}  # tensors the files lack but the model has: zero biases

    @classmethod
    def of(cls, folder: Path) -> Shards:
        from safetensors import SafetensorError, safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise UserError(f"{index}: no weight_map of tensor names to file names")
            for file in set(weight_map.values()):  # files of this folder only: no path in a name
                if Path(file).name != file or not (folder / file).is_file():
                    raise UserError(f"{index}: weight_map names {file!r}, which is not a file in {folder}")
            return cls({name: (folder / file, name) for name, file in weight_map.items()})
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
        files = files or sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{folder}: no .safetensors weights (pytorch_model.bin is not read: it can run code)"
            )
        where = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    where.update({name: (file, name) for name in handle.keys()})  # noqa: SIM118 (not a dict)
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
        return cls(where)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        from safetensors import SafetensorError, safe_open

        file, stored = self.where[name]
        try:
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(stored)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{file}: cannot read {stored} ({exc})") from None

    def __contains__(self, name: object) -> bool:
        return name in self.extra or name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter([*self.where, *self.extra])

    def __len__(self) -> int:
        return len(self.where) + len(self.extra)

    def add_prefix(self, prefix: str) -> None:
        """Names saved from the base model (``GPT2Model``, ``LlamaModel``: no head) under the full model's."""
        if not any(name.startswith(prefix) for name in self.where):
            self.where = {(n if n.startswith("lm_head.") else prefix + n): v for n, v in self.where.items()}


def load_hf(folder: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """A Hugging Face folder (ours or another's) as our model, and its tokenizer if it has a
    ``tokenizer.json`` (with its own special tokens when ``tokenizer_config.json`` names them)."""
    folder = Path(folder)
    cfg, weights = hf_architecture(folder)
    with torch.device("meta"):
        shapes = {name: value.shape for name, value in Transformer(cfg).state_dict().items()}
    model = Transformer.from_state(cfg, state_from_hf(cfg, shapes, weights, str(folder)))
    tokenizer = Tokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    return model, tokenizer


def hf_architecture(folder: Path) -> tuple[ModelConfig, Shards]:
    """The model config of a Hugging Face folder, with its weights' index (read lazily), after every check
    that needs no weight (GPT-2's small biases are read): what a launcher's parent checks before its
    workers each load the model."""
    from llm_training.model.footprint import check_fits

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    where = str(config_path)
    c = read_json_object(config_path)
    kind = c.get("model_type")
    if kind not in FAMILIES:
        raise _refuse(where, "model_type", kind, f"the model types imported here: {', '.join(FAMILIES)}")
    if c.get("quantization_config"):
        raise UserError(f"{where}: quantization_config is set: quantized weights cannot be imported; "
                        "use the model's fp32, fp16 or bf16 weights")  # fmt: skip
    c = {**FAMILIES[kind], **{k: v for k, v in c.items() if v is not None or k in _NULLABLE}}
    weights = Shards.of(folder)
    cfg = _gpt2_config(c, weights, where) if kind == "gpt2" else _llama_config(kind, c, weights, where)
    try:
        validate(Config(model=cfg))
    except ConfigError as exc:
        raise UserError(f"{where}: {exc}") from None
    check_fits(cfg)  # one line saying what fits, before a byte is read
    return cfg, weights


def _gpt2_config(c: dict, weights: Shards, where: str) -> ModelConfig:
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
    weights.add_prefix("transformer.")
    # GPT2LMHeadModel always has biases; a model trained without them (ours, bias=False) has them all zero.
    # (Old files also store the causal mask as h.<i>.attn.bias: not a weight.) Biases are small: read them
    biases = [n for n in weights if n.endswith(".bias") and n.split(".")[-2] != "attn"]
    has_bias = any(weights[name].abs().sum() > 0 for name in biases)
    width = c["n_embd"]
    return ModelConfig(model_type="gpt2", num_layers=c["n_layer"], hidden_size=width, num_attention_heads=c["n_head"],
                       vocab_size=c["vocab_size"], max_seq_length=c["n_positions"],
                       intermediate_size=c["n_inner"] or 4 * width, bias=has_bias,
                       tie_embeddings=c["tie_word_embeddings"], norm_eps=c["layer_norm_epsilon"])  # fmt: skip


def _llama_config(kind: str, c: dict, weights: Shards, where: str) -> ModelConfig:
    _require_fields(c, where, [
        ("hidden_act", c["hidden_act"] in ("silu", "swish"), "the Llama style here computes silu (SwiGLU)"),
        ("layer_types", set(c.get("layer_types") or ()) <= {"full_attention", "sliding_attention"},
         "layers of full or sliding-window attention"),
    ])  # fmt: skip
    rope = _rope(c, where)
    context = _context(kind, c)
    weights.add_prefix("model.")
    if kind == "qwen2":  # biases on q_proj, k_proj and v_proj, none on o_proj or the MLP
        bias, qkv_bias = False, True
    else:  # Llama's attention_bias covers o_proj too: our bias switch, with zeros where mlp_bias is off
        attention, mlp = bool(c["attention_bias"]), bool(c["mlp_bias"])
        bias, qkv_bias = attention or mlp, (None if attention == (attention or mlp) else attention)
        _zero_biases(c, weights, o_proj=bias and not attention, mlp=bias and not mlp)
    return ModelConfig(model_type="llama", num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                       num_attention_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                       head_dim=c["head_dim"], intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                       max_seq_length=context, bias=bias, qkv_bias=qkv_bias, qk_norm=kind == "qwen3",
                       tie_embeddings=c["tie_word_embeddings"], norm_eps=c["rms_norm_eps"], **rope)  # fmt: skip


def _zero_biases(c: dict, weights: Shards, o_proj: bool, mlp: bool) -> None:
    """Biases the file lacks on a side our one ``bias`` switch turns on: zeros compute the same."""
    width, inner = c["hidden_size"], c["intermediate_size"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sizes = {"self_attn.o_proj": width} if o_proj else {}
        sizes |= {"mlp.gate_proj": inner, "mlp.up_proj": inner, "mlp.down_proj": width} if mlp else {}
        weights.extra.update({f"{p}{name}.bias": torch.zeros(size) for name, size in sizes.items()})


def _context(kind: str, c: dict) -> int:
    """The context: max_position_embeddings, or the sliding window when one applies and is shorter. Within
    the window, sliding-window attention is full causal attention: our model computes it exactly for every
    sequence it accepts."""
    context, window = c["max_position_embeddings"], c.get("sliding_window")
    if kind.startswith("qwen"):
        window = window if c["use_sliding_window"] else None
    elif kind not in ("mistral", "ministral"):
        window = None
    if kind == "mistral":  # every layer slides, whatever layer_types says
        layers = ["sliding_attention"]
    else:  # as transformers fills layer_types when the file has none: Qwen's first max_window_layers are full
        full = c["max_window_layers"] if kind.startswith("qwen") else 0
        n = c["num_hidden_layers"]
        layers = c.get("layer_types") or [
            "sliding_attention" if i >= full else "full_attention" for i in range(n)
        ]
    if window is None or "sliding_attention" not in layers or window >= context:
        return context
    log.warning("sliding_window = %d: imported with a context of %d tokens (max_position_embeddings is %d), "
                "where sliding-window attention is causal attention", window, window, context)  # fmt: skip
    return int(window)


def _rope(c: dict, where: str) -> dict:
    """RoPE's ModelConfig keys from ``rope_parameters`` (transformers 5) or ``rope_scaling`` and a top-level
    ``rope_theta`` (4; a file may hold both: the scaled one counts). ``dynamic`` is the plain RoPE up to
    max_position_embeddings (it only rescales past it, which is our context); yarn, longrope and partial
    rotation are refused."""
    specs = {key: c.get(key) or {} for key in ("rope_parameters", "rope_scaling")}
    for key, spec in specs.items():
        if not isinstance(spec, dict):
            raise _refuse(where, key, spec, _ROPE_TYPES)
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(where, f"{key}.partial_rotary_factor", spec["partial_rotary_factor"], _WHOLE_HEAD)
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(where, "partial_rotary_factor", c["partial_rotary_factor"], _WHOLE_HEAD)

    def kind_of(spec: dict) -> str:
        return spec.get("rope_type", spec.get("type", "default"))  # transformers 4 wrote "type" too

    key = next((k for k, spec in specs.items() if kind_of(spec) != "default"), "rope_parameters")
    spec, kind = specs[key], kind_of(specs[key])
    field = "rope_type" if "rope_type" in spec else "type"
    for other, value in specs.items():
        if kind_of(value) not in ("default", kind):
            raise _refuse(where, other, value, f"one RoPE type ({key} says {kind})")

    def number(name: str, default=None) -> float:
        value = spec.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise _refuse(where, f"{key}.{name}", value, f"{kind} RoPE needs a positive number here")
        return float(value)

    theta = spec.get("rope_theta") or specs["rope_parameters"].get("rope_theta") or c.get("rope_theta")
    keys = {"rope_theta": float(theta or 10000.0)}
    if kind in ("default", "dynamic"):
        return keys
    if kind == "linear":
        return keys | {"rope_type": "linear", "rope_factor": number("factor")}
    if kind == "llama3":
        return keys | {"rope_type": "llama3", "rope_factor": number("factor"),
                       "rope_low_freq_factor": number("low_freq_factor"),
                       "rope_high_freq_factor": number("high_freq_factor"),
                       "rope_original_context": int(number("original_max_position_embeddings",
                                                           c["max_position_embeddings"]))}  # fmt: skip
    raise _refuse(where, f"{key}.{field}", kind, _ROPE_TYPES)
