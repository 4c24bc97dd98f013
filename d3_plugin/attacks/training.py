"""Training a backdoored model on a poisoned set, with the common trainer."""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable, Dict, Optional

from torch import nn

from ..data import DatasetSpec, ImageSet, Loader
from ..training import EpochCheckpoint, train_classifier


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# Architectures whose records fail at TrainConfig's lr (docs/attacks.md): PreAct-ResNet18 at 0.05 never
# implanted BadNets (11.5 % ASR) and left Blended at 57.8 % ACC; at BackdoorBench's 0.01 both work.
MODEL_LR = {"preactresnet18": 0.01}


def default_lr(model: str) -> float:
    """The training lr for `model` when none is given."""
    return MODEL_LR.get(model, TrainConfig.lr)


def train_model(model: nn.Module, data: ImageSet, spec: DatasetSpec, config: TrainConfig, *, device="cpu",
                on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None, eval_every: int = 1,
                progress: Optional[str] = None, checkpoint: Optional[EpochCheckpoint] = None):
    """Standard SGD + cosine training with augmentation; returns (trained copy, history). `on_epoch` runs
    every `eval_every` epochs and after the last; `checkpoint`: resume from / save after every epoch (fit)."""
    batches = Loader(data, spec, config.batch_size, train=True, device=device, seed=config.seed)
    return train_classifier(model, batches, epochs=config.epochs, lr=config.lr, momentum=config.momentum,
                            weight_decay=config.weight_decay, device=device, on_epoch=on_epoch, eval_every=eval_every,
                            progress=progress, checkpoint=checkpoint)
