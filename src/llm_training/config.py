"""Typed configuration and its hierarchy.

Layers, lowest first: the dataclass defaults below < ``config/default.yaml`` (when present in the working
directory) < the ``--config`` file < environment variables (``LLM_TRAINING__SECTION__KEY``, plus ``LOG_LEVEL``)
< command-line arguments < runtime overrides (``Config.update``). Every layer is checked the same way: an
unknown key is named with the closest valid one, a wrong type or an impossible value says what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from llm_training.errors import ConfigError, quoted
from llm_training.limits import MAX_CONFIG_BYTES, InputLimitError, bad_text, json_loads, yaml_load

ENV_PREFIX = "LLM_TRAINING__"
DEFAULT_CONFIG_PATH = Path("config") / "default.yaml"
FINETUNE_METHODS = {"sft", "dpo", "simpo"}  # what llm-finetune --method offers: only methods that work
FINETUNE_MAX_LENGTH = 2048  # tokens a fine-tuning example at most, unless finetune.max_length says


@dataclass
class ModelConfig:
    """The decoder-only transformer."""

    model_type: str = (
        "llama"  # "gpt2" (learned positions, LayerNorm, GELU) or "llama" (RoPE, RMSNorm, SwiGLU)
    )
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention; None means as many as attention heads
    head_dim: int | None = None  # size of one head; None means hidden_size / num_attention_heads
    intermediate_size: int | None = None  # MLP width; None means 4x (gpt2) or about 8/3x (llama) hidden_size
    vocab_size: int | None = None  # None means the tokenizer's vocabulary size
    max_seq_length: int = 128  # context length in tokens
    dropout: float = 0.0
    bias: bool = False
    qkv_bias: bool | None = None  # biases on queries, keys and values only (Qwen2); None means as ``bias``
    tie_embeddings: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE as trained ("default"), or scaled for a longer context: "linear" (every frequency / rope_factor) or
    # "llama3" (Llama 3.1: low frequencies / rope_factor, high ones kept, a smooth blend between)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_context / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_context / this are kept
    rope_original_context: int = 8192  # llama3: the context the model was first trained at
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    # compute the output head and loss this many tokens at a time, with gradients computed chunk by chunk in
    # the forward pass, so the (tokens x vocabulary) logits never exist at once; 0: all at once
    loss_chunk_tokens: int = 0


@dataclass
class DataConfig:
    """Where text comes from and how it becomes tokens."""

    # raw text: a file, folder, glob, http(s)/s3 URL or hf://dataset; None means the built-in sample
    input_file: str | None = None
    data_dir: str | None = None  # already prepared data (train.json, validation.json, vocab.json)
    prepared_dir: str = "prepared_data"  # where the main job writes prepared data, relative to output_dir
    format: str | None = None  # txt, jsonl, json, csv or parquet; None: from the file extension
    text_field: str = "text"  # the field of a JSON/CSV/parquet record that holds its text
    vocab_size: int = 2048  # size of the byte-level BPE trained on the input
    # an existing tokenizer (tokenizer.json, vocab.json + merges.txt, encoder.json + vocab.bpe, or a folder)
    tokenizer: str | None = None
    # the BPE is trained on about this much of the training text; 0: 256 bytes a vocabulary entry, >= 4 MB
    tokenizer_sample_bytes: int = 0
    validation_fraction: float = 0.05
    max_seq_length: int = 2048  # recorded in the manifest; training windows use model.max_seq_length
    min_quality: float = 0.0  # drop documents whose quality score (0 to 1) is lower
    deduplicate: bool = False  # drop exact and near-duplicate documents
    dedup_threshold: float = 0.8  # word 5-gram Jaccard similarity that makes a near duplicate
    max_document_bytes: int = 16 * 2**20  # longer lines are skipped and reported
    on_error: str | None = None  # bad records: "skip" (count them) or "fail"; None: fail in the main job,
    # skip in llm-prepare-data and DataPreparationPipeline
    workers: int = 0  # processes for cleaning and scoring, threads for encoding; 0: one per core
    seed: int = 1234


@dataclass
class TrainingConfig:
    """The optimisation loop."""

    # sequences per micro-batch (per GPU when distributed); "auto": the largest that fits in GPU memory,
    # with gradient accumulation keeping global_batch_size sequences per optimizer step
    batch_size: int | str = 16
    global_batch_size: int | None = None  # for batch_size auto; None: 16 x gradient_accumulation_steps
    num_epochs: int | None = None  # passes over the data; None means 1, or unlimited under a time budget
    max_steps: int | None = None  # optimizer steps; training stops at whichever limit comes first
    max_time: str | float | None = None  # time budget, e.g. "70s", "15m", "2h"; the schedule fits it
    # tokens a training window; None: model.max_seq_length (shorter windows for a curriculum, say)
    seq_length: int | None = None
    learning_rate: float = 0.01
    min_lr_ratio: float = 0.0  # the decay ends at learning_rate * min_lr_ratio
    lr_schedule: str = "cosine"  # after warm-up: cosine, linear (to the floor) or constant
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    mixed_precision: str | bool = "auto"  # "auto", "bf16", "fp16", "no"; true means auto, false means no
    optimizer: str = "muon"  # "muon" (Muon on hidden matrices, AdamW on the rest) or "adamw"
    compile: str | bool = "auto"  # torch.compile: "auto" compiles on CUDA only
    eval_interval: int = 100  # optimizer steps between validation runs
    eval_batches: int = 20  # batches of validation windows per run; 0 means the whole validation set
    eval_at_start: bool = True  # validate before the first step, to show how far training moved the loss
    log_interval: int = 10
    checkpoint_interval: int = 500  # optimizer steps between checkpoints/model_step_N.pt
    seed: int = 42
    sample_prompt: str = ""  # prompt of the sample generated at the end; empty starts from end-of-text
    sample_tokens: int = 120
    sample_temperature: float = 0.8
    sample_top_k: int = 50

    @property
    def max_time_seconds(self) -> float | None:
        return parse_duration(self.max_time, "training.max_time")

    @property
    def epoch_limit(self) -> int | None:
        """Epochs to run: as set, else 1 without a time budget and unlimited with one."""
        if self.num_epochs is not None:
            return self.num_epochs
        return None if self.max_time is not None else 1


@dataclass
class CheckpointConfig:
    """What is saved in <output_dir>/checkpoints, how, and what is kept."""

    resume: str | None = None  # a checkpoint to continue from, or "auto": the newest valid one, if any
    keep_last: int | None = 3  # model_step_N.pt files kept (the newest); None keeps every one
    keep_best: int = 1  # also keep this many step checkpoints with the lowest validation loss
    # write in a background thread after a quick copy to host memory, so steps do not wait for the disk;
    # "auto": on CUDA
    async_save: str | bool = "auto"
    on_save_error: str = "stop"  # a save that fails (disk full...): "stop" training, or "continue" without it


@dataclass
class RecoveryConfig:
    """What the training loop does about failures (see train/recovery.py)."""

    enabled: bool = (
        True  # roll back on NaN or spiking loss, shrink the micro-batch on out-of-memory, retry I/O
    )
    max_retries: int = 3  # failures of one kind in a row before training stops with a report
    backup_freq: int = 0  # steps between rollback checkpoints; 0: training.checkpoint_interval
    loss_spike_factor: float = 3.0  # a logged loss this many times its recent average is a spike; 0: off
    backoff_seconds: float = 1.0  # first pause before retrying an I/O error; doubles each time


@dataclass
class ResourcesConfig:
    """Devices and processes."""

    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N", "mps"
    gpu_count: int | None = None  # None means every visible GPU; 0 trains on the CPU
    distributed: bool = False
    distributed_backend: str = "auto"  # "auto" (nccl on GPU, else gloo), "nccl", "gloo"
    # with several processes: "ddp" (a full replica on each, gradients all-reduced) or "fsdp" (FSDP2:
    # parameters, gradients and optimizer state sharded across processes)
    strategy: str = "ddp"
    timeout: str | float = "10m"  # how long a collective waits for a silent process before failing
    num_threads: int | None = None  # CPU threads for PyTorch; None keeps PyTorch's choice


@dataclass
class LoggingConfig:
    """What is written where."""

    level: str = "INFO"
    log_dir: str = "logs"  # relative to output_dir
    progress_bar: bool = True
    tensorboard: bool = (
        True  # event files under <output_dir>/<tensorboard_dir>/<run id> when tensorboard is installed
    )
    tensorboard_dir: str = "runs"
    debug: bool = False  # DEBUG log level and autograd anomaly detection (slow; for hunting NaNs)
    profile_steps: int = 0  # record this many training steps with torch.profiler (TensorBoard's profiler tab)


@dataclass
class VisionConfig:
    """The image encoder of a text-and-image model (used when the prepared data holds images): a patch
    transformer trained from scratch, or a pretrained one from a local Hugging Face folder (ViT, CLIP, ...).
    Its outputs, projected to the language model's width, come before the caption as prefix tokens."""

    image_size: int = 64  # the prepared images' size; pixels are normalised with mean and std
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    pretrained: str | None = None  # a local folder of a Hugging Face vision model instead of the above
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained model on chat or instruction data (``llm-finetune``): how examples become
    token ids and loss labels. The model's architecture comes from the pretrained model, not ``model.*``."""

    # sft: supervised fine-tuning on the assistant's turns; dpo, simpo: preference pairs (chosen/rejected)
    method: str = "sft"
    beta: float | None = None  # preference methods' inverse temperature; None: 0.1 for dpo, 2.0 for simpo
    gamma: float | None = None  # simpo's target reward margin; None: beta / 2 (the SimPO authors' ratio)
    # a built-in template (chatml), a .jinja file or a model folder; None: the model's own template
    chat_template: str | None = None
    train_on_prompt: bool = False  # train on every token, not only the assistant's replies
    max_length: int | None = None  # tokens an example at most; None: the model's context, at most 2048
    truncation: str = "truncate"  # longer examples: truncate (keep their start) or drop
    # pack examples into full windows (attention kept inside each example) instead of padding each batch
    packing: bool = False
    lora_rank: int = 0  # LoRA adapters of this rank on frozen weights (needs peft); 0: every weight trains
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.05
    lora_targets: str = "qkv,proj,up,down"  # the layers adapted, comma-separated (lm_head too)
    qlora: bool = False  # the adapted block layers' frozen weights in 4-bit NF4; implies LoRA (rank 16)
    template: str | None = None  # the template's Jinja text, recorded by llm-finetune so exports carry it
    reference: str | None = None  # dpo: fingerprint of the cached reference log-probs, set by llm-finetune


