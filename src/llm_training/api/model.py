"""``ModelInitializer``: the usage guide's model construction step, over the same ``Transformer`` the trainer
builds."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_training.config import load_config
from llm_training.errors import ConfigError

# every model built or trained through the API, by model_id (TrainingOrchestratorInput names them)
MODELS: dict[str, ModelInitializerOutput] = {}


@dataclass
class ModelInitializerInput:
    """``architecture``: ``model`` config keys (model_type, num_layers, hidden_size, num_attention_heads,
    vocab_size, ...). ``initialization``: ``{"method": "random", "seed": 42}`` or
    ``{"method": "checkpoint", "path": "checkpoints/model_final.pt"}`` or ``{"method": "pretrained", "path":
    "<a Hugging Face model folder>"}``."""

    architecture: dict = field(default_factory=dict)
    initialization: dict = field(default_factory=lambda: {"method": "random", "seed": 42})


@dataclass
class ModelInitializerOutput:
    model_id: str
    model: Any  # llm_training.model.transformer.Transformer
    config: Any  # its ModelConfig
    num_parameters: int
    flops_per_token: float
    # the tokenizer the weights were trained with (a checkpoint's, a pretrained folder's tokenizer.json);
    # None for a random model. Data to train it further must be tokenized with it (check_data_tokenizer)
    tokenizer: Any = None
    tokenizer_path: str | None = None  # where that tokenizer is (for llm-prepare-data --tokenizer)

    def __getattr__(self, name: str):  # behaves as the model where a model is expected: model(ids), .to()
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class ModelInitializer:
    """Builds GPT-2-style or Llama-style decoder models from architecture keys; publishes ``model_initialized``."""

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus
        self.models: dict[str, Any] = {}

    def initialize(
        self, spec: ModelInitializerInput | None = None, **architecture: Any
    ) -> ModelInitializerOutput:
        """Build a model from architecture keys (random, from a checkpoint or a Hugging Face folder); returns it registered under a model_id."""
        import torch

        from llm_training.data.tokenizer import Tokenizer
        from llm_training.model.transformer import Transformer
        from llm_training.train.checkpoint import load_checkpoint

        spec = spec or ModelInitializerInput(architecture=architecture)
        init = dict(spec.initialization or {})
        method = str(init.get("method", "random")).lower()
        state = tokenizer = tokenizer_path = None
        overrides = {f"model.{k}": v for k, v in spec.architecture.items()}
        if method == "checkpoint":
            if "path" not in init:
                raise ConfigError("initialization 'checkpoint' needs a 'path' to a .pt checkpoint")
            state = load_checkpoint(Path(init["path"]))
            saved = {f"model.{k}": v for k, v in state["config"]["model"].items()}
            overrides = saved | overrides
            if state.get("tokenizer_json"):
                tokenizer = Tokenizer.from_json(state["tokenizer_json"])
                tokenizer_path = state.get("tokenizer_path")
        elif (
            method == "pretrained"
        ):  # a Hugging Face folder (GPT-2, Llama, Mistral, Qwen2, Qwen3; ours or another's)
            from llm_training.export.hf import load_hf

            if "path" not in init:
                raise ConfigError("initialization 'pretrained' needs a 'path' to a Hugging Face model folder")
            pretrained, tokenizer = load_hf(init["path"])
            tokenizer_path = str(Path(init["path"]) / "tokenizer.json") if tokenizer is not None else None
            overrides = {f"model.{k}": v for k, v in vars(pretrained.cfg).items()} | overrides
        elif method != "random":
            raise ConfigError(
                f"initialization method {method!r} is not one of random, checkpoint, pretrained"
            )
        cfg = load_config(cli=overrides, environ={}, default_file=None)
        if cfg.model.vocab_size is None:
            raise ConfigError("architecture needs 'vocab_size' (the tokenizer's size), e.g. vocab_size=50304")
        torch.manual_seed(int(init.get("seed", 42)))
        if method == "pretrained":  # the imported tensors themselves: one model in memory, not two
            try:
                model = Transformer.from_state(cfg.model, pretrained.state_dict())
            except RuntimeError as exc:
                raise ConfigError(
                    f"architecture keys do not fit the pretrained weights ({str(exc).splitlines()[0][:150]})"
                ) from None
            del pretrained
        else:
            model = Transformer(cfg.model)
        if state is not None:
            from llm_training.train.lora import merged_state

            model.load_state_dict(merged_state(state["model"], state["config"].get("finetune")))
        output = MODELS[register_model(model, cfg.model, tokenizer, tokenizer_path)]
        self.models[output.model_id] = output
        if self.event_bus is not None:
            self.event_bus.publish(
                "model_initialized", model_id=output.model_id, num_parameters=output.num_parameters
            )
        return output


def register_model(model, config, tokenizer=None, tokenizer_path: str | None = None) -> str:
    """Record a trained model under a new id, as ``ModelInitializer`` does for the models it builds."""
    output = ModelInitializerOutput(
        model_id=str(uuid.uuid4()),
        model=model,
        config=config,
        num_parameters=model.num_parameters(),
        flops_per_token=model.flops_per_token(),
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
    )
    MODELS[output.model_id] = output
    return output.model_id


def check_data_tokenizer(model: ModelInitializerOutput, data_dir: str | Path) -> None:
    """Refuse to train ``model`` further on prepared data whose ``vocab.json`` is not the tokenizer its
    weights were trained with: the same ids would name other tokens, and training would go on silently
    from a meaningless start. A model without a known tokenizer (random) takes any data."""
    from llm_training.data.tokenizer import check_same_tokenizer

    vocab = Path(data_dir) / "vocab.json"
    if model.tokenizer is None or not vocab.is_file():
        return
    fix = f"prepare it again with llm-prepare-data --tokenizer {model.tokenizer_path or '<the model tokenizer>'}"
    check_same_tokenizer(model.tokenizer, vocab, "the model's", fix)
