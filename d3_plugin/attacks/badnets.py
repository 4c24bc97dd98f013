"""BadNets (Gu et al. 2017): a small solid patch stamped on the image."""
from __future__ import annotations

from dataclasses import dataclass

import torch

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass(frozen=True)
class BadNets:
    """A `size`×`size` patch of `value` (0–255) at `position`, `margin` pixels from the border."""

    size: int = 3
    position: str = "bottom-right"
    value: int = 255
    margin: int = 0

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if not 0 <= self.value <= 255 or self.size < 1:
            raise ValueError("BadNets needs size ≥ 1 and a value in 0..255")

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        top = self.margin if self.position.startswith("top") else height - self.margin - self.size
        left = self.margin if self.position.endswith("left") else width - self.margin - self.size
        if top < 0 or left < 0:
            raise ValueError(f"a {self.size}px patch with margin {self.margin} does not fit {height}×{width}")
        return slice(top, top + self.size), slice(left, left + self.size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        rows, cols = self.region(images.shape[-2], images.shape[-1])
        out = images.clone()
        out[..., rows, cols] = self.value
        return out