@dataclass
class Config:
    """The whole configuration of a run."""

    output_dir: str = "."  # run directory: checkpoints/, logs/, config.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """The whole configuration as nested dictionaries (what checkpoints and config.yaml hold)."""
        return dataclasses.asdict(self)

    def get(self, section: str, key: str) -> Any:
        """A value by its dotted name, e.g. cfg.get('training.batch_size')."""
        return getattr(_section(self, section, "runtime"), key)

    def update(self, section: str, key: str, value: Any, source: str = "runtime override") -> None:
        """Apply a runtime override (the highest layer), checked like every other layer."""
        apply_layer(self, {section: {key: value}}, source)
        validate(self)


# --------------------------------------------------------------------------------------------- durations

MAX_DURATION = 10 * 365 * 86400.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s|ms)?")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def parse_duration(value: str | float | None, key: str = "duration") -> float | None:
    """'70s', '15m', '2h', '1h30m' or a number of seconds -> seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as '70s', '15m' or '2h', got {quoted(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = list(_DURATION_PART.finditer(text))
        if not text or "".join(p.group(0) for p in parts) != text:
            raise ConfigError(f"{key}: expected a duration such as '70s', '15m' or '2h', got {quoted(value)}")
        seconds = sum(float(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: the time budget must be positive and finite, got {quoted(value)}")
    if seconds > MAX_DURATION:
        raise ConfigError(f"{key}: at most {MAX_DURATION:,.0f} seconds (10 years), got {quoted(value)}")
    return seconds


# ------------------------------------------------------------------------------------------------ layers

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "output_dir"}


def _section(cfg: Config, name: str, source: str):
    if name not in SECTIONS:
        raise ConfigError(f"{source}: unknown section '{name}'{_suggest(name, [*SECTIONS, 'output_dir'])}")
    return getattr(cfg, name)


def _clip(name: Any) -> str:
    """A key as written by the user, short enough to quote."""
    text = str(name) if isinstance(name, str) else quoted(name)
    return quoted(text[:100])[1:-1] if len(text) > 100 or bad_text(text) else text


def _suggest(name: str, choices: list[str], section: str = "") -> str:
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid: {', '.join(prefix + c for c in sorted(choices))})"


def _field_types(obj) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _allowed(tp) -> tuple[tuple[type, ...], bool]:
    """The concrete types a field accepts, and whether None is allowed."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = typing.get_args(tp)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (tp,), False


