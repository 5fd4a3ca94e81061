"""Plain safetensors: our own parameter names, with ``config.json`` (the model config) and ``tokenizer.json``
beside the weights file, and both also in the file's header metadata so that the file alone is enough."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_training.config import model_config_from_json
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.model.transformer import Transformer

FORMAT_TAG = "llm_training"


def save_weights(
    model: Transformer,
    tokenizer: Tokenizer,
    path: Path,
    config: str,
    half: bool = False,
    kind: str | None = None,
) -> list[Path]:
    """Write ``path`` and the config and tokenizer beside it; returns every file written. ``kind`` marks a
    model other than the language model (``image_text``) in the metadata."""
    from safetensors.torch import save_file

    dtype = torch.float16 if half else torch.float32
    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied head is the embedding: stored once
            continue
        seen[tensor.data_ptr()] = name
        state[name] = tensor.detach().to(dtype).contiguous().clone()
    metadata = {
        "format": "pt",
        "producer": FORMAT_TAG,
        "config": config,
        "tokenizer": tokenizer.to_str(),
        **({"kind": kind} if kind else {}),
    }
    save_file(state, str(path), metadata=metadata)
    (path.parent / "config.json").write_text(config + "\n")
    tokenizer.save(path.parent / "tokenizer.json")
    return [path, path.parent / "config.json", path.parent / "tokenizer.json"]


def read_weights(path: str | Path) -> tuple[dict, dict]:
    """(metadata, tensors by name) of a safetensors file; one clear error for a damaged one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:  # safetensors raises its own SafetensorError on damaged headers
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return metadata, state


def load_weights(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    path = Path(path)
    metadata, state = read_weights(path)
    if metadata.get("producer") != FORMAT_TAG:
        raise UserError(
            f"{path}: safetensors without llm_training's config (a Hugging Face folder? pass the folder)"
        )
    cfg = model_config_from_json(metadata["config"], str(path))
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tokenizer = Tokenizer.from_json(metadata["tokenizer"]) if metadata.get("tokenizer") else None
    return model, tokenizer
