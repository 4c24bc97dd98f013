"""The adaptive attack of the D3 paper (§4.4): push a backdoored model into a flat minimum by
continuing training on its poisoned training set with sharpness-aware minimisation.

Adaptive SAM (perturbation scaled by |w|) is the default; plain SAM is an option. Mind the scale:
ρ is the radius of the weight perturbation — in ASAM's |w|-normalised coordinates ρ = 1–3 means a
perturbation comparable to the weights themselves per unit of normalised gradient, which is the
paper's range; for plain SAM ρ is an absolute L2 radius over all weights, so ρ = 1–3 is enormous
(typical plain-SAM values are 0.05–0.1) and can wreck training.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable, Dict, Optional

from torch import nn

from ..data import DatasetSpec, ImageSet, Loader
from ..training import EpochCheckpoint, train_classifier
from .training import TrainConfig


@dataclass
class FlattenConfig:
    rho: float = 2.0
    adaptive: bool = True
    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = TrainConfig.batch_size
    seed: int = 0

    def __post_init__(self):
        if self.rho <= 0 or self.epochs < 1:
            raise ValueError("SAM flattening needs rho > 0 and at least one epoch")

    def to_dict(self) -> dict:
        return asdict(self)


def sam_flatten(model: nn.Module, poisoned_train: ImageSet, spec: DatasetSpec, config: FlattenConfig, *,
                device="cpu", on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
                eval_every: int = 1, progress: Optional[str] = None, checkpoint: Optional[EpochCheckpoint] = None):
    """Train a copy of `model` on the poisoned set with (A)SAM + SGD + cosine; returns (model, history).
    `on_epoch` runs every `eval_every` epochs and after the last; `checkpoint`: resume from / save after
    every epoch (fit)."""
    batches = Loader(poisoned_train, spec, config.batch_size, train=True, device=device, seed=config.seed)
    return train_classifier(model, batches, epochs=config.epochs, lr=config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, sam_rho=config.rho, adaptive_sam=config.adaptive,
                            device=device, on_epoch=on_epoch, eval_every=eval_every, progress=progress,
                            checkpoint=checkpoint)