MAX_TEXT_CHARS = 1_000_000  # a text value (a path, a prompt...)
MAX_INT = 1 << 62  # beyond any sensible size or count; RANGES holds the real bounds of each key


def _check_text(value: str, key: str, source: str) -> None:
    why = bad_text(value) or ("a NUL character" if "\0" in value else None)
    if why is None and len(value) > MAX_TEXT_CHARS:
        why = f"{len(value):,} characters (at most {MAX_TEXT_CHARS:,})"
    if why is not None:
        raise ConfigError(f"{source}: '{key}' cannot be used as text: {why}")


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    kinds, optional = _allowed(tp)
    if isinstance(value, str):
        _check_text(value, key, source)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' cannot be empty; expected {_type_names(kinds)}")
    if list in kinds:  # a YAML list, or "0.5,0.5,0.5" from a flag or the environment
        items = value.strip("[] ").split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            parsed = [_parse_scalar(i.strip()) if isinstance(i, str) else i for i in items]
            if all(_is_number(x) for x in parsed):
                return [float(x) for x in parsed]
        raise ConfigError(f"{source}: '{key}' expects a list of numbers, got {quoted(value)}")
    if isinstance(value, str) and str not in kinds:
        value = _parse_scalar(value)  # environment variables and flags arrive as text
    elif isinstance(value, str) and int in kinds:  # an integer or a word such as "auto"
        parsed = _parse_scalar(value)
        value = parsed if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else value
    if isinstance(value, float) and int in kinds and float not in kinds and value.is_integer():
        value = int(value) if abs(value) <= MAX_INT else value  # 1e6 steps, '2.048e3' tokens
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {quoted(value)}")
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int) and int in kinds:
        if abs(value) > MAX_INT:
            raise ConfigError(f"{source}: '{key}' is out of range, got {quoted(value)}")
        return value
    elif isinstance(value, (int, float)) and float in kinds:
        return float(value)
    elif isinstance(value, str) and str in kinds:
        return value
    raise ConfigError(
        f"{source}: '{key}' expects {_type_names(kinds)}, got {quoted(value)} ({type(value).__name__})"
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_scalar(text: str) -> Any:
    """Text from a flag, a variable or YAML (which reads '6e-4' as a string) -> int, float, bool or text."""
    import yaml

    for number in (int, float):
        try:
            return number(text.strip())
        except ValueError:  # also an integer of more than 4,300 digits
            pass
    try:
        return yaml_load(text)
    except (yaml.YAMLError, InputLimitError):
        return text


def _type_names(kinds) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "text"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def apply_layer(cfg: Config, layer: dict[str, Any], source: str) -> None:
    """Merge one nested mapping into ``cfg``, checking every key and type."""
    if not isinstance(layer, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (model, data, training, ...), got {type(layer).__name__}"
        )
    for name, values in layer.items():
        if name == "output_dir":
            cfg.output_dir = _coerce(values, str, "output_dir", source)
            continue
        section = _section(cfg, _clip(name), source)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {quoted(values)}")
        hints = _field_types(section)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: unknown key '{name}.{_clip(key)}'{_suggest(_clip(key), list(hints), name)}"
                )
            setattr(section, key, _coerce(value, hints[key], f"{name}.{key}", source))


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass a YAML file such as config/default.yaml)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: {size:,} bytes is too large for a config file (at most {MAX_CONFIG_BYTES:,})"
        )
    try:
        data = yaml_load(path.read_bytes().decode("utf-8-sig"))  # a byte-order mark is not part of the text
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except InputLimitError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    return data or {}


