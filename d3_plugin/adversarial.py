"""Adversarial-example helpers shared by the adversarial defenses (AFT/PBE, SAU, i-BAU), the probe, GIC and D3.

Models see normalised inputs x = (p − mean) / std, with pixels p ∈ [0, 1]. Budgets are stated in
pixel units (ε = 6/255 means six grey levels), so a pixel-space L∞ ball of radius ε is, per channel,
a normalised-space ball of radius ε / std, and the valid image range [0, 1] is the box
[(0 − mean) / std, (1 − mean) / std]. `InputBox` holds these per-channel tensors; `pgd` runs
sign-gradient ascent inside the intersection of the ball and the box.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("zero", "random", "max")


@dataclass(frozen=True)
class InputBox:
    """Per-channel (1, C, 1, 1) tensors: normalised images of pixel 0 and pixel 1, and 1/std."""

    lower: torch.Tensor
    upper: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_spec(cls, spec, device: torch.device | str = "cpu") -> "InputBox":
        shape = (1, len(spec.mean), 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(shape)
        return cls(lower=-mean / std, upper=(1 - mean) / std, scale=1 / std)

    def clamp(self, inputs: torch.Tensor) -> torch.Tensor:
        """Clip normalised inputs to the valid image range."""
        return torch.maximum(torch.minimum(inputs, self.upper), self.lower)

    def project(self, inputs: torch.Tensor, origin: torch.Tensor, eps: float) -> torch.Tensor:
        """Project onto the pixel-space L∞ ball of radius `eps` around `origin`, inside the valid range."""
        radius = eps * self.scale
        return self.clamp(torch.maximum(torch.minimum(inputs, origin + radius), origin - radius))

    def pixel_distance(self, inputs: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """L∞ distance between two normalised batches, in pixel units ([0, 1] scale)."""
        return ((inputs - origin) / self.scale).abs().amax()


def input_box(batches) -> InputBox:
    """The InputBox of a Loader (its `spec` and `device`); a clear error for plain iterables."""
    spec = getattr(batches, "spec", None)
    if spec is None:
        raise ValueError("adversarial defenses need a d3_plugin Loader (with .spec) to know the input range; "
                         "wrap the reserved data in d3_plugin.data.Loader")
    return InputBox.from_spec(spec, getattr(batches, "device", "cpu"))


@contextmanager
def evaluating(*models: nn.Module):
    """Put models in eval mode (BN uses running statistics and does not update them), then restore."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, box: InputBox, eps: float,
        step_size: float, steps: int, *, init: str = "zero",
        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Maximise `loss_fn(x)` over the pixel-space L∞ ball of radius `eps` around `inputs` (normalised),
    staying inside the valid image range; `step_size` is in pixel units. Returns a detached batch.

    init: "zero" (start at the inputs), "random" (uniform in the ball) or "max" (every pixel at +ε,
    SAU's default). Gradients are taken w.r.t. the inputs only: model parameter .grad are untouched.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    origin = inputs.detach()
    if init == "random":
        noise = torch.rand(origin.shape, generator=generator).to(origin.device) * 2 - 1
        start = origin + eps * box.scale * noise
    elif init == "max":
        start = origin + eps * box.scale
    else:
        start = origin
    adversarial = box.project(start, origin, eps)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(adversarial), adversarial)
        adversarial = box.project(adversarial.detach() + step_size * box.scale * grad.sign(), origin, eps)
    return adversarial.detach()


def untargeted_pgd(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, box: InputBox, eps: float,
                   step_size: float, steps: int, **kwargs) -> torch.Tensor:
    """Untargeted PGD (maximise cross-entropy against `labels`) with the model in eval mode."""
    with evaluating(model):
        return pgd(lambda x: F.cross_entropy(model(x), labels), inputs, box, eps, step_size, steps, **kwargs)
