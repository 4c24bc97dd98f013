"""GIC, guided input calibration of the reserved (auxiliary) data (Wei et al., arXiv 2502.07231).

Purification degrades when the reserved set is not drawn from the training distribution. GIC learns a
transformation g of the auxiliary images, bounded by ‖g(x) − x‖ ≤ δ in pixel units, guided by the victim
model alone, that makes them look like what the model was trained on; any defense then runs on g(x).

Our g and its objective (the paper gives the principle; this is our construction, see docs/gic.md):

    g(x) = clip(x + r(x), 0, 1),  r(x) = δ·tanh(h(x)) (L∞)  or  h(x)·min(1, δ/‖h(x)‖₂) (L2)

with h a small convolutional network whose last layer starts at zero (g starts as the identity). With the
victim frozen and in eval mode, h minimises over the auxiliary images

    Σ_BN-layers ‖μ_batch − μ_running‖₂ + ‖σ_batch − σ_running‖₂     (the model's memory of its training data)
    + w_conf · (cross-entropy to the given labels, or the prediction entropy when there are none)
    − w_balance · entropy of the batch's mean prediction              (no collapse onto one class)

Clipping to [0, 1] only shortens r, so the bound holds for every output, and the uint8 rounding of the
result is kept inside it as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .data import DatasetSpec, ImageSet
from .adversarial import evaluating

NORMS = ("linf", "l2")
LABELS = ("auto", "given", "victim")


@dataclass
class GICConfig:
    delta: float = 16 / 255      # bound on ‖g(x) − x‖ in pixel units ([0, 1] scale)
    norm: str = "linf"           # linf | l2 (per image)
    epochs: int = 30
    lr: float = 1e-3             # Adam
    batch_size: int = 64
    width: int = 32              # channels of h
    confidence_weight: float = 0.1
    balance_weight: float = 1.0
    labels: str = "auto"         # auto: keep given labels, else the victim's; given; victim (relabel always)
    seed: int = 0
    budget_fields: ClassVar[tuple] = ("epochs",)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"gic: norm must be one of {NORMS}, got {self.norm!r}")
        if self.labels not in LABELS:
            raise ValueError(f"gic: labels must be one of {LABELS}, got {self.labels!r}")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta <= 1):
            raise ValueError(f"gic: delta must be a pixel distance in [0, 1], got {self.delta!r}")
        if not (isinstance(self.width, int) and self.width >= 1):
            raise ValueError(f"gic: width must be an integer ≥ 1, got {self.width!r}")


class BatchNormMatch:
    """Collects, during forward passes, how far each BatchNorm layer's input batch statistics are from its
    running statistics: `loss()` = Σ_layers ‖μ_batch − μ_run‖₂ + ‖σ_batch − σ_run‖₂, averaged over layers.

        with BatchNormMatch(model) as match:
            model(x)
            loss = match.loss()
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.running_mean is not None]
        self.terms: List[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> "BatchNormMatch":
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer, inputs, _output) -> None:
        x = inputs[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - layer.running_mean)
                          + torch.linalg.vector_norm(var.add(layer.eps).sqrt() - layer.running_var.add(layer.eps).sqrt()))

    def loss(self) -> torch.Tensor:
        """The mean over the layers seen since the last call (then forgets them); 0 without BN layers."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean() if terms else torch.zeros(())


class Calibrator(nn.Module):
    """g(x) = clip(x + r(x), 0, 1) on pixel-space images, with ‖r(x)‖ ≤ delta per image."""

    def __init__(self, channels: int, delta: float, norm: str = "linf", width: int = 32):
        super().__init__()
        self.delta, self.norm = float(delta), norm
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def residual(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.body(pixels)
        if self.norm == "linf":
            return self.delta * torch.tanh(raw)
        length = torch.linalg.vector_norm(raw.flatten(1), dim=1).clamp_min(1e-12)
        return raw * (self.delta / length).clamp(max=1.0).view(-1, 1, 1, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + self.residual(pixels)).clamp(0, 1)


class Normalizer:
    """Pixel batches ([0, 1]) ↔ the model's normalised inputs, per `spec`."""

    def __init__(self, spec: DatasetSpec, device):
        shape = (1, len(spec.mean), 1, 1)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(shape)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