def env_layer(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """``LLM_TRAINING__TRAINING__LEARNING_RATE=3e-4`` -> {'training': {'learning_rate': '3e-4'}}; ``LOG_LEVEL``."""
    layer: dict[str, dict[str, Any]] = {}
    if environ.get("LOG_LEVEL"):
        layer.setdefault("logging", {})["level"] = environ["LOG_LEVEL"]
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts == ["output_dir"]:
            layer["output_dir"] = value
        elif len(parts) == 2 and all(parts):
            layer.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}SECTION__KEY, e.g. {ENV_PREFIX}TRAINING__BATCH_SIZE"
            )
    return layer


def dotted_to_nested(values: dict[str, Any]) -> dict[str, Any]:
    """{'training.batch_size': 8, 'output_dir': 'x'} -> {'training': {'batch_size': 8}, 'output_dir': 'x'}."""
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        if value is None:
            continue
        if "." not in dotted:
            nested[dotted] = value
            continue
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return nested


def load_config(
    config_file: str | Path | None = None,
    *,
    cli: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
    preset: dict[str, Any] | None = None,
    default_file: str | Path | None = DEFAULT_CONFIG_PATH,
    runtime: bool = True,
) -> Config:
    """Resolve the hierarchy into a checked ``Config``.

    ``cli`` and ``overrides`` take dotted keys (``{'training.batch_size': 8}``) or nested mappings; ``None``
    values are skipped so unset flags do not mask lower layers. ``preset`` sits just above the hard-coded
    defaults (the main job uses it for its quick-start budget). ``runtime``: include the runtime overrides
    (``ConfigurationAdaptor.update_config``) at the top.
    """
    cfg = Config()
    if preset:
        apply_layer(cfg, dotted_to_nested(preset), "built-in preset")
    if default_file is not None and Path(default_file).is_file():
        same = config_file is not None and Path(config_file).resolve() == Path(default_file).resolve()
        if not same:
            apply_layer(cfg, read_yaml(default_file), str(default_file))
    if config_file is not None:
        apply_layer(cfg, read_yaml(config_file), str(config_file))
    apply_layer(cfg, env_layer(os.environ if environ is None else environ), "environment")
    if cli:
        apply_layer(cfg, dotted_to_nested(cli), "command line")
    from llm_training.overrides import RUNTIME

    if overrides:
        apply_layer(cfg, dotted_to_nested(overrides), "runtime override")
    live = RUNTIME.snapshot()[1] if runtime else {}  # ConfigurationAdaptor.update_config's values
    if live:
        apply_layer(cfg, dotted_to_nested(live), "runtime override")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    cfg = Config()
    apply_layer(cfg, data, source)
    validate(cfg)
    return cfg


