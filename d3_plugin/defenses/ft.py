"""FT: vanilla fine-tuning on the clean reserved set (the baseline D3 is compared against)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, asdict
from typing import Callable, Dict, Iterable, Optional

from torch import nn

from ..training import cosine, cross_entropy, fit, sgd


@dataclass
class FTConfig:
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    label_smoothing: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model: nn.Module, clean_batches: Iterable, config: Optional[FTConfig] = None, *,
             on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
             progress: Optional[str] = None):
    """Fine-tune a copy of `model` on clean batches with SGD + cosine; returns (model, history)."""
    config = config or FTConfig()
    model = copy.deepcopy(model)
    optimizer = sgd(model.parameters(), config.lr, config.momentum, config.weight_decay)
    history = fit(model, clean_batches, optimizer, cross_entropy(config.label_smoothing), config.epochs,
                  scheduler=cosine(optimizer, config.epochs), on_epoch=on_epoch, progress=progress)
    return model, history
