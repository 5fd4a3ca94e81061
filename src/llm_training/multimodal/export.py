"""A text-and-image model's weights as safetensors: the whole config (``model`` and ``vision``) and the
tokenizer in the file's metadata and beside it, read back by ``load_weights``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llm_training.errors import UserError

PRODUCER = "llm_training"
KIND = "image_text"


def export_weights(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> dict:
    """Write ``output`` (.safetensors) with config.json and tokenizer.json beside it, reload it and compare
    its captions' logits with the checkpoint's; returns what was written and the check."""
    from safetensors.torch import save_file

    from llm_training.train.artifacts import load_trained

    target = Path(output)
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass --overwrite (overwrite=True) to replace it")
    trained = load_trained(checkpoint, "cpu")
    config = json.dumps({"model": vars(trained.config.model), "vision": vars(trained.config.vision)})
    state, seen = {}, set()
    for name, tensor in trained.model.state_dict().items():
        if tensor.data_ptr() in seen:  # the tied output head is the embedding: stored once
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().float().contiguous().clone()
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.partial")
    save_file(state, str(staged), metadata={"format": "pt", "producer": PRODUCER, "kind": KIND, "config": config,
                                            "tokenizer": trained.tokenizer.backend.to_str()})  # fmt: skip
    reloaded, _ = load_weights(staged)
    image = torch.randint(0, 256, (2, trained.config.vision.image_size, trained.config.vision.image_size, 3),
                          dtype=torch.uint8)  # fmt: skip
    ids = torch.full((2, 2), trained.tokenizer.eot_id)
    with torch.no_grad():
        diff = (trained.model(ids, images=image) - reloaded(ids, images=image)).abs().max().item()
    if diff > 1e-5:
        staged.unlink()
        raise UserError(f"the exported weights do not reproduce the checkpoint (logits differ by {diff:.2e})")
    os.replace(staged, target)
    (target.parent / "config.json").write_text(config + "\n")
    trained.tokenizer.save(target.parent / "tokenizer.json")
    return {"export_path": target, "size_bytes": target.stat().st_size, "max_logit_diff": diff,
            "files": [target, target.parent / "config.json", target.parent / "tokenizer.json"]}  # fmt: skip


def load_weights(path: str | Path):
    """(model, tokenizer) from a text-and-image safetensors file written by ``export_weights``."""
    from safetensors import safe_open

    from llm_training.config import config_from_dict
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.model.vision import ImageCaptionModel

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:  # safetensors raises its own error type on damaged files
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("kind") != KIND:
        raise UserError(f"{path}: not a text-and-image model exported by llm_training")
    cfg = config_from_dict(json.loads(metadata["config"]), str(path))
    model = ImageCaptionModel(cfg.model, cfg.vision)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.model.tie_embeddings and m == "lm.lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), Tokenizer.from_json(metadata["tokenizer"])


def is_image_text_checkpoint(path: str | Path) -> bool:
    from llm_training.train.checkpoint import load_checkpoint

    return Path(path).suffix == ".pt" and load_checkpoint(path).get("model_kind") == KIND
