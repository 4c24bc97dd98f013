"""A test-free backdoor probe: how easily one small universal perturbation sends clean images to one class.

A backdoor is a shortcut: one input pattern that sends any image to the target class. So on a backdoored
model some class c can be reached from most clean images with a single, shared perturbation δ_c of small
norm, while on a clean model no class is that easy. For every class c the probe fits δ_c (pixel-space
L∞ ≤ `eps`, by sign-gradient steps on the mean cross-entropy towards c over the images not of class c)
and reports the fraction of those images sent to c:

    score_c = mean over x with y ≠ c of [argmax f(clip(x + δ_c)) = c]
    probe   = max_c score_c   (and the class that attains it)

It needs only clean labelled images (a held-out slice of the reserved set), never test or poisoned data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .adversarial import InputBox, evaluating


@dataclass
class ProbeConfig:
    eps: float = 0.1  # L∞ budget in pixel units ([0, 1] scale)
    steps: int = 20
    step_size: float = 0.02  # pixel units per sign-gradient step

    def __post_init__(self):
        if not (self.eps > 0 and self.step_size > 0 and self.steps >= 1):
            raise ValueError(f"the probe needs eps > 0, step_size > 0 and steps ≥ 1, got {self}")


def _stack(batches) -> Tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = zip(*[(x, y) for x, y in batches])
    return torch.cat(inputs), torch.cat(labels)


def universal_perturbation(model: nn.Module, inputs: torch.Tensor, target: int, box: InputBox,
                           config: ProbeConfig) -> torch.Tensor:
    """δ (1, C, H, W), normalised units, pixel L∞ ≤ eps, that pushes every input towards `target`."""
    radius = config.eps * box.scale
    delta = torch.zeros_like(inputs[:1])
    labels = torch.full((len(inputs),), target, dtype=torch.long, device=inputs.device)
    for _ in range(config.steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(box.clamp(inputs + delta)), labels)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach() - config.step_size * box.scale * grad.sign()
        delta = torch.maximum(torch.minimum(delta, radius), -radius)
    return delta.detach()


def class_perturbations(model: nn.Module, batches, spec, config: ProbeConfig | None = None,
                        classes: Sequence[int] | None = None) -> Dict[int, Tuple[float, torch.Tensor]]:
    """(score_c, δ_c) for each class c (module docstring); `batches` yields clean (inputs, labels)."""
    config = config or ProbeConfig()
    inputs, labels = _stack(batches)
    box = InputBox.from_spec(spec, inputs.device)
    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    found: Dict[int, Tuple[float, torch.Tensor]] = {}
    with evaluating(model):
        for target in classes:
            others = inputs[labels != target]
            if len(others) == 0:
                continue
            delta = universal_perturbation(model, others, target, box, config)
            with torch.no_grad():
                predicted = model(box.clamp(others + delta)).argmax(1)
            found[target] = ((predicted == target).float().mean().item(), delta)
    return found


def class_scores(model: nn.Module, batches, spec, config: ProbeConfig | None = None,
                 classes: Sequence[int] | None = None) -> Dict[int, float]:
    """score_c for each class c (module docstring); `batches` yields clean (inputs, labels)."""
    return {c: score for c, (score, _) in class_perturbations(model, batches, spec, config, classes).items()}


def backdoor_probe(model: nn.Module, batches, spec, config: ProbeConfig | None = None,
                   classes: Sequence[int] | None = None) -> Dict[str, float]:
    """{'probe': max_c score_c, 'probe_class': that c, 'probe_median': the median class score}.

    `classes` limits the probe to suspected targets (e.g. the top classes of the model before a defense),
    which makes it that many times cheaper."""
    scores = class_scores(model, batches, spec, config, classes)
    if not scores:
        raise ValueError("the backdoor probe needs clean images of at least two classes")
    ranked: List[float] = sorted(scores.values())
    best = max(scores, key=scores.get)
    return {"probe": scores[best], "probe_class": float(best), "probe_median": ranked[len(ranked) // 2]}
