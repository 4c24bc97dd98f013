"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), at CPU scale.

The trigger is not a fixed pattern but a function of the image: a generator network G maps an image x
to a pattern G(x) and a mask network M to a mask M(x) ∈ [0, 1]; the poisoned image is

    B(x) = x + M(x) ⊙ (G(x) − x)        (pixels in [0, 1]; stored as uint8 after rounding)

Two phases, as in the paper:
1. M is trained alone (`mask_epochs`) with a norm loss that keeps each mask's mean below
   `mask_density` and a diversity loss ‖x − x'‖ / ‖M(x) − M(x')‖ that makes masks differ between
   images; it is then frozen.
2. The classifier f and G are trained together. In every batch a fraction ρ_b (`ratio`) gets its own
   trigger B(x) and the target label; a further fraction ρ_c (`cross_ratio`) gets the trigger of another
   image of the batch, x + M(x') ⊙ (G(x') − x), and keeps its true label ("cross" samples: a trigger is
   only valid for the image it was made for); the rest stays clean. The loss is the cross-entropy over the
   whole batch plus λ_div·‖x − x'‖ / ‖G(x) − G(x')‖ on G. f is trained with the package's recipe (SGD,
   momentum, weight decay, cosine, crop augmentation before the trigger), G with Adam. Rounding to uint8
   is applied with a straight-through gradient, so training sees exactly the images that are stored.

G and M are small conv encoder-decoders without batch norm, so a trigger depends on its image alone,
never on the batch it was computed in. `InputAwareTrigger` wraps the trained pair as an ordinary
`Trigger` (uint8 batch → uint8 batch, each image with its own trigger), so the backdoor test set and
the record's poisoned training set are materialised with the package's `poison_test_set` /
`poison_training_set` and every defense and evaluation reads them unchanged.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetSpec, ImageSet, Loader
from ..evaluation import evaluate
from ..files import torch_save
from ..checks import is_integer, is_number
from ..training import cosine, fit, sgd
from .base import poison_test_set, poison_training_set
from .training import TrainConfig

NETWORKS_FILE = "input_aware_networks.pt"
EPSILON = 1e-6


