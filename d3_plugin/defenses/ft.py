"""FT: vanilla fine-tuning on the clean reserved set (the baseline D3 is compared against)."""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable, Dict, Iterable, Optional

from torch import nn

from ..training import train_classifier
from ..registry import register_defense


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


@register_defense("ft", config=FTConfig)
def finetune(model: nn.Module, clean_batches: Iterable, config: Optional[FTConfig] = None, *,
             on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
             progress: Optional[str] = None):
    """Fine-tune a copy of `model` on clean batches with SGD + cosine; returns (model, history)."""
    config = config or FTConfig()
    return train_classifier(model, clean_batches, epochs=config.epochs, lr=config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
                            on_epoch=on_epoch, progress=progress)
