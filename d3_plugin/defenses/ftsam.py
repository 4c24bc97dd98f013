"""FT-SAM: fine-tuning with (adaptive) sharpness-aware minimisation on the clean reserved set.

Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023 (arXiv 2304.11823). Defaults follow BackdoorBench's
config/defense/ft-sam/cifar10.yaml: ASAM with ρ = 2 (constant: rho_max = rho_min), label smoothing 0.1,
SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, 100 epochs, batch 256.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Optional

from torch import nn

from ..training import train_classifier
from ..registry import register_defense


@dataclass
class FTSAMConfig:
    rho: float = 2.0
    adaptive: bool = True
    label_smoothing: float = 0.1
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@register_defense("ft-sam", config=FTSAMConfig)
def ft_sam(model: nn.Module, clean_batches: Iterable, config: Optional[FTSAMConfig] = None, *,
           on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
           progress: Optional[str] = None):
    """Fine-tune a copy of `model` with SAM/ASAM; returns (model, history)."""
    config = config or FTSAMConfig()
    return train_classifier(model, clean_batches, epochs=config.epochs, lr=config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
                            sam_rho=config.rho, adaptive_sam=config.adaptive, on_epoch=on_epoch, progress=progress)
