"""How flat is the backdoor? Two measures of the loss landscape around a model's weights.

- `perturbation_sharpness`: the mean rise of the loss when every parameter is moved by random noise
  of a fixed size relative to its own magnitude, w ↦ w + r·|w|⊙ε with ε ~ N(0, I) ("elementwise",
  the geometry adaptive SAM uses), or per output filter scaled to r·‖filter‖ ("filter", as in
  filter-normalised loss-landscape plots). Averaged over seeded draws; BN statistics stay fixed.
- `top_hessian_eigenvalue`: the largest eigenvalue of the loss Hessian (all parameters), by power
  iteration on Hessian-vector products (double backward through torch.autograd).

Both evaluate the model in eval mode on a fixed list of (inputs, labels) batches, e.g. a few batches of
the poisoned test set (backdoor loss) or of clean data.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("elementwise", "filter")


def _batches(batches: Iterable) -> List[tuple]:
    listed = list(batches)
    if not listed:
        raise ValueError("flatness needs at least one batch of data")
    return listed


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence) -> float:
    """Sample-weighted mean cross-entropy over the batches, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, labels in batches:
        total += F.cross_entropy(model(inputs), labels, reduction="sum").item()
        count += len(labels)
    model.train(was_training)
    return total / count


def _noise(p: torch.Tensor, radius: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    eps = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
    if mode == "elementwise" or p.dim() < 2:
        return radius * p.abs() * eps
    dims = tuple(range(1, p.dim()))
    scale = torch.linalg.vector_norm(p, dim=dims, keepdim=True) / torch.linalg.vector_norm(
        eps, dim=dims, keepdim=True).clamp_min(1e-12)
    return radius * scale * eps


@torch.no_grad()
def perturbation_sharpness(model: nn.Module, batches: Iterable, radius: float = 0.05, draws: int = 5,
                           seed: int = 0, mode: str = "elementwise") -> Dict[str, float]:
    """{'loss': L(w), 'perturbed_loss': mean_draws L(w + δ), 'sharpness': their difference}."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batches = _batches(batches)
    base = mean_loss(model, batches)
    probe = copy.deepcopy(model)
    original = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(seed)
    perturbed = []
    for _ in range(draws):
        for p, w in zip(probe.parameters(), original):
            p.copy_(w + _noise(w, radius, mode, generator))
        perturbed.append(mean_loss(probe, batches))
    mean = sum(perturbed) / len(perturbed)
    return {"loss": base, "perturbed_loss": mean, "sharpness": mean - base}


def _hvp(model: nn.Module, params: List[torch.Tensor], batches: Sequence, vector: List[torch.Tensor]):
    """Hessian-vector product of the mean loss over the batches."""
    total = [torch.zeros_like(p) for p in params]
    count = sum(len(labels) for _, labels in batches)
    for inputs, labels in batches:
        loss = F.cross_entropy(model(inputs), labels, reduction="sum") / count
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        for t, h in zip(total, torch.autograd.grad(dot, params)):
            t.add_(h)
    return total


def top_hessian_eigenvalue(model: nn.Module, batches: Iterable, iterations: int = 20, seed: int = 0,
                           tol: float = 1e-3) -> float:
    """Largest Hessian eigenvalue of the mean loss by power iteration (eval mode; stops early when the
    estimate changes by less than `tol` relative)."""
    batches = _batches(batches)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
    estimate = 0.0
    try:
        for _ in range(iterations):
            norm = torch.sqrt(sum((v * v).sum() for v in vector))
            vector = [v / norm for v in vector]
            product = _hvp(model, params, batches, vector)
            new = sum((h * v).sum() for h, v in zip(product, vector)).item()
            vector = [h.detach() for h in product]
            if estimate and abs(new - estimate) <= tol * abs(estimate):
                estimate = new
                break
            estimate = new
    finally:
        model.train(was_training)
    return estimate


def measure_flatness(model: nn.Module, batches: Iterable, *, radius: float = 0.05, draws: int = 5,
                     hessian_iterations: int = 20, seed: int = 0) -> Dict[str, float]:
    """Both measures on the same batches: loss, sharpness (mean rise under relative noise of `radius`),
    hessian_top (0 iterations: skipped)."""
    batches = _batches(batches)
    result = perturbation_sharpness(model, batches, radius, draws, seed)
    result["radius"] = radius
    if hessian_iterations > 0:
        result["hessian_top"] = top_hessian_eigenvalue(model, batches, hessian_iterations, seed)
    return result
