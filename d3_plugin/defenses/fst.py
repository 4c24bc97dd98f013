"""FST: feature shift tuning (Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification through
Feature Shift Tuning", NeurIPS 2023, arXiv 2310.01875).

The linear head is re-initialised (uniform ±1/√fan_in, as nn.Linear does), then the whole model is
fine-tuned on clean data with
    CE + α · ⟨W, W_ori⟩          (W: head weight, W_ori: its backdoored value)
which pushes W away from W_ori's direction, and after every step W is rescaled to ‖W_ori‖_F so the
penalty cannot be lowered by shrinking W. Defaults (authors' code and paper, CIFAR-10): α = 0.2,
10 epochs, SGD lr 0.01, momentum 0.9, no weight decay, cosine schedule.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..d3 import project
from ..training import cosine, fit, sgd
from ..registry import register_defense


@dataclass
class FSTConfig:
    alpha: float = 0.2
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    head: Optional[str] = None  # module name of the classifier; None = the last nn.Linear
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def classifier_head(model: nn.Module, name: Optional[str] = None) -> nn.Linear:
    """The named nn.Linear, or the model's last nn.Linear."""
    modules = dict(model.named_modules())
    if name is not None:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"FST head {name!r} is not an nn.Linear of the model; pick one from named_modules()")
        return modules[name]
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("FST needs an nn.Linear classifier head; the model has none (set `head`)")
    return linears[-1]


@torch.no_grad()
def reinitialise(layer: nn.Linear, generator: torch.Generator) -> None:
    bound = 1.0 / math.sqrt(layer.in_features)
    for p in (layer.weight, layer.bias):
        if p is not None:
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)


@register_defense("fst", config=FSTConfig)
def fst(model: nn.Module, clean_batches: Iterable, config: Optional[FSTConfig] = None, *,
        on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
        progress: Optional[str] = None):
    """Feature shift tuning of a copy of `model`; returns (model, history)."""
    config = config or FSTConfig()
    model = copy.deepcopy(model)
    head = classifier_head(model, config.head)
    original = head.weight.detach().clone()
    weights, norms = {"head": head.weight}, {"head": torch.linalg.vector_norm(original)}
    reinitialise(head, torch.Generator().manual_seed(config.seed))

    def objective(net, inputs, labels):
        ce = F.cross_entropy(net(inputs), labels)
        shift = (head.weight * original).sum()
        loss = ce + config.alpha * shift
        return loss, {"loss": loss.detach(), "clean_loss": ce.detach(), "inner": shift.detach()}

    optimizer = sgd(model.parameters(), config.lr, config.momentum, config.weight_decay)
    history = fit(model, clean_batches, optimizer, objective, config.epochs,
                  scheduler=cosine(optimizer, config.epochs), after_step=lambda _: project(weights, norms),
                  on_epoch=on_epoch, progress=progress)
    return model, history