def objective(model: nn.Module, match: BatchNormMatch, inputs: torch.Tensor, labels: Optional[torch.Tensor],
              config: GICConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GIC's loss on one batch of normalised calibrated inputs (the model frozen and in eval mode), and its
    parts as detached 0-d tensors (read once an epoch: no host sync per step)."""
    logits = model(inputs).float()
    bn = match.loss()
    probabilities = logits.softmax(1)
    if labels is not None:
        confidence = F.cross_entropy(logits, labels)
    else:
        confidence = -(probabilities * logits.log_softmax(1)).sum(1).mean()
    mean_p = probabilities.mean(0)
    balance = (mean_p * mean_p.clamp_min(1e-12).log()).sum()  # −entropy of the mean prediction
    loss = bn + config.confidence_weight * confidence + config.balance_weight * balance
    return loss, {"bn": bn.detach(), "confidence": confidence.detach(), "balance": -balance.detach()}


def _pixels(images: torch.Tensor, device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float() / 255


def fit_calibrator(model: nn.Module, data: ImageSet, spec: DatasetSpec, config: GICConfig, *,
                   labeled: bool, device="cpu", progress: Optional[str] = None) -> Tuple[Calibrator, List[Dict]]:
    """Train g on `data` against the frozen `model`; one history row per epoch."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    calibrator = Calibrator(spec.channels, config.delta, config.norm, config.width).to(device)
    optimizer = torch.optim.Adam(calibrator.parameters(), lr=config.lr)
    normalize, labels = Normalizer(spec, device), data.labels.to(device)
    use_labels = labeled and config.labels != "victim"
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history: List[Dict] = []
    try:
        with evaluating(model), BatchNormMatch(model) as match:
            for epoch in tqdm(range(1, config.epochs + 1), desc=progress, disable=progress is None, leave=False):
                order = torch.randperm(len(data), generator=generator)
                sums: Dict[str, torch.Tensor] = {}  # float64, as the Python floats summed before
                batches = range(0, len(data), config.batch_size)
                for start in batches:
                    index = order[start:start + config.batch_size]
                    calibrated = normalize(calibrator(_pixels(data.images[index], device)))
                    given = labels[index.to(device, non_blocking=True)] if use_labels else None
                    loss, parts = objective(model, match, calibrated, given, config)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    for key, value in parts.items():
                        sums[key] = sums.get(key, 0.0) + value.double() / len(batches)
                history.append({"epoch": epoch, **{key: float(value) for key, value in sums.items()}})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return calibrator, history


def apply_calibrator(calibrator: Calibrator, images: torch.Tensor, delta: float, norm: str,
                     batch_size: int = 256) -> torch.Tensor:
    """uint8 images → calibrated uint8 images; rounding never leaves the bound (L∞: clamped into the
    integer levels within δ; L2: a rounded image over δ falls back to the unrounded direction scaled in)."""
    device = next(calibrator.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            original = images[start:start + batch_size]
            calibrated = calibrator(_pixels(original, device)).cpu() * 255
            out.append(_round_within(calibrated, original.float(), delta * 255, norm))
    return torch.cat(out).to(torch.uint8) if out else images.clone()


def _round_within(values: torch.Tensor, original: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        low, high = (original - radius).ceil().clamp_min(0), (original + radius).floor().clamp_max(255)
        return values.round().clamp(min=low, max=high)
    rounded = values.round()
    change = (rounded - original).flatten(1)
    over = torch.linalg.vector_norm(change, dim=1) > radius
    if over.any():  # truncate towards the original: stays inside the ball, still integer levels
        shrunk = original + (values - original).trunc()
        rounded[over] = shrunk[over]
    return rounded.clamp(0, 255)


def predicted_labels(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, device,
                     batch_size: int = 256) -> torch.Tensor:
    normalize = Normalizer(spec, device)
    with evaluating(model), torch.no_grad():
        return torch.cat([model(normalize(_pixels(images[s:s + batch_size], device))).argmax(1).cpu()
                          for s in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0).long()


def bn_distance(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, device, batch_size: int = 256) -> float:
    """The BN-statistics distance of a set of uint8 images (whole-set statistics, in eval mode)."""
    normalize = Normalizer(spec, device)
    with evaluating(model), torch.no_grad(), BatchNormMatch(model) as match:
        model(normalize(_pixels(images[:batch_size * 8], device)))
        return float(match.loss())


@registry.register_calibration("gic", config=GICConfig)
def gic(model: nn.Module, data: ImageSet, spec: DatasetSpec, config: Optional[GICConfig] = None, *,
        labeled: bool = True, device="cpu", progress: Optional[str] = None) -> Tuple[ImageSet, Dict]:
    """Calibrate the auxiliary set `data` for `model`: (calibrated ImageSet, report). `labeled`: whether
    `data.labels` are true labels of the task (else, and with labels="victim", the victim labels g(x))."""
    config = config or GICConfig()
    if len(data) == 0:
        raise ValueError("gic: the auxiliary set is empty")
    calibrator, history = fit_calibrator(model, data, spec, config, labeled=labeled, device=device,
                                         progress=progress)
    images = apply_calibrator(calibrator, data.images, config.delta, config.norm)
    relabel = config.labels == "victim" or (config.labels == "auto" and not labeled)
    if config.labels == "given" and not labeled:
        raise ValueError("gic: labels=given, but this auxiliary set has no labels of the task; use labels=auto")
    labels = predicted_labels(model, images, spec, device) if relabel else data.labels
    change = (images.float() - data.images.float()) / 255
    report = {
        "bn_before": bn_distance(model, data.images, spec, device),
        "bn_after": bn_distance(model, images, spec, device),
        "max_change": _max_norm(change, config.norm),
        "labels": "victim" if relabel else "given",
        "history": history,
    }
    return ImageSet(images, labels, source_index=data.source_index), report


def _max_norm(change: torch.Tensor, norm: str) -> float:
    if not len(change):
        return 0.0
    flat = change.flatten(1)
    values = flat.abs().amax(1) if norm == "linf" else torch.linalg.vector_norm(flat, dim=1)
    return float(values.max())
