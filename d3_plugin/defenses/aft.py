"""AFT / PBE — adversarial fine-tuning and Progressive Backdoor Erasing (Mu et al., CVPR 2023,
"Progressive Backdoor Erasing via connecting Backdoor and Adversarial Attacks").

Observation: untargeted adversarial examples of a backdoored model behave like triggered inputs, so
fine-tuning on them (with correct labels) erases the backdoor.

AFT (clean reserved data): for the first `adv_epochs` epochs every batch is replaced by its untargeted
PGD adversarial examples (pixel L∞ ε = 6/255, 7 steps of ε/5, no random start, model in eval mode
while attacking) and the model is trained on them with the batch's labels; the remaining epochs are
plain clean fine-tuning. Both phases are `fit` runs sharing one SGD optimizer and cosine schedule.

PBE (`progressive=True`, no trusted clean data): the data may be poisoned and its labels are not
trusted. Labels are the original model's predictions (`labels="predicted"`, default) or the data's
own. Round 0 adversarially fine-tunes on a random `initial_fraction`; afterwards every sample is
scored by the cosine similarity between the original and the current model's logits (samples the
purified model still agrees on look clean), and round r fine-tunes on the top `keep_fractions[r−1]`:
one adversarial epoch, then clean epochs.

Honest notes on what differs from the authors' code: cosine schedule instead of their multi-step
one; PBE's first-round set is drawn from the given data, and their "partial" adversarial epoch
(only the first ~30 batches) is a whole adversarial epoch here.

Defaults and their source: eps=6/255, steps=7 (issue / paper), step_size=eps/5, 20 epochs of which 3
adversarial, SGD momentum 0.9, weight decay 5e-4, 4 progressive rounds from 5 % keeping 20/50/70 %,
10 epochs per round (authors' aft_main.py / pbe_main.py); lr=0.01 (ours, as FT).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, asdict, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Loader
from ..training import cosine, cross_entropy, fit, sgd
from ..adversarial import InputBox, input_box, untargeted_pgd
from ..registry import register_defense

LABELS = ("predicted", "given")


@dataclass
class AFTConfig:
    eps: float = 6 / 255
    steps: int = 7
    step_size: Optional[float] = None  # None: eps / 5
    epochs: int = 20
    adv_epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    progressive: bool = False
    labels: str = "predicted"
    initial_fraction: float = 0.05
    keep_fractions: Sequence[float] = field(default_factory=lambda: [0.2, 0.5, 0.7])
    round_epochs: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if self.adv_epochs < 0 or self.epochs < 0:
            raise ValueError(f"epochs and adv_epochs must be ≥ 0, got {self.epochs} and {self.adv_epochs}")
        self.adv_epochs = min(self.adv_epochs, self.epochs)  # a shorter budget caps the adversarial epochs
        fractions = [self.initial_fraction, *self.keep_fractions]
        if any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"initial_fraction and keep_fractions must be in (0, 1], got {fractions}")

    @property
    def pgd_step(self) -> float:
        return self.step_size if self.step_size is not None else self.eps / 5

    def to_dict(self) -> dict:
        return {**asdict(self), "keep_fractions": list(self.keep_fractions)}


def adversarial_objective(box: InputBox, config: AFTConfig):
    """Cross-entropy on untargeted PGD examples of the batch (generated with the model in eval mode)."""
    def objective(model, inputs, labels):
        adversarial = untargeted_pgd(model, inputs, labels, box, config.eps, config.pgd_step, config.steps)
        loss = F.cross_entropy(model(adversarial), labels)
        return loss, {"loss": loss.detach()}
    return objective


def adversarial_finetune(model: nn.Module, batches, box: InputBox, config: AFTConfig, epochs: int, adv_epochs: int,
             on_epoch=None, progress=None) -> List[Dict[str, float]]:
    """`adv_epochs` adversarial then `epochs − adv_epochs` clean epochs, one optimizer and schedule."""
    optimizer = sgd(model.parameters(), config.lr, config.momentum, config.weight_decay)
    scheduler = cosine(optimizer, epochs)
    history = fit(model, batches, optimizer, adversarial_objective(box, config), adv_epochs,
                  scheduler=scheduler, on_epoch=on_epoch, progress=progress)
    clean = fit(model, batches, optimizer, cross_entropy(), epochs - adv_epochs, scheduler=scheduler,
                on_epoch=None if on_epoch is None else (lambda e, m: on_epoch(e + adv_epochs, m)),
                progress=progress)
    for row in clean:
        row["epoch"] += adv_epochs
    return history + clean


@torch.no_grad()
def logits_of(model: nn.Module, loader: Loader) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x) for x, _ in loader])
    model.train(was_training)
    return out


def progressive(model: nn.Module, batches, box: InputBox, config: AFTConfig, on_epoch=None, progress=None):
    """PBE: adversarial fine-tuning on progressively larger subsets that look clean."""
    data = getattr(batches, "data", None)
    if data is None:
        raise ValueError("progressive AFT (PBE) needs a d3_plugin Loader (with .data) to pick subsets from")
    ordered = Loader(data, batches.spec, batches.batch_size, device=batches.device)
    original = logits_of(model, ordered)
    labels = original.argmax(1).cpu() if config.labels == "predicted" else data.labels
    relabelled = data.with_labels(labels)
    n = len(data)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    index = index[:max(1, math.ceil(config.initial_fraction * n))]
    history: List[Dict[str, float]] = []
    for r, keep in enumerate([None, *config.keep_fractions]):
        if keep is not None:
            similarity = F.cosine_similarity(original, logits_of(model, ordered), dim=1).cpu()
            index = similarity.argsort(descending=True)[:max(1, math.ceil(keep * n))]
        subset = Loader(relabelled.subset(index), batches.spec, batches.batch_size, train=batches.train,
                        device=batches.device, seed=config.seed + r)
        adv = config.round_epochs if r == 0 else min(1, config.round_epochs)
        offset = len(history)
        rows = adversarial_finetune(model, subset, box, config, config.round_epochs, adv,
                        None if on_epoch is None else (lambda e, m, o=offset: on_epoch(e + o, m)), progress)
        for row in rows:
            row.update(epoch=row["epoch"] + offset, round=r, subset=len(index))
        history += rows
    return history


@register_defense("aft", config=AFTConfig)
def defend(model: nn.Module, clean_batches, config: Optional[AFTConfig] = None, *,
           on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
           progress: Optional[str] = None):
    """AFT (or PBE with `progressive=True`) on a copy of `model`; returns (purified, history)."""
    config = config or AFTConfig()
    model = copy.deepcopy(model)
    box = input_box(clean_batches)
    if config.progressive:
        history = progressive(model, clean_batches, box, config, on_epoch, progress)
    else:
        history = adversarial_finetune(model, clean_batches, box, config, config.epochs, config.adv_epochs, on_epoch, progress)
    return model, history
