"""Images held as uint8 tensors, and a loader that batches, augments and normalises on tensors."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset: shape, classes, normalisation, augmentation."""

    name: str
    num_classes: int
    channels: int
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    crop_padding: int = 4
    horizontal_flip: bool = False


@dataclass
class ImageSet:
    """A dataset in memory: `images` uint8 (N, C, H, W), `labels` int64 (N,).

    `original_labels` holds the true class of poisoned samples (equal to `labels` for clean ones);
    `poisoned` marks which samples carry a trigger.
    """

    images: torch.Tensor
    labels: torch.Tensor
    original_labels: Optional[torch.Tensor] = None
    poisoned: Optional[torch.Tensor] = None
    source_index: Optional[torch.Tensor] = field(default=None)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        n = len(self.images)
        if len(self.labels) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        self.labels = self.labels.long()
        if self.original_labels is None:
            self.original_labels = self.labels.clone()
        if self.poisoned is None:
            self.poisoned = torch.zeros(n, dtype=torch.bool)
        if self.source_index is None:
            self.source_index = torch.arange(n)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.original_labels[index],
                        self.poisoned[index], self.source_index[index])

    def with_labels(self, labels: torch.Tensor) -> "ImageSet":
        return replace(self, labels=labels)


Draw = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]  # dy, dx, mirrored


def draw_augmentation(n: int, padding: int, flip: bool, generator: torch.Generator) -> Draw:
    """The random crop offsets (dy, dx; None without padding) and flip mask (None without flip) of n images."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator) if padding > 0 else None
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator) if padding > 0 else None
    mirrored = torch.rand(n, generator=generator) < 0.5 if flip else None
    return dy, dx, mirrored


def augment(batch: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, for a whole (N, C, H, W) batch."""
    draw = draw_augmentation(len(batch), padding, flip, generator)
    return apply_augmentation(batch, padding, *(to_device(t, batch.device) for t in draw))


def apply_augmentation(batch: torch.Tensor, padding: int, dy: Optional[torch.Tensor], dx: Optional[torch.Tensor],
                       mirrored: Optional[torch.Tensor]) -> torch.Tensor:
    """Crop the zero-padded batch at offsets (dy, dx) and mirror the images `mirrored` marks (all on its device)."""
    n, _, h, w = batch.shape
    if dy is not None:
        padded = torch.nn.functional.pad(batch, (padding,) * 4)
        rows = (dy[:, None] + torch.arange(h, device=batch.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=batch.device))[:, None, None, :]
        samples = torch.arange(n, device=batch.device)[:, None, None, None]
        channels = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
        batch = padded[samples, channels, rows, cols]
    if mirrored is not None:
        batch = torch.where(mirrored[:, None, None, None], batch.flip(3), batch)
    return batch


def to_device(tensor: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A copy that does not make the host wait for the GPU (a no-op on the CPU)."""
    return None if tensor is None else tensor.to(device, non_blocking=True)


class Loader:
    """Iterates (inputs, labels) batches of an ImageSet on `device`, as float tensors normalised per `spec`.

    Augmentation (random crop + flip per `spec`) happens on the uint8 batch on the device; shuffling and
    augmentation draw from a private generator seeded with `seed`, so runs repeat exactly. An epoch's order
    and augmentation are drawn at its start (in the order batch-by-batch drawing would take them) and sent
    to the device in one non-blocking copy each, so the GPU never waits for the host between batches.
    """

    def __init__(self, data: ImageSet, spec: DatasetSpec, batch_size: int = 256, *, train: bool = False,
                 device: torch.device | str = "cpu", seed: int = 0, drop_last: bool = False):
        if len(data) == 0:
            raise ValueError("cannot build a loader over an empty dataset")
        self.data, self.spec, self.batch_size = data, spec, batch_size
        self.train, self.device, self.drop_last = train, torch.device(device), drop_last
        self.generator = torch.Generator().manual_seed(seed)
        shape = (1, len(spec.mean), 1, 1)
        self.mean = torch.tensor(spec.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(spec.std, device=self.device).view(shape) * 255
        self.labels = data.labels.to(self.device)

    def __len__(self) -> int:
        full, rest = divmod(len(self.data), self.batch_size)
        return full if (self.drop_last and full) or not rest else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        spans = [(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)][:len(self)]
        draws = self.draw_epoch([stop - start for start, stop in spans])
        on_device = to_device(order, self.device)
        for (start, stop), draw in zip(spans, draws):
            images = to_device(self.data.images[order[start:stop]], self.device)
            yield self.prepare(images, draw), self.labels[on_device[start:stop]]

    def draw_epoch(self, sizes: Sequence[int]) -> List[Optional[Draw]]:
        """Each batch's augmentation (None when not training), drawn batch by batch, on the device."""
        if not self.train:
            return [None] * len(sizes)
        draws = [draw_augmentation(size, self.spec.crop_padding, self.spec.horizontal_flip, self.generator)
                 for size in sizes]
        parts = [to_device(torch.cat(kind), self.device) if kind[0] is not None else None for kind in zip(*draws)]
        split = [part.split(list(sizes)) if part is not None else [None] * len(sizes) for part in parts]
        return list(zip(*split))

    def prepare(self, images: torch.Tensor, draw: Optional[Draw] = None) -> torch.Tensor:
        """uint8 batch → normalised float batch on the device (augmented when training: by `draw`, else
        drawn now)."""
        batch = to_device(images, self.device)
        if self.train:
            padding = self.spec.crop_padding
            if draw is None:
                drawn = draw_augmentation(len(batch), padding, self.spec.horizontal_flip, self.generator)
                draw = tuple(to_device(t, self.device) for t in drawn)
            batch = apply_augmentation(batch, padding, *draw)
        return (batch.float() - self.mean) / self.std
