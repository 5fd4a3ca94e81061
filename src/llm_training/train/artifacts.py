"""A trained model back from a checkpoint: the transformer with its weights and the tokenizer it was trained
with (both are inside every checkpoint), ready for evaluation, generation or export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llm_training.config import Config, config_from_dict
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.model import build_model
from llm_training.train.checkpoint import load_checkpoint
from llm_training.train.lora import merged_state


@dataclass
class TrainedModel:
    model: torch.nn.Module  # Transformer, or ImageCaptionModel for a text-and-image checkpoint
    tokenizer: Tokenizer
    config: Config
    step: int
    path: Path
    chat_template: str | None = None  # the Jinja text a fine-tuning on chat data recorded


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The model of checkpoint ``path`` in eval mode on ``device``, with its tokenizer."""
    path = Path(path)
    state = load_checkpoint(path)
    images = state.get("model_kind") == "image_text"
    sections = {
        "model": state["config"]["model"],
        **({"vision": state["config"]["vision"]} if images else {}),
    }
    cfg = config_from_dict(sections, str(path))
    if not state.get("tokenizer_json"):
        raise UserError(f"{path}: holds no tokenizer (saved by another tool?); it cannot be evaluated alone")
    tokenizer = Tokenizer.from_json(state["tokenizer_json"])
    model = build_model(cfg, images)
    try:
        model.load_state_dict(merged_state(state["model"], state["config"].get("finetune")))
    except RuntimeError as exc:
        raise UserError(
            f"{path}: weights do not match its config ({str(exc).splitlines()[0][:200]})"
        ) from None
    template = ((state["config"].get("finetune") or {}).get("template")) or None
    return TrainedModel(model.to(device).eval(), tokenizer, cfg, int(state.get("step", 0)), path, template)
