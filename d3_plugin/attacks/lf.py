"""LF, a low-frequency additive trigger (after Zeng et al. 2021, "Rethinking the backdoor attacks'
triggers: a frequency perspective").

The original LF trigger is a universal adversarial perturbation of a clean model, smoothed by a
Gaussian low-pass filter (BackdoorBench ships such patterns per dataset and model). Ours needs no
clean model: seeded Gaussian noise is low-pass filtered in the Fourier domain (only frequencies with
|k| ≤ `cutoff` cycles per image kept), then min–max scaled to [0, `budget`] (0–255 scale), the same
value range as BackdoorBench's shipped patterns (0–51). It is band-limited and smooth by
construction, but not adversarially optimised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def low_frequency_pattern(seed: int, channels: int, height: int, width: int, cutoff: float,
                          budget: float) -> torch.Tensor:
    """Seeded noise, low-pass filtered with an ideal radial filter of `cutoff` cycles per image,
    min–max scaled to [0, budget]: float (C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((channels, height, width), generator=generator, dtype=torch.float64)
    fy = torch.fft.fftfreq(height, d=1.0 / height).abs()[:, None]
    fx = torch.fft.fftfreq(width, d=1.0 / width).abs()[None, :]
    keep = (fy ** 2 + fx ** 2) <= cutoff ** 2
    smooth = torch.fft.ifft2(torch.fft.fft2(noise) * keep).real
    low, high = smooth.amin(dim=(-2, -1), keepdim=True), smooth.amax(dim=(-2, -1), keepdim=True)
    return ((smooth - low) / (high - low).clamp_min(1e-12) * budget).float()


@dataclass(frozen=True)
class LowFrequency:
    """x ↦ clip(round(x + p)), p = `low_frequency_pattern(seed, C, H, W, cutoff, budget)`."""

    cutoff: float = 3.0
    budget: float = 51.0
    seed: int = 0

    def __post_init__(self):
        if self.cutoff <= 0 or not 0 < self.budget <= 255:
            raise ValueError("LF needs cutoff > 0 and 0 < budget ≤ 255")

    def pattern_for(self, channels: int, height: int, width: int) -> torch.Tensor:
        return low_frequency_pattern(self.seed, channels, height, width, self.cutoff, self.budget)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern_for(*images.shape[1:]).to(images.device)
        return (images.float() + pattern).round().clamp(0, 255).to(torch.uint8)
