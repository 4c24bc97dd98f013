"""WaNet (Nguyen & Tran 2021): a fixed, smooth, almost invisible warp of the image.

The warp field is a k×k grid of uniform(−1, 1) offsets (scaled so its mean |value| is 1), upsampled
bicubically to the image size; images are resampled at identity + s·field/H (times `grid_rescale`,
clamped to the image). WaNet's "noise mode" adds cross samples: images warped by the same field plus
per-sample random noise of up to one pixel, which keep their true label, so the model learns the
exact warp and not warping in general (`poison_with_cross`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import ImageSet
from .base import poison_training_set


@dataclass(frozen=True)
class WaNet:
    """x ↦ grid_sample(x, warp grid); k = control grid size, s = strength, seed = draw of the field."""

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.k < 2 or self.s <= 0 or self.grid_rescale <= 0:
            raise ValueError("WaNet needs k ≥ 2, s > 0 and grid_rescale > 0")

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The sampling grid (1, H, W, 2) in grid_sample's [−1, 1] coordinates."""
        generator = torch.Generator().manual_seed(self.seed)
        control = torch.rand((1, 2, self.k, self.k), generator=generator) * 2 - 1
        control = control / control.abs().mean()
        field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)
        rows, cols = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
        identity = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[None]
        return ((identity + self.s * field / height) * self.grid_rescale).clamp(-1, 1)

    def warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        warped = F.grid_sample(images.float(), grid.to(images.device), mode="bilinear", align_corners=True)
        return warped.round().clamp(0, 255).to(torch.uint8)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.grid(*images.shape[-2:])
        return self.warp(images, grid.expand(len(images), -1, -1, -1))

    def cross(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Noise mode: the warp plus per-sample uniform noise of up to one pixel (seeded)."""
        n, _, height, width = images.shape
        generator = torch.Generator().manual_seed(seed)
        noise = (torch.rand((n, height, width, 2), generator=generator) * 2 - 1) / height
        grid = (self.grid(height, width) + noise).clamp(-1, 1)
        return self.warp(images, grid)


def poison_with_cross(train: ImageSet, trigger: WaNet, ratio: float, target: int = 0, *,
                      clean_label: bool = False, seed: int = 0, cross_ratio: float = 2.0) -> ImageSet:
    """WaNet's poisoned training set: `ratio` warped and relabelled, plus `ratio·cross_ratio` cross
    samples from the rest (noise-warped, true label kept). Like BackdoorBench's bd_train, cross samples
    are marked in `poisoned` (they are modified) while their label stays their own."""
    poisoned = poison_training_set(train, trigger, ratio, target, clean_label=clean_label, seed=seed)
    if cross_ratio <= 0:
        return poisoned
    rest = torch.nonzero(~poisoned.poisoned).flatten()
    count = min(len(rest), round(ratio * cross_ratio * len(train)))
    generator = torch.Generator().manual_seed(seed + 1)
    index = rest[torch.randperm(len(rest), generator=generator)[:count]].sort().values
    if len(index):
        poisoned.images[index] = trigger.cross(poisoned.images[index], seed=seed + 1)
        poisoned.poisoned[index] = True
    return poisoned