def model_config_json(cfg: ModelConfig) -> str:
    """The model config as the JSON that exports carry (ONNX metadata, TorchScript and GGUF extras, ...)."""
    import json

    return json.dumps(dataclasses.asdict(cfg))


def model_config_from_json(text: str, where: str) -> ModelConfig:
    """The model config an export carries, checked like any config (``where`` names the file in errors)."""

    try:
        data = json_loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: its model config is not valid JSON ({exc})") from None
    return config_from_dict({"model": data}, where).model


# ------------------------------------------------------------------------------------------- validation

MODEL_TYPES = {"gpt2": "gpt2", "transformer": "gpt2", "gpt": "gpt2", "llama": "llama"}
ROPE_TYPES = {"default", "linear", "llama3"}
PRECISIONS = {"auto", "bf16", "fp16", "no", "fp32", "true", "false"}
BACKENDS = {"auto", "nccl", "gloo"}
LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


_B = 10**12  # steps, intervals: beyond any run
# every numeric key's allowed range (inclusive), checked after the rules below; the memory check before a
# model is built (model/footprint.py) says which sizes inside these ranges fit the machine
RANGES: dict[str, tuple[float, float]] = {
    "model.num_layers": (1, 1 << 16), "model.hidden_size": (1, 1 << 20), "model.num_attention_heads": (1, 1 << 16),
    "model.num_kv_heads": (1, 1 << 16), "model.intermediate_size": (1, 1 << 24), "model.vocab_size": (2, 1 << 31),
    "model.max_seq_length": (1, 1 << 24), "model.dropout": (0, 1), "model.norm_eps": (1e-12, 1),
    "model.rope_theta": (1, 1e12), "model.init_std": (1e-8, 10), "model.loss_chunk_tokens": (0, 1 << 30),
    "model.head_dim": (1, 1 << 16), "model.rope_factor": (1e-3, 1e6), "model.rope_low_freq_factor": (1e-6, 1e6),
    "model.rope_high_freq_factor": (1e-6, 1e6), "model.rope_original_context": (1, 1 << 24),
    "data.vocab_size": (260, 1 << 24), "data.tokenizer_sample_bytes": (0, 1 << 40),
    "data.validation_fraction": (0, 1), "data.max_seq_length": (1, 1 << 24), "data.min_quality": (0, 1),
    "data.dedup_threshold": (0, 1), "data.max_document_bytes": (1, 1 << 31), "data.workers": (0, 1024),
    "data.seed": (0, 2**32 - 1),
    "training.batch_size": (1, 1 << 20), "training.global_batch_size": (1, 1 << 24),
    "training.num_epochs": (1, 1_000_000), "training.max_steps": (1, _B), "training.seq_length": (1, 1 << 24),
    "training.learning_rate": (0, 100), "training.min_lr_ratio": (0, 1), "training.warmup_steps": (0, _B),
    "training.weight_decay": (0, 100), "training.beta1": (0, 1), "training.beta2": (0, 1),
    "training.grad_clip": (0, 1e9), "training.gradient_accumulation_steps": (1, 1 << 20),
    "training.eval_interval": (1, _B), "training.eval_batches": (0, 1 << 30), "training.log_interval": (1, _B),
    "training.checkpoint_interval": (1, _B), "training.seed": (0, 2**32 - 1),
    "training.sample_tokens": (0, 100_000), "training.sample_temperature": (0, 100),
    "training.sample_top_k": (0, 1 << 31),
    "checkpoint.keep_last": (0, 1_000_000), "checkpoint.keep_best": (0, 1_000_000),
    "recovery.max_retries": (0, 1000), "recovery.backup_freq": (0, _B), "recovery.loss_spike_factor": (0, 1e6),
    "recovery.backoff_seconds": (0, 3600),
    "resources.gpu_count": (0, 4096), "resources.num_threads": (1, 4096), "logging.profile_steps": (0, 100_000),
    "vision.image_size": (1, 4096), "vision.patch_size": (1, 4096), "vision.hidden_size": (1, 1 << 16),
    "vision.num_layers": (1, 1024), "vision.num_attention_heads": (1, 1024), "finetune.max_length": (2, 1 << 24),
    "finetune.lora_rank": (0, 1 << 16), "finetune.lora_alpha": (0, 1e6), "finetune.lora_dropout": (0, 1),
    "finetune.beta": (1e-6, 1e3), "finetune.gamma": (0, 1e3),
}  # fmt: skip


