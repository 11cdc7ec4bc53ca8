"""Evaluation preprocessing as a small, picklable, self-describing dataclass."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

_INTERPOLATION = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
    "nearest": TF.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """Image (PIL, or uint8 HxW / HxWxC array) -> normalized float tensor [C, size, size].

    Same steps as timm's eval transform: resize the short side to
    floor(size / crop_pct), centre-crop `size`, scale to [0, 1], normalize.
    Grayscale inputs are repeated to RGB and colour ones averaged to one
    channel as `len(mean)` asks.
    """

    size: int
    crop_pct: float
    interpolation: str  # "bilinear" | "bicubic" | "nearest"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (part of the feature-cache key)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def __call__(self, img: Any) -> torch.Tensor:
        pil = to_pil(img, "L" if self.in_chans == 1 else "RGB")
        scale = math.floor(self.size / self.crop_pct)
        pil = TF.resize(pil, scale, interpolation=_INTERPOLATION[self.interpolation])
        x = TF.to_tensor(TF.center_crop(pil, [self.size, self.size]))
        return TF.normalize(x, list(self.mean), list(self.std))


def to_pil(img: Any, mode: str) -> Image.Image:
    """A PIL image in `mode` from a PIL image or a uint8 HxW / HxWx{1,3,4} array."""
    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(arr)
    if img.mode == "RGBA":  # composite on white rather than on black
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img if img.mode == mode else img.convert(mode)