@dataclass
class InputAwareConfig(TrainConfig):
    """Defaults sized for a small CNN on Fashion-MNIST on a CPU (see docs/attacks.md for the measured run).

    ratio / cross_ratio: ρ_b / ρ_c, fractions of every batch (and of the materialised poisoned training
    set); generator_lr: Adam for G; mask_*: the mask network's pre-training (mask_density: the paper's
    0.032 doubled for 28×28 images and a 16-epoch budget); lambda_div: weight of the
    diversity losses of G and M; lambda_norm: weight of M's density loss; width: channels of G's first
    layer (M uses half); eval_every: run `on_epoch` every this many epochs (and after the last; each
    evaluation regenerates the backdoor test set with the current G)."""

    epochs: int = 16              # the classifier's recipe is TrainConfig's (lr, momentum, ...)
    ratio: float = 0.1
    cross_ratio: float = 0.1
    target: int = 0
    generator_lr: float = 0.01
    mask_epochs: int = 2
    mask_lr: float = 0.01
    mask_density: float = 0.06
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    width: int = 16
    eval_every: int = 1

    def __post_init__(self):
        checks = [
            (is_integer(self.epochs) and self.epochs >= 1, "epochs must be an integer ≥ 1"),
            (is_integer(self.mask_epochs) and self.mask_epochs >= 0, "mask_epochs must be an integer ≥ 0"),
            (is_integer(self.batch_size) and self.batch_size >= 2, "batch_size must be an integer ≥ 2"),
            (is_integer(self.seed) and self.seed >= 0, "seed must be an integer ≥ 0"),
            (is_integer(self.target) and self.target >= 0, "target must be an integer ≥ 0"),
            (is_integer(self.width) and self.width >= 2, "width must be an integer ≥ 2"),
            (is_integer(self.eval_every) and self.eval_every >= 1, "eval_every must be an integer ≥ 1"),
            (is_number(self.ratio) and 0 <= self.ratio < 1, "ratio must be in [0, 1)"),
            (is_number(self.cross_ratio) and self.cross_ratio >= 0, "cross_ratio must be ≥ 0"),
            (is_number(self.ratio) and is_number(self.cross_ratio) and self.ratio + self.cross_ratio <= 1,
             "ratio + cross_ratio must be ≤ 1"),
            (is_number(self.mask_density) and 0 < self.mask_density <= 1, "mask_density must be in (0, 1]"),
            (is_number(self.momentum) and 0 <= self.momentum < 1, "momentum must be in [0, 1)"),
        ]
        checks += [(is_number(getattr(self, name)) and getattr(self, name) > 0, f"{name} must be a number > 0")
                   for name in ("lr", "generator_lr", "mask_lr")]
        checks += [(is_number(getattr(self, name)) and getattr(self, name) >= 0, f"{name} must be a number ≥ 0")
                   for name in ("weight_decay", "lambda_div", "lambda_norm")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"input-aware: {message}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]


# --------------------------------------------------------------------------------------------- networks

class EncoderDecoder(nn.Module):
    """Image in [0, 1] → map in [0, 1] of the same size with `out_channels` channels: conv, pool, conv,
    pool, conv down to a quarter of the size; upsample, conv, upsample, conv back; sigmoid output. No batch
    norm: each image's output depends on that image alone."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()

        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))

        self.down1, self.down2 = conv(in_channels, width), conv(width, 2 * width)
        self.middle = conv(2 * width, 2 * width)
        self.up = conv(2 * width, width)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        h = self.down1(x * 2 - 1)
        half = h.shape[-2:]
        h = self.down2(F.max_pool2d(h, 2))
        h = self.middle(F.max_pool2d(h, 2))
        h = self.up(F.interpolate(h, size=half, mode="nearest"))
        return torch.sigmoid(self.out(F.interpolate(h, size=size, mode="nearest")))


def build_networks(channels: int, width: int, seed: int) -> Tuple[EncoderDecoder, EncoderDecoder]:
    """(G, M), initialised on the CPU from `seed` without touching the global random state: only the CPU
    generator is seeded (torch.manual_seed would reseed every GPU's too), and it is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        generator = EncoderDecoder(channels, channels, width)
        mask = EncoderDecoder(channels, 1, max(2, width // 2))
    return generator, mask


def blend(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x + m ⊙ (p − x), rounded to the uint8 grid with a straight-through gradient (pixels in [0, 1])."""
    mixed = images + mask * (pattern - images)
    return mixed + (torch.round(mixed * 255) / 255 - mixed).detach()


def _pair_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance."""
    return (a - b).flatten(1).pow(2).mean(1).add(EPSILON).sqrt()


def diversity_loss(images: torch.Tensor, partners: torch.Tensor, out: torch.Tensor,
                   out_partners: torch.Tensor) -> torch.Tensor:
    """mean ‖x − x'‖ / ‖N(x) − N(x')‖ over pairs: small when a network's outputs differ between images
    at least as much as the images do; large for a constant output."""
    return (_pair_distance(images, partners) / (_pair_distance(out, out_partners) + EPSILON)).mean()


def _partners(n: int, device) -> torch.Tensor:
    """For each position of a batch of n, another position (half the batch away)."""
    return (torch.arange(n, device=device) + max(1, n // 2)) % n


@dataclass
class InputAwareTrigger:
    """A trained (G, M) pair as a `Trigger`: uint8 (N, C, H, W) → uint8, every image with its own trigger.
    `cross(images, partners)` applies the trigger made for `partners[i]` to `images[i]`."""

    generator: EncoderDecoder
    mask: EncoderDecoder
    batch_size: int = 512

    def __post_init__(self):
        self.generator.eval()
        self.mask.eval()

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def _apply(self, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.shape != sources.shape:
            raise ValueError("the input-aware trigger takes uint8 batches (N, C, H, W) of equal shape")
        out = torch.empty_like(images)
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = images[start:start + self.batch_size].to(self.device).float() / 255
                s = sources[start:start + self.batch_size].to(self.device).float() / 255
                mixed = blend(x, self.generator(s), self.mask(s))
                out[start:start + self.batch_size] = (mixed * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._apply(images, images)

    def cross(self, images: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        return self._apply(images, partners)

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """M(x) for a uint8 batch (float, N×1×H×W)."""
        with torch.no_grad():
            return torch.cat([self.mask(images[s:s + self.batch_size].to(self.device).float() / 255).cpu()
                              for s in range(0, len(images), self.batch_size)])

    def save(self, path: str | os.PathLike, config: Optional[InputAwareConfig] = None) -> Path:
        """G's and M's weights (plain state dicts) and the settings needed to rebuild them."""
        channels = self.generator.down1[0].in_channels
        width = self.generator.down1[0].out_channels
        torch_save({"generator": self.generator.state_dict(), "mask": self.mask.state_dict(),
                    "channels": channels, "width": width,
                    "config": None if config is None else config.to_dict()}, Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InputAwareTrigger":
        from ..record_io.safe_load import safe_torch_load

        state = safe_torch_load(Path(path))
        generator, mask = build_networks(int(state["channels"]), int(state["width"]), 0)
        generator.load_state_dict(state["generator"])
        mask.load_state_dict(state["mask"])
        return cls(generator, mask)


# --------------------------------------------------------------------------------------------- training

class _Joint:
    """Two optimizers driven as one by the common `fit` loop (zero_grad, step(closure), param_groups)."""

    def __init__(self, classifier: torch.optim.Optimizer, generator: torch.optim.Optimizer):
        self.classifier, self.generator = classifier, generator
        self.param_groups = classifier.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.classifier.zero_grad(set_to_none=set_to_none)
        self.generator.zero_grad(set_to_none=set_to_none)

    def step(self, closure):
        loss = closure()
        self.classifier.step()
        self.generator.step()
        return loss


class _Schedules:
    def __init__(self, *schedules):
        self.schedules = schedules

    def step(self) -> None:
        for schedule in self.schedules:
            schedule.step()


def _unnormalise(spec: DatasetSpec, device) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(spec.mean), 1, 1)
    return (torch.tensor(spec.mean, device=device).view(shape), torch.tensor(spec.std, device=device).view(shape))


def train_mask(mask: EncoderDecoder, data: ImageSet, spec: DatasetSpec, config: InputAwareConfig, *,
               device="cpu", progress: Optional[str] = None) -> List[Dict[str, float]]:
    """Phase 1: M alone, λ_norm·mean(relu(mean M(x) − density)) + λ_div·diversity, Adam + cosine."""
    mean, std = _unnormalise(spec, device)
    optimizer = torch.optim.Adam(mask.parameters(), lr=config.mask_lr, betas=(0.5, 0.9))

    def objective(net, inputs, labels):
        x = inputs * std + mean
        out = net(x)
        partner = _partners(len(x), x.device)
        norm = F.relu(out.flatten(1).mean(1) - config.mask_density).mean()
        div = diversity_loss(x, x[partner], out, out[partner])
        loss = config.lambda_norm * norm + config.lambda_div * div
        return loss, {"mask_loss": loss.detach(), "mask_norm": norm.detach(), "mask_div": div.detach(),
                      "mask_mean": out.detach().mean()}

    batches = Loader(data, spec, config.batch_size, train=True, device=device, seed=config.seed + 1)
    return fit(mask, batches, optimizer, objective, config.mask_epochs,
               scheduler=cosine(optimizer, config.mask_epochs), progress=progress)


def input_aware_objective(generator: EncoderDecoder, mask: EncoderDecoder, spec: DatasetSpec,
                          config: InputAwareConfig, device):
    """Phase 2's per-batch objective over (classifier, normalised augmented batch, true labels)."""
    mean, std = _unnormalise(spec, device)

    def objective(model, inputs, labels):
        n = len(inputs)
        n_bd = int(config.ratio * n)
        n_cross = min(int(config.cross_ratio * n), n - n_bd)
        div = inputs.new_zeros(())
        if n_bd + n_cross:
            x = inputs[:n_bd + n_cross] * std + mean            # the samples to modify, pixels in [0, 1]
            partners = (inputs[_partners(n, inputs.device)][n_bd:n_bd + n_cross]) * std + mean
            sources = torch.cat([x, partners])                    # own images, then the cross partners
            patterns = generator(sources)
            with torch.no_grad():
                masks = mask(sources)
            own, theirs = slice(0, n_bd), slice(n_bd + n_cross, n_bd + 2 * n_cross)
            modified = torch.cat([blend(x[own], patterns[own], masks[own]),
                                  blend(x[n_bd:], patterns[theirs], masks[theirs])])
            inputs = torch.cat([(modified - mean) / std, inputs[n_bd + n_cross:]])
            labels = torch.cat([labels.new_full((n_bd,), config.target), labels[n_bd:]])
            if n_cross:
                div = diversity_loss(x[n_bd:], sources[n_bd + n_cross:], patterns[n_bd:n_bd + n_cross],
                                     patterns[theirs])
        logits = model(inputs).float()
        ce = F.cross_entropy(logits, labels)
        stats = {"loss": ce.detach(), "div": div.detach()}
        if n_bd:
            stats["train_asr"] = (logits[:n_bd].argmax(1) == config.target).float().mean().detach()
        return ce + config.lambda_div * div, stats

    return objective


OnEpoch = Callable[[int, nn.Module, "InputAwareTrigger"], Dict[str, float]]


def input_aware(model: nn.Module, train: ImageSet, spec: DatasetSpec, config: InputAwareConfig, *,
                device="cpu", on_epoch: Optional[OnEpoch] = None, progress: Optional[str] = None):
    """Train the input-aware backdoor on the clean set `train`: mask pre-training, then classifier + G.

    Returns (trained copy of `model`, `InputAwareTrigger` (on the CPU), history): the history holds the
    mask pre-training rows (phase "mask") and one row per epoch of phase 2 (phase "train") with the
    batch losses, G's diversity loss, the in-batch ASR and whatever `on_epoch(epoch, model, trigger)`
    returns (see `epoch_evaluator`)."""
    if not 0 <= config.target < spec.num_classes:
        raise ValueError(f"input-aware: target {config.target} is not a class of {spec.name} "
                         f"(0–{spec.num_classes - 1})")
    device = torch.device(device)
    generator, mask = build_networks(spec.channels, config.width, config.seed)
    generator, mask = generator.to(device), mask.to(device)
    history: List[Dict[str, float]] = []
    if config.mask_epochs:
        rows = train_mask(mask, train, spec, config, device=device,
                          progress=None if progress is None else f"{progress} mask")
        history += [{**row, "phase": "mask"} for row in rows]
    mask.eval()
    for parameter in mask.parameters():
        parameter.requires_grad_(False)

    model = copy.deepcopy(model).to(device)
    classifier_opt = sgd(model.parameters(), config.lr, config.momentum, config.weight_decay)
    generator_opt = torch.optim.Adam(generator.parameters(), lr=config.generator_lr, betas=(0.5, 0.9))
    trigger = InputAwareTrigger(generator, mask)

    def evaluate_epoch(epoch: int, trained: nn.Module) -> Dict[str, float]:
        generator.eval()
        try:
            return {**(on_epoch(epoch, trained, trigger) if on_epoch is not None else {}), "phase": "train"}
        finally:
            generator.train()

    generator.train()
    batches = Loader(train, spec, config.batch_size, train=True, device=device, seed=config.seed)
    rows = fit(model, batches, _Joint(classifier_opt, generator_opt),
               input_aware_objective(generator, mask, spec, config, device), config.epochs,
               scheduler=_Schedules(cosine(classifier_opt, config.epochs), cosine(generator_opt, config.epochs)),
               on_epoch=evaluate_epoch, on_epoch_every=config.eval_every, progress=progress)
    history += [{"phase": "train", **row} for row in rows]
    generator.eval()
    return model, InputAwareTrigger(generator.cpu(), mask.cpu()), history


# --------------------------------------------------------------------------------- materialising / metrics

def backdoor_test_set(test: ImageSet, trigger: InputAwareTrigger, target: int = 0) -> ImageSet:
    """Every non-target test image with its own generated trigger, labelled `target`, marked poisoned."""
    return poison_test_set(test, trigger, target)


def cross_test_set(test: ImageSet, trigger: InputAwareTrigger, target: int = 0, seed: int = 0) -> ImageSet:
    """Every non-target test image with the trigger of another (seeded random) test image, true label kept:
    the backdoor must NOT fire on these (the paper's cross-trigger test)."""
    keep = torch.nonzero(test.labels != target).flatten()
    generator = torch.Generator().manual_seed(seed)
    n = len(keep)
    shift = torch.randint(1, max(2, n), (n,), generator=generator)
    partners = test.images[keep[(torch.arange(n) + shift) % max(n, 1)]]
    images = trigger.cross(test.images[keep], partners)
    return ImageSet(images, test.labels[keep].clone(), test.labels[keep].clone(), torch.ones(n, dtype=torch.bool),
                    test.source_index[keep].clone())


def poisoned_training_set(train: ImageSet, trigger: InputAwareTrigger, config: InputAwareConfig) -> ImageSet:
    """The record's bd_train: `ratio` of the set (non-target images, seeded) with their own trigger and the
    target label, plus `cross_ratio` of it (from the rest, seeded) with another image's trigger and their
    true label — the two kinds of modified samples training used, marked in `poisoned` (like WaNet's)."""
    poisoned = poison_training_set(train, trigger, config.ratio, config.target, seed=config.seed)
    rest = torch.nonzero(~poisoned.poisoned).flatten()
    count = min(len(rest), round(config.cross_ratio * len(train)))
    if count:
        generator = torch.Generator().manual_seed(config.seed + 1)
        index = rest[torch.randperm(len(rest), generator=generator)[:count]].sort().values
        others = torch.randint(0, len(train), (count,), generator=generator)
        others = torch.where(others == index, (others + 1) % len(train), others)
        poisoned.images[index] = trigger.cross(poisoned.images[index], train.images[others])
        poisoned.poisoned[index] = True
    return poisoned


class EpochEvaluator:
    """An `on_epoch(epoch, model, trigger)`: ACC, and ASR / RA on the backdoor test set made with the
    current G, plus `cross_acc` (accuracy on cross-triggered test images, true labels; high = the backdoor
    is specific to each image's own trigger). `bd_test` keeps the last backdoor test set it made."""

    def __init__(self, clean_test: ImageSet, spec: DatasetSpec, device, target: int = 0, batch_size: int = 512):
        self.clean_test, self.spec, self.device = clean_test, spec, device
        self.target, self.batch_size = target, batch_size
        self.clean = Loader(clean_test, spec, batch_size, device=device)
        self.bd_test: Optional[ImageSet] = None

    def loader(self, data: ImageSet) -> Loader:
        return Loader(data, self.spec, self.batch_size, device=self.device)

    def __call__(self, epoch: int, model: nn.Module, trigger: InputAwareTrigger) -> Dict[str, float]:
        self.bd_test = backdoor_test_set(self.clean_test, trigger, self.target)
        crossed = cross_test_set(self.clean_test, trigger, self.target)
        results = evaluate(model, self.clean, self.loader(self.bd_test))
        results["cross_acc"] = evaluate(model, self.loader(crossed))["acc"]
        return results


def epoch_evaluator(clean_test: ImageSet, spec: DatasetSpec, device, target: int = 0,
                    batch_size: int = 512) -> EpochEvaluator:
    return EpochEvaluator(clean_test, spec, device, target, batch_size)