def _check_ranges(cfg: Config) -> None:
    for dotted, (low, high) in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _require(low <= value <= high, f"{dotted} must be from {low:,} to {high:,}, got {quoted(value)}")
    for value in (*cfg.vision.mean, *cfg.vision.std):
        _require(
            math.isfinite(value) and abs(value) <= 1e6, "vision.mean and vision.std must be finite numbers"
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(value: Any, allowed: set[str], key: str) -> None:
    ok = str(value).lower() in {a.lower() for a in allowed}
    _require(ok, f"{key}: {quoted(value)} is not one of {', '.join(sorted(allowed))}")


def finetune_max_length(cfg: Config) -> int:
    """Tokens a fine-tuning example at most: ``finetune.max_length``, else the model's context up to
    ``FINETUNE_MAX_LENGTH`` (never more than the context)."""
    return min(cfg.finetune.max_length or FINETUNE_MAX_LENGTH, cfg.model.max_seq_length)


def validate(cfg: Config) -> None:
    """Reject impossible values with the key and what is allowed."""
    m, d, t, r = cfg.model, cfg.data, cfg.training, cfg.resources
    _one_of(m.model_type, set(MODEL_TYPES), "model.model_type")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "max_seq_length"):
        _require(getattr(m, key) >= 1, f"model.{key} must be at least 1, got {getattr(m, key)}")
    _require(
        m.head_dim is not None or m.hidden_size % m.num_attention_heads == 0,
        f"model.num_attention_heads ({m.num_attention_heads}) must divide model.hidden_size ({m.hidden_size})",
    )
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    if MODEL_TYPES[m.model_type.lower()] == "llama":
        what = "model.head_dim" if m.head_dim is not None else "model.hidden_size / model.num_attention_heads"
        _require(head_dim % 2 == 0, f"model: RoPE needs an even head size ({what}), got {head_dim}")
    _one_of(m.rope_type, ROPE_TYPES, "model.rope_type")
    _require(
        m.rope_type.lower() != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor,
        "model.rope_high_freq_factor must be larger than model.rope_low_freq_factor",
    )
    if m.num_kv_heads is not None:
        _require(
            m.num_kv_heads >= 1 and m.num_attention_heads % m.num_kv_heads == 0,
            f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_attention_heads ({m.num_attention_heads})",
        )
    _require(
        m.intermediate_size is None or m.intermediate_size >= 1, "model.intermediate_size must be at least 1"
    )
    _require(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size must be at least 2")
    _require(m.loss_chunk_tokens >= 0, "model.loss_chunk_tokens cannot be negative (0: no chunking)")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(
        m.norm_eps > 0 and m.init_std > 0 and m.rope_theta > 0,
        "model.norm_eps, init_std and rope_theta must be positive",
    )

    _require(
        d.vocab_size >= 260,
        f"data.vocab_size must be at least 260 (256 bytes plus special tokens), got {d.vocab_size}",
    )
    _require(
        0.0 < d.validation_fraction < 1.0,
        f"data.validation_fraction must be between 0 and 1, got {d.validation_fraction}",
    )
    _require(d.max_seq_length >= 1, "data.max_seq_length must be at least 1")
    _require(bool(d.text_field), "data.text_field cannot be empty")
    if d.format is not None:
        _one_of(d.format, {"txt", "jsonl", "json", "csv", "parquet"}, "data.format")
    if d.on_error is not None:
        _one_of(d.on_error, {"skip", "fail"}, "data.on_error")
    _require(0.0 <= d.min_quality <= 1.0, f"data.min_quality must be in [0, 1], got {d.min_quality}")
    _require(
        0.0 < d.dedup_threshold <= 1.0, f"data.dedup_threshold must be in (0, 1], got {d.dedup_threshold}"
    )
    _require(d.max_document_bytes >= 1, "data.max_document_bytes must be at least 1")
    _require(d.tokenizer_sample_bytes >= 0, "data.tokenizer_sample_bytes cannot be negative (0: automatic)")
    _require(d.workers >= 0, "data.workers cannot be negative (0 means one per core)")

    _require(
        t.learning_rate > 0 and math.isfinite(t.learning_rate),
        f"training.learning_rate must be positive, got {t.learning_rate}",
    )
    if isinstance(t.batch_size, str):
        _require(
            t.batch_size.lower() == "auto",
            f"'training.batch_size' expects an integer or 'auto', got {quoted(t.batch_size)}",
        )
    else:
        _require(t.batch_size >= 1, f"training.batch_size must be at least 1, got {t.batch_size}")
    _require(
        t.global_batch_size is None or t.global_batch_size >= 1,
        "training.global_batch_size must be at least 1",
    )
    for key in (
        "gradient_accumulation_steps",
        "log_interval",
        "eval_interval",
        "checkpoint_interval",
    ):
        _require(getattr(t, key) >= 1, f"training.{key} must be at least 1, got {getattr(t, key)}")
    for key in ("max_steps", "num_epochs"):
        value = getattr(t, key)
        _require(value is None or value >= 1, f"training.{key} must be at least 1, got {value}")
    t.max_time_seconds  # noqa: B018 - parses and raises on a bad budget
    _one_of(t.lr_schedule, {"cosine", "linear", "constant"}, "training.lr_schedule")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"training.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.warmup_steps >= 0, "training.warmup_steps cannot be negative")
    v = cfg.vision
    _require(v.patch_size >= 1 and v.image_size % v.patch_size == 0,
             f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size ({v.patch_size})")  # fmt: skip
    _require(v.num_attention_heads >= 1 and v.hidden_size % v.num_attention_heads == 0,
             "vision.hidden_size must be a multiple of vision.num_attention_heads")  # fmt: skip
    _require(
        len(v.mean) == 3 and len(v.std) == 3 and min(v.std) > 0, "vision.mean and vision.std need 3 values"
    )
    _require(
        t.seq_length is None or 1 <= t.seq_length <= cfg.model.max_seq_length,
        f"training.seq_length must be 1 to model.max_seq_length ({cfg.model.max_seq_length}), got {t.seq_length}",
    )
    _require(t.weight_decay >= 0, "training.weight_decay cannot be negative")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "training.beta1 and beta2 must be in [0, 1)")
    _require(t.grad_clip >= 0, "training.grad_clip cannot be negative (0 disables clipping)")
    _require(
        t.eval_batches >= 0 and t.sample_tokens >= 0,
        "training.eval_batches and sample_tokens cannot be negative",
    )
    _require(
        t.sample_temperature >= 0 and t.sample_top_k >= 0,
        "training.sample_temperature and sample_top_k cannot be negative",
    )
    if not isinstance(t.mixed_precision, bool):
        _one_of(t.mixed_precision, PRECISIONS, "training.mixed_precision")
    if not isinstance(t.compile, bool):
        _one_of(t.compile, {"auto", "true", "false", "yes", "no"}, "training.compile")
    _one_of(t.optimizer, {"adamw", "muon"}, "training.optimizer")

    c, rec = cfg.checkpoint, cfg.recovery
    _require(
        c.keep_last is None or c.keep_last >= 0, "checkpoint.keep_last cannot be negative (null keeps all)"
    )
    _require(c.keep_best >= 0, "checkpoint.keep_best cannot be negative")
    if not isinstance(c.async_save, bool):
        _one_of(c.async_save, {"auto", "true", "false", "yes", "no"}, "checkpoint.async_save")
    _one_of(c.on_save_error, {"stop", "continue"}, "checkpoint.on_save_error")
    _require(rec.max_retries >= 0, "recovery.max_retries cannot be negative")
    _require(
        rec.backup_freq >= 0, "recovery.backup_freq cannot be negative (0: training.checkpoint_interval)"
    )
    _require(
        rec.loss_spike_factor == 0 or rec.loss_spike_factor > 1,
        f"recovery.loss_spike_factor must be above 1, or 0 to turn spike detection off, got {rec.loss_spike_factor}",
    )
    _require(rec.backoff_seconds >= 0, "recovery.backoff_seconds cannot be negative")

    _require(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", r.device) is not None,
        f"resources.device: {quoted(r.device)} is not one of auto, cpu, cuda, cuda:N, mps",
    )
    _require(r.gpu_count is None or r.gpu_count >= 0, "resources.gpu_count cannot be negative")
    _require(r.num_threads is None or r.num_threads >= 1, "resources.num_threads must be at least 1")
    _one_of(r.distributed_backend, BACKENDS, "resources.distributed_backend")
    _one_of(r.strategy, {"ddp", "fsdp"}, "resources.strategy")
    _require((parse_duration(r.timeout, "resources.timeout") or 0) > 0, "resources.timeout must be positive")
    _one_of(cfg.logging.level.upper(), LOG_LEVELS, "logging.level")
    _require(cfg.logging.profile_steps >= 0, "logging.profile_steps cannot be negative")
    f = cfg.finetune
    _one_of(f.method, FINETUNE_METHODS, "finetune.method")
    _require(
        f.beta is None or f.method != "sft",
        "finetune.beta is for --method dpo or simpo; leave it unset for sft",
    )
    _require(
        f.gamma is None or f.method == "simpo",
        "finetune.gamma is SimPO's margin; leave it unset unless --method simpo",
    )
    _one_of(f.truncation, {"truncate", "drop"}, "finetune.truncation")
    _require(not (f.qlora and r.strategy == "fsdp"),
             "finetune.qlora: FSDP does not shard 4-bit weights; use resources.strategy ddp")  # fmt: skip
    _check_ranges(cfg)


def read_config_mapping(path: Path) -> dict | None:
    """A YAML file of a run (its ``config.yaml``) read within the bounds of a config; None when it is
    missing, unreadable, too large, malformed or not a mapping (a reader that can do without it)."""
    import yaml

    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = yaml_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # InputLimitError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def is_resolved_config(path: Path) -> bool:
    """Whether ``path`` holds a configuration as ``save_config`` writes it (every section): a run's own
    ``config.yaml``, which a new run in that folder may replace, unlike a config file of the user's."""
    data = read_config_mapping(path)
    return data is not None and set(Config().to_dict()) <= set(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration (YAML) so a run records exactly what it used."""
    import yaml

    from llm_training.fileio import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
