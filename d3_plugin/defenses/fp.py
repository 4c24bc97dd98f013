"""FP: fine-pruning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018, arXiv 1805.12185).

1. Rank the features entering the classifier (the first nn.Linear after the last convolution: the
   pooled channels of the last conv stage) by their mean activation on the clean reserved set.
2. Prune them, least active first, in steps of `prune_step` of the features, while the accuracy on
   the clean reserved set stays within a relative drop `acc_ratio` of the unpruned model's (never
   test data). Pruning zeroes the classifier's weight columns and keeps them zero.
3. Fine-tune the pruned model on the clean reserved set (SGD + cosine).
Defaults follow BackdoorBench's config/defense/fp/cifar10.yaml (acc_ratio 0.1, once_prune_ratio 0.01,
100 epochs, lr 0.01, wd 5e-4); BackdoorBench measures the accuracy drop on the clean test set.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..data import Loader
from ..evaluation import evaluate
from ..training import cosine, cross_entropy, fit, sgd
from ..registry import register_defense


@dataclass
class FPConfig:
    acc_ratio: float = 0.1
    prune_step: float = 0.01
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    layer: Optional[str] = None  # the nn.Linear whose inputs are pruned; None = first Linear after the last conv
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.prune_step <= 1 or not 0 <= self.acc_ratio <= 1:
            raise ValueError("FP needs 0 < prune_step ≤ 1 and 0 ≤ acc_ratio ≤ 1")

    def to_dict(self) -> dict:
        return asdict(self)


def prune_layer(model: nn.Module, name: Optional[str] = None) -> nn.Linear:
    """The named nn.Linear, or the first nn.Linear registered after the model's last Conv2d."""
    modules = list(model.named_modules())
    if name is not None:
        layer = dict(modules).get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"FP layer {name!r} is not an nn.Linear of the model; pick one from named_modules()")
        return layer
    last_conv = max((i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)), default=-1)
    for _, module in modules[last_conv + 1:]:
        if isinstance(module, nn.Linear):
            return module
    raise ValueError("FP found no nn.Linear after the last convolution; name the layer to prune with `layer`")


def plain_batches(clean_batches) -> Iterable:
    """The reserved set without augmentation (a Loader's data re-wrapped), else the batches as given."""
    if isinstance(clean_batches, Loader):
        return Loader(clean_batches.data, clean_batches.spec, clean_batches.batch_size,
                      device=clean_batches.device)
    return clean_batches


@torch.no_grad()
def mean_activation(model: nn.Module, layer: nn.Linear, batches: Iterable) -> torch.Tensor:
    total, count = 0.0, 0
    store = {}
    handle = layer.register_forward_pre_hook(lambda _m, inputs: store.__setitem__("x", inputs[0]))
    model.eval()
    try:
        for inputs, _ in batches:
            model(inputs)
            total = total + store["x"].flatten(1).sum(0)
            count += len(inputs)
    finally:
        handle.remove()
    return total / max(count, 1)


def choose_pruned(model: nn.Module, layer: nn.Linear, batches: Iterable, config: FPConfig) -> Tuple[torch.Tensor, float]:
    """Largest least-active prefix whose pruning keeps reserved-set accuracy within `acc_ratio`."""
    order = torch.argsort(mean_activation(model, layer, batches))
    step = max(1, math.ceil(layer.in_features * config.prune_step))
    mask = torch.ones(layer.in_features, device=layer.weight.device)
    handle = layer.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * mask,))
    try:
        base = evaluate(model, batches)["acc"]
        kept = 0
        for count in range(step, layer.in_features, step):
            mask[order[:count]] = 0
            if base - evaluate(model, batches)["acc"] >= config.acc_ratio * base:
                break
            kept = count
    finally:
        handle.remove()
    return order[:kept], base


@register_defense("fp", config=FPConfig)
def fine_prune(model: nn.Module, clean_batches: Iterable, config: Optional[FPConfig] = None, *,
               on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
               progress: Optional[str] = None):
    """Prune a copy of `model` by clean activation, then fine-tune it; returns (model, history)."""
    config = config or FPConfig()
    model = copy.deepcopy(model)
    layer = prune_layer(model, config.layer)
    pruned, _ = choose_pruned(model, layer, plain_batches(clean_batches), config)

    @torch.no_grad()
    def keep_pruned(_model=None):
        layer.weight[:, pruned] = 0

    keep_pruned()
    optimizer = sgd(model.parameters(), config.lr, config.momentum, config.weight_decay)
    history = fit(model, clean_batches, optimizer, cross_entropy(), config.epochs,
                  scheduler=cosine(optimizer, config.epochs), after_step=keep_pruned,
                  on_epoch=on_epoch, progress=progress)
    for row in history:
        row["pruned"] = float(len(pruned))
    if not history:
        history = [{"epoch": 0, "pruned": float(len(pruned))}]
    return model, history
