"""A language model that reads an image first: a vision encoder (a patch transformer trained from scratch, or
a pretrained Hugging Face vision model from a local folder) whose outputs, projected to the language model's
width, are prefix embeddings before the caption's tokens."""

from __future__ import annotations

import torch
from torch import nn

from llm_training.config import ModelConfig, VisionConfig
from llm_training.model.transformer import Transformer


class PatchEncoder(nn.Module):
    """ViT-style: non-overlapping patches, learned positions, pre-norm encoder layers (PyTorch's own)."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, v.hidden_size, v.patch_size, v.patch_size)
        patches = (v.image_size // v.patch_size) ** 2
        self.pos = nn.Parameter(torch.randn(1, patches, v.hidden_size) * 0.02)
        layer = nn.TransformerEncoderLayer(v.hidden_size, v.num_attention_heads, 4 * v.hidden_size, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, v.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(v.hidden_size)
        self.width = v.hidden_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.encoder(x))


class PretrainedEncoder(nn.Module):
    """A Hugging Face vision model (ViT, CLIP's vision tower, ...) from a local folder: its last hidden states."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, CLIPVisionModel

        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "model_type", "") == "clip":
            self.model = CLIPVisionModel.from_pretrained(folder)
            self.width = config.vision_config.hidden_size
        else:
            self.model = AutoModel.from_pretrained(folder)
            self.width = getattr(config, "hidden_size", None) or config.vision_config.hidden_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


class ImageCaptionModel(nn.Module):
    """``model(input_ids, labels, images=...)`` -> loss, or logits without labels. ``images``: (B, H, W, 3)
    uint8 (as the prepared data stores them) or (B, 3, H, W) floats already normalised."""

    def __init__(self, cfg: ModelConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.cfg, self.vision_cfg = cfg, vision
        self.lm = Transformer(cfg)
        self.vision = PretrainedEncoder(vision.pretrained) if vision.pretrained else PatchEncoder(vision)
        self.project = nn.Sequential(
            nn.Linear(self.vision.width, cfg.hidden_size),
            nn.GELU(),
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
        )
        self.register_buffer("mean", torch.tensor(vision.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vision.std).view(1, 3, 1, 1), persistent=False)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # (B, H, W, 3) as stored: normalise on the device
            images = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        return self.project(self.vision(images.to(self.project[0].weight.dtype)))

    def forward(self, input_ids, labels=None, images=None):
        if images is None:
            raise ValueError("this model reads an image before the text: pass images=")
        return self.lm(input_ids, labels, prefix=self.prefix(images))

    @torch.no_grad()
    def caption(self, images: torch.Tensor, eot_id: int, max_tokens: int = 32) -> list[list[int]]:
        """Greedy captions for a batch of images (stops at end-of-text)."""
        was = self.training
        self.eval()
        prefix = self.prefix(images)
        ids = torch.full((images.size(0), 1), eot_id, dtype=torch.long, device=prefix.device)
        done = torch.zeros(images.size(0), dtype=torch.bool, device=prefix.device)
        for _ in range(max_tokens):
            if prefix.size(1) + ids.size(1) > self.cfg.max_seq_length:
                break
            nxt = self.lm(ids, prefix=prefix)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eot_id
            if bool(done.all()):
                break
        self.train(was)
        rows = ids[:, 1:].tolist()
        return [row[: row.index(eot_id)] if eot_id in row else row for row in rows]

    def num_parameters(self, non_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters()) - (
            self.lm.embed.weight.numel() if non_embedding else 0
        )

    def flops_per_token(self) -> float:
        return self.lm.flops_per_token()
