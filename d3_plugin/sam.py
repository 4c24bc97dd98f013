"""Sharpness-aware minimisation (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021).

`SAM(base_optimizer, rho, adaptive)` wraps any optimizer and is driven like one through
`step(closure)`: the closure's gradient at w gives the ascent direction
    e(w) = ρ · T² g / ‖T g‖,   T = diag(|w|) for ASAM, identity for SAM,
the closure runs again at w + e(w), and the base optimizer steps from w with that second gradient.
Learning-rate schedulers attach to the base optimizer.
"""
from __future__ import annotations

import torch


class SAM:
    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = True):
        if rho < 0:
            raise ValueError(f"SAM needs rho ≥ 0, got {rho}")
        self.base, self.rho, self.adaptive = base_optimizer, rho, adaptive

    @property
    def param_groups(self):
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _params(self):
        return [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]

    def _scale(self, p: torch.Tensor) -> torch.Tensor:
        return p.abs() if self.adaptive else torch.ones_like(p)

    @torch.no_grad()
    def _perturb(self) -> list:
        params = self._params()
        scaled = [self._scale(p) * p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        offsets = []
        for p, s in zip(params, scaled):
            e = self.rho * self._scale(p) * s / (norm + 1e-12)
            p.add_(e)
            offsets.append((p, e))
        return offsets

    def step(self, closure):
        """closure() must zero the gradients, compute the loss, call backward and return the loss."""
        with torch.enable_grad():
            loss = closure()
        offsets = self._perturb()
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            for p, e in offsets:
                p.sub_(e)
        self.base.step()
        return loss

    def state_dict(self):
        return self.base.state_dict()
