"""``MultiModalPreprocessor``: the usage guide's text-and-image preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_training.errors import ConfigError
from llm_training.multimodal.images import IMAGENET_MEAN, IMAGENET_STD, load_image, resized, to_tensor


class MultiModalPreprocessor:
    """``preprocess(text, image_path)`` -> ``{'text_tokens': LongTensor, 'image_tensor': (3, H, W) float}``.

    The image is resized to ``image_size``, scaled to 0..1 and normalised with ``mean`` and ``std`` (ImageNet's
    by default), as the guide's torchvision pipeline does; torchvision is used where installed
    (``backend='auto'``), else Pillow and NumPy, which give the same numbers. ``tokenizer``: a tokenizer file or
    folder (``vocab.json`` of prepared data, GPT-2 files, ...) or a ``Tokenizer``; without one the text's
    UTF-8 bytes are its tokens."""

    def __init__(
        self,
        tokenizer: Any = None,
        image_size: int | tuple[int, int] = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "torchvision", "numpy"):
            raise ConfigError(f"backend must be auto, torchvision or numpy, got {backend!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError("mean and std need three values (R, G, B), std above 0")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        if isinstance(tokenizer, (str, Path)):
            from llm_training.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(tokenizer)
        self.tokenizer = tokenizer
        self.backend = self._backend(backend)
        self._transform = None
        if self.backend == "torchvision":  # the guide's pipeline, built once
            import torchvision.transforms as transforms

            size = (image_size, image_size) if isinstance(image_size, int) else image_size
            self._transform = transforms.Compose(
                [transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
            )

    @staticmethod
    def _backend(wanted: str) -> str:
        if wanted == "numpy":
            return "numpy"
        try:
            import torchvision  # noqa: F401
        except ImportError:
            if wanted == "torchvision":
                raise ConfigError("backend 'torchvision' but torchvision is not installed") from None
            return "numpy"
        return "torchvision"

    def tokenize(self, text: str):
        import torch

        ids = self.tokenizer.encode(text) if self.tokenizer is not None else list(text.encode("utf-8"))
        return torch.tensor(ids, dtype=torch.long)

    def image_tensor(self, image_path: str | Path):
        """The image at a path or URL as a normalised (3, H, W) float tensor."""
        image = load_image(image_path)
        if self._transform is not None:
            return self._transform(image)
        return to_tensor(resized(image, self.image_size), self.mean, self.std)

    def preprocess(self, text: str, image_path: str | Path) -> dict:
        return {"text_tokens": self.tokenize(text), "image_tensor": self.image_tensor(image_path)}
