"""SIG (Barni et al. 2019): a horizontal sinusoid added to the image; a clean-label attack."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SIG:
    """x[.., i, j] ↦ clip(x + Δ·sin(2π·j·f / W)), Δ = `delta` (0–255 scale), f = `frequency` periods per row.

    Clean-label: poison only target-class training images (the registry's `sig` does this)."""

    delta: float = 40.0
    frequency: float = 6.0

    def __post_init__(self):
        if not 0 < self.delta <= 255 or self.frequency <= 0:
            raise ValueError("SIG needs 0 < delta ≤ 255 and frequency > 0")

    def signal(self, width: int) -> torch.Tensor:
        """The added signal along one row (float, length `width`)."""
        columns = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        signal = self.signal(images.shape[-1]).to(images.device)
        return (images.float() + signal).round().clamp(0, 255).to(torch.uint8)
