"""Captioning images: the training objective of prepared image-text data (``train/setup.py`` picks it by the
manifest's kind). The loss is language modelling's, with the images passed to the model beside the caption."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_training.config import Config, TrainingConfig
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import ConfigError
from llm_training.model import build_model
from llm_training.multimodal.data import KIND, CaptionDataset
from llm_training.train.device import Runtime
from llm_training.train.objectives import LanguageModelling, training_window


class Captioning(LanguageModelling):
    """Captions of images: the image's prefix tokens come first in the context, then the caption."""

    model_kind = KIND

    @classmethod
    def from_data(cls, cfg: Config, data_dir: Path, manifest: dict) -> Captioning:
        window = caption_window(cfg, int(manifest["image_size"]), training_window(cfg))
        return cls(
            CaptionDataset(data_dir / "train.json", window),
            CaptionDataset(data_dir / "validation.json", window),
        )

    def build_model(self, cfg: Config) -> torch.nn.Module:
        return build_model(cfg, images=True)

    def sample(self, model, tokenizer: Tokenizer, runtime: Runtime, t: TrainingConfig) -> str:
        """A caption of the first validation image."""
        image = self.val_set.batch([0])["images"].to(runtime.device)
        ids = model.caption(image, tokenizer.eot_id, t.sample_tokens)[0] if t.sample_tokens else []
        return tokenizer.decode(ids)


def caption_window(cfg: Config, image_size: int, window: int) -> int:
    """Caption tokens a window: what the context leaves after the image's prefix. The images' size is the
    prepared data's (recorded in the config, so the checkpoint rebuilds the same model)."""
    v = cfg.vision
    v.image_size = image_size
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"the prepared images are {v.image_size} px, not a multiple of vision.patch_size ({v.patch_size})"
        )
    if v.pretrained:
        return window
    prefix = (v.image_size // v.patch_size) ** 2
    if prefix >= cfg.model.max_seq_length:
        raise ConfigError(
            f"an image is {prefix} prefix tokens ({v.image_size} px in {v.patch_size} px patches), which fills "
            f"model.max_seq_length ({cfg.model.max_seq_length}); raise it or vision.patch_size"
        )
    return min(window, cfg.model.max_seq_length - prefix)
