"""A text-and-image model's weights as safetensors (export/weights.py's format): the whole config (``model``
and ``vision``) and the tokenizer in the file's metadata and beside it, read back by ``load_weights``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_training.errors import UserError
from llm_training.limits import json_loads

KIND = "image_text"


def write_weights(model, tokenizer, path: Path) -> None:
    """``path`` (.safetensors) with config.json and tokenizer.json beside it."""
    from llm_training.export.weights import save_weights

    config = json.dumps({"model": vars(model.cfg), "vision": vars(model.vision_cfg)})
    save_weights(model, tokenizer, path, config, kind=KIND)


def check_weights(model, path: Path) -> dict:
    """Reload ``path`` and compare its logits with ``model``'s on random images."""
    reloaded, _ = load_weights(path)
    size = model.vision_cfg.image_size
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    ids = torch.zeros((2, 2), dtype=torch.long)
    with torch.no_grad():
        diff = (model(ids, images=images) - reloaded(ids, images=images)).abs().max().item()
    if diff > 1e-5:
        raise UserError(f"the exported weights do not reproduce the checkpoint (logits differ by {diff:.2e})")
    return {"runtime": "safetensors", "max_logit_diff": diff}


def load_weights(path: str | Path):
    """(model, tokenizer) from a text-and-image safetensors file written by ``write_weights``."""
    from llm_training.config import config_from_dict
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.export.weights import read_weights
    from llm_training.model.vision import ImageCaptionModel

    metadata, state = read_weights(path)
    if metadata.get("kind") != KIND:
        raise UserError(f"{path}: not a text-and-image model exported by llm_training")
    try:
        config = json_loads(metadata.get("config", ""))
    except ValueError:
        raise UserError(
            f"{path}: its config metadata is damaged (not JSON); export the checkpoint again"
        ) from None
    cfg = config_from_dict(config, str(path))
    model = ImageCaptionModel(cfg.model, cfg.vision)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.model.tie_embeddings and m == "lm.lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), Tokenizer.from_json(metadata["tokenizer"])
