"""What every attack shares: a trigger applied to uint8 image batches, and poisoning of datasets."""
from __future__ import annotations

from typing import Protocol

import torch

from ..data import ImageSet


class Trigger(Protocol):
    """Maps a uint8 batch (N, C, H, W) to its triggered version (same shape and dtype)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def choose_poison_index(labels: torch.Tensor, ratio: float, target: int, *, clean_label: bool = False,
                        seed: int = 0) -> torch.Tensor:
    """Indices to poison: `ratio` of the whole set, drawn from non-target samples (or, for clean-label
    attacks, from target-class samples only)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"poisoning ratio must be in [0, 1], got {ratio}")
    candidates = torch.nonzero((labels == target) if clean_label else (labels != target)).flatten()
    count = min(len(candidates), round(ratio * len(labels)))
    generator = torch.Generator().manual_seed(seed)
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values


def poison_training_set(train: ImageSet, trigger: Trigger, ratio: float, target: int = 0, *,
                        clean_label: bool = False, seed: int = 0) -> ImageSet:
    """All-to-one poisoning: apply the trigger to the chosen samples and relabel them to `target`."""
    index = choose_poison_index(train.labels, ratio, target, clean_label=clean_label, seed=seed)
    images, labels, poisoned = train.images.clone(), train.labels.clone(), train.poisoned.clone()
    if len(index):
        images[index] = trigger(images[index])
    labels[index] = target
    poisoned[index] = True
    return ImageSet(images, labels, train.labels.clone(), poisoned, train.source_index.clone())


def poison_test_set(test: ImageSet, trigger: Trigger, target: int = 0) -> ImageSet:
    """The backdoor test set: every sample whose true class is not `target`, triggered, labelled `target`."""
    keep = torch.nonzero(test.labels != target).flatten()
    images = trigger(test.images[keep])
    n = len(keep)
    return ImageSet(images, torch.full((n,), target, dtype=torch.long), test.labels[keep].clone(),
                    torch.ones(n, dtype=torch.bool), test.source_index[keep].clone())
