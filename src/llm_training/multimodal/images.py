"""Reading and checking images (Pillow), resizing, and turning them into normalised tensors (NumPy), the
same numbers torchvision's ``Resize``, ``ToTensor`` and ``Normalize`` give."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from llm_training.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = {"RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F"}  # what converts to RGB without guessing


class ImageProblem(DataError):
    """An image that cannot be used: ``kind`` is missing, corrupt or mode."""

    def __init__(self, kind: str, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.kind = kind


def _read_bytes(source: str, base: Path | None) -> bytes:
    if "://" in source:
        import fsspec

        try:
            with fsspec.open(source, "rb") as handle:
                return handle.read()
        except (OSError, ValueError, ImportError) as exc:
            raise ImageProblem("missing", source, f"cannot be read ({exc})") from None
    path = Path(source)
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise ImageProblem("missing", str(path), "no such image file")
    return path.read_bytes()


def load_image(source: str | Path, base: Path | None = None):
    """The image at a path (relative to ``base``) or URL as an RGB ``PIL.Image``; ``ImageProblem`` if it is
    missing, not a decodable image, or in a mode that has no RGB meaning."""
    from PIL import Image, UnidentifiedImageError

    data = _read_bytes(str(source), base)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not later in training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem("corrupt", str(source), f"not a readable image ({type(exc).__name__})") from None
    if image.mode not in MODES:
        raise ImageProblem("mode", str(source), f"image mode {image.mode} cannot be converted to RGB")
    if image.mode in ("I;16", "I", "F"):  # 16-bit or float greyscale: scale to 8 bits first
        values = np.asarray(image, dtype=np.float64)
        span = values.max() - values.min()
        image = Image.fromarray(((values - values.min()) / (span or 1) * 255).astype(np.uint8))
    return image.convert("RGB")


def resized(image, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 at ``size`` (an int: square), bilinear with antialiasing as torchvision's Resize."""
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else size
    return np.array(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def to_tensor(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32: scaled to 0..1, then (x - mean) / std per channel."""
    import torch

    values = (
        torch.from_numpy(np.array(pixels, dtype=np.uint8)).float().div_(255.0)
    )  # a copy: PIL arrays are read-only
    values = values.movedim(-1, -3)
    shape = (3, 1, 1)
    return (values - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
