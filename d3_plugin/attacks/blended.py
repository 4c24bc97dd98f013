"""Blended (Chen et al. 2017): the whole image alpha-blended with a fixed pattern."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F


def noise_pattern(seed: int, channels: int, height: int, width: int) -> torch.Tensor:
    """A uniform uint8 noise image drawn from a private generator: the same for the same seed and shape."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), generator=generator, dtype=torch.uint8)


def load_pattern(path: str | Path) -> torch.Tensor:
    """Read an image file (any format Pillow reads) as a uint8 (3, H, W) tensor."""
    from PIL import Image
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"blend pattern {path} not found; pass an existing image file")
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def fit_pattern(pattern: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Resize a uint8 (C', H', W') pattern to (channels, height, width) as float: bilinear resize,
    RGB→grey (ITU-R 601 weights) for one-channel images, grey→RGB by repetition."""
    p = pattern.float()
    if p.shape[-2:] != (height, width):
        p = F.interpolate(p[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if p.shape[0] == 3 and channels == 1:
        p = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * p).sum(0, keepdim=True)
    elif p.shape[0] == 1 and channels == 3:
        p = p.repeat(3, 1, 1)
    if p.shape[0] != channels:
        raise ValueError(f"blend pattern has {pattern.shape[0]} channels; images have {channels}")
    return p


@dataclass(frozen=True)
class Blended:
    """x ↦ round((1 − α)·x + α·p). `p` is `pattern` (uint8 (C, H, W), resized to the images) when given,
    else uniform noise drawn with `seed` at the images' shape. Build from a file with `Blended.from_image`."""

    alpha: float = 0.2
    seed: int = 0
    pattern: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"Blended needs 0 < alpha ≤ 1, got {self.alpha}")
        if self.pattern is not None and (self.pattern.dtype != torch.uint8 or self.pattern.dim() != 3):
            raise ValueError("Blended pattern must be a uint8 tensor (C, H, W)")

    @classmethod
    def from_image(cls, path: str | Path, alpha: float = 0.2) -> "Blended":
        return cls(alpha=alpha, pattern=load_pattern(path))

    def pattern_for(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The blend pattern (float, 0–255) at the given image shape."""
        base = self.pattern if self.pattern is not None else noise_pattern(self.seed, channels, height, width)
        return fit_pattern(base, channels, height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern_for(*images.shape[1:]).to(images.device)
        mixed = (1.0 - self.alpha) * images.float() + self.alpha * pattern
        return mixed.round().clamp(0, 255).to(torch.uint8)
