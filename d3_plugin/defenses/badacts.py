"""BadActs: clip activations into learned clean intervals, and flag inputs by their activation state
(Yi, Chen, Li, Li, Zhang, Liu, "BadActs: A Universal Backdoor Defense in the Activation Space",
Findings of ACL 2024, arXiv 2405.11227), written for image classifiers.

Purification (`badacts`). For each chosen layer, every neuron (every CHANNEL of a conv feature map:
bounds of shape [C], broadcast over H, W; dim 1 is the neuron axis) gets a clean interval [l, u],
parametrised as l = u − exp(m). At inference the layer's output is clipped into [l, u], so activations
a trigger drives out of the clean range are pulled back. u and m are learned on the clean reserved set
with Adam, minimising

    MSE(clipped-model logits, original logits) + c · P(exp(m))

where P is `penalty`: "l2" = ‖exp(m)‖₂ over all neurons of all layers (the authors' code,
BadActs_purification.py, `torch.norm(torch.exp(margin))`), "mean" or "sum". P favours narrow intervals.
c adapts after EVERY epoch: c ×= c_factor when the clipped model's reserved-set accuracy is ≥
acc_floor × the original model's reserved-set accuracy (measured before learning), else c ÷= c_factor.
The returned bounds are those of the last epoch that met the floor (the initial bounds count as epoch
0); if none did, those of the most accurate epoch.

Initialisation (ours; the paper's text was not available here): per channel, over all samples and
spatial positions of the unaugmented reserved set, [mean − init_k·std, mean + init_k·std] ∩ [min, max]
(init_k None: [min, max], which contains every reserved activation, so the initial clipping is the
identity there), widened by 1e-3 · its width + 1e-6 on each side. Why not [min, max] by default: u gets
no gradient from the penalty (only m does), so from [min, max] the intervals shrink from below only
(raising the lower bound of ReLU channels above their many zeros) and the upper bound, where triggers
push activations, barely moves (seen once, on the tiny BadNets CNN of tests/conftest.py and one seed: an
observation that chose the default, not an efficacy result; docs/badacts.md).

Default layers (`layers=None`): (1) the model's direct children named `layer1`, `layer2`, … (residual
stages: PreAct-ResNet18 and torchvision ResNets → layer1..layer4); otherwise (2) every nn.Sequential
that has an nn.Conv2d among its direct children (conv blocks: `small_cnn` → features.0, features.2,
features.4; a VGG → its whole `features`). Name the modules (their OUTPUT is clipped) for anything else.

Detection (`fit_detector`, `Detector`). The reserved set's activations at the same layers, averaged
over the spatial positions per channel (one value per neuron; the authors take the [CLS] position of
each BERT block), are split in two halves by a permutation seeded with `seed`: a Gaussian (mean, MLE
std) per neuron is fitted on the first half; a sample's score is the fraction of neurons within μ ± k·σ
(the paper's Neuron Activation State); the threshold is the ⌊n·fpr⌋-th smallest score (0-based) of the
second, held-out half, and a sample is flagged when its score is strictly below it (so at most fpr of
the held-out clean samples are flagged), as in the authors' badacts_defender.py. Scores always use the
UNCLIPPED model (a ClippedModel is scored through its `base`).

Defaults and their source (authors' code, github clearloveclearlove/BadActs):
    lr 0.01 (Adam), epochs 50, acc_floor 0.98, c 0.1, c_factor 1.2, penalty l2   BadActs_purification.py
    k 3, fpr 0.05                                                                 BadActs_detection.py (delta 3),
                                                                                  badacts_defender.py (frr 0.05)
    init_k 3                                                                      ours (see above)
Differences from the authors' code: they initialise u = 1, m = 1 for every neuron (we use clean statistics);
they adapt c only every 5th epoch after the 10th and, if the final dev accuracy is < 97 %, halve c and
learn again from scratch (we adapt every epoch and keep the last epoch meeting the floor); their floor
is relative to 100 % on the dev samples the model classifies correctly (ours: relative to the original
model's accuracy on the whole reserved set); batch size 32 (ours 128).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from functools import partial
from numbers import Real
from typing import Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import model_device
from ..registry import register_defense
from ..training import fit
from .fp import plain_batches

PENALTIES = {"l2": lambda w: torch.linalg.vector_norm(w), "mean": torch.mean, "sum": torch.sum}


@dataclass
class BadActsConfig:
    layers: Optional[Sequence[str]] = None  # modules whose OUTPUT is clipped / scored; None = automatic
    epochs: int = 50
    lr: float = 0.01
    c: float = 0.1  # initial penalty weight
    c_factor: float = 1.2  # c is multiplied / divided by this after each epoch
    init_k: Optional[float] = 3.0  # initial bounds: mean ± init_k·std ∩ [min, max]; None = [min, max]
    penalty: str = "l2"  # l2 | mean | sum of the interval widths exp(m)
    acc_floor: float = 0.98  # keep ≥ this fraction of the reserved-set accuracy
    batch_size: int = 128
    k: float = 3.0  # detection: a neuron is normal within μ ± k·σ
    fpr: float = 0.05  # detection: flagged fraction of held-out clean samples (at most)
    seed: int = 0
    budget_fields: ClassVar[tuple] = ("epochs",)

    def __post_init__(self):
        if self.layers is not None:
            self.layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
            if not self.layers or not all(isinstance(n, str) and n for n in self.layers):
                raise ValueError("BadActs layers must be None or a non-empty list of module names")
        for name, least in (("epochs", 0), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"BadActs {name} must be an integer ≥ {least}, got {value!r}")
        for name in ("lr", "c", "k"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"BadActs {name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.init_k is not None and (not _finite(self.init_k) or self.init_k <= 0):
            raise ValueError(f"BadActs init_k must be None or a finite number > 0, got {self.init_k!r}")
        if not _finite(self.c_factor) or self.c_factor < 1:
            raise ValueError(f"BadActs c_factor must be a finite number ≥ 1, got {self.c_factor!r}")
        if not _finite(self.acc_floor) or not 0 <= self.acc_floor <= 1:
            raise ValueError(f"BadActs acc_floor must be in [0, 1], got {self.acc_floor!r}")
        if not _finite(self.fpr) or not 0 <= self.fpr < 1:
            raise ValueError(f"BadActs fpr must be in [0, 1), got {self.fpr!r}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"BadActs penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def default_layers(model: nn.Module) -> List[str]:
    """Residual stages (`layer1`, `layer2`, … children), else every nn.Sequential with a direct Conv2d child."""
    stages = [n for n, _ in model.named_children() if n.startswith("layer") and n[5:].isdigit()]
    if stages:
        return sorted(stages, key=lambda n: int(n[5:]))
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Sequential)
              and any(isinstance(c, nn.Conv2d) for c in m.children())]
    if not blocks:
        raise ValueError("BadActs found no residual stage (layer1, …) or conv block; name the modules with `layers`")
    return blocks


def _modules(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    found = dict(model.named_modules())
    missing = [n for n in names if n not in found or n == ""]
    if missing:
        raise ValueError(f"BadActs layers {missing} are not modules of the model; pick from named_modules()")
    return [found[n] for n in names]


def _per_channel(output: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """A [C] bound shaped to broadcast over an (N, C, ...) output."""
    if output.dim() < 2 or output.shape[1] != bound.numel():
        raise ValueError(f"BadActs: a layer output of shape {tuple(output.shape)} does not match bounds of "
                         f"{bound.numel()} channels (dim 1 is the channel axis)")
    return bound.view(1, -1, *([1] * (output.dim() - 2)))


class ClippedModel(nn.Module):
    """The victim model with the outputs of `layers` clipped per channel into [lower, upper]. The clipping
    hooks live only during `forward`: `base` stays the plain victim (same state_dict, no hooks; calling
    it directly gives the original outputs). The bounds are this module's buffers `lower_i` / `upper_i`."""

    def __init__(self, base: nn.Module, layers: Sequence[str], lower: Sequence[torch.Tensor],
                 upper: Sequence[torch.Tensor]):
        super().__init__()
        if not (len(layers) == len(lower) == len(upper)) or not layers:
            raise ValueError("ClippedModel needs one lower and one upper bound per layer, and at least one layer")
        self.base, self.layers = base, tuple(layers)
        _modules(base, self.layers)  # every name must exist
        self._live: Optional[Callable[[int], Tuple[torch.Tensor, torch.Tensor]]] = None
        device = model_device(base)
        for i, (lo, up) in enumerate(zip(lower, upper)):
            lo, up = lo.detach().reshape(-1).float(), up.detach().reshape(-1).float()
            if lo.shape != up.shape or not bool((lo <= up).all()):
                raise ValueError(f"ClippedModel: bounds of layer {layers[i]!r} must have one shape and lower ≤ upper")
            self.register_buffer(f"lower_{i}", lo.clone().to(device))
            self.register_buffer(f"upper_{i}", up.clone().to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handles = [m.register_forward_hook(partial(self._clip, i))
                   for i, m in enumerate(_modules(self.base, self.layers))]
        try:
            return self.base(x)
        finally:
            for handle in handles:
                handle.remove()

    def _clip(self, index: int, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
        lower, upper = self.bounds(index)
        return torch.maximum(torch.minimum(output, _per_channel(output, upper)), _per_channel(output, lower))

    def bounds(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) of layer `index`: the learnable ones while BadActs trains, else the buffers."""
        if self._live is not None:
            return self._live(index)
        return getattr(self, f"lower_{index}"), getattr(self, f"upper_{index}")

    @torch.no_grad()
    def set_bounds(self, lower: Sequence[torch.Tensor], upper: Sequence[torch.Tensor]) -> None:
        for i, (lo, up) in enumerate(zip(lower, upper)):
            getattr(self, f"lower_{i}").copy_(lo.reshape(-1))
            getattr(self, f"upper_{i}").copy_(up.reshape(-1))

    def bounds_state(self) -> Dict[str, torch.Tensor]:
        """{"<layer>.lower": [C], "<layer>.upper": [C]} on the CPU, in layer order."""
        state = {}
        for i, name in enumerate(self.layers):
            state[f"{name}.lower"] = getattr(self, f"lower_{i}").detach().cpu().clone()
            state[f"{name}.upper"] = getattr(self, f"upper_{i}").detach().cpu().clone()
        return state

    @classmethod
    def from_bounds(cls, model: nn.Module, bounds_state: Dict[str, torch.Tensor]) -> "ClippedModel":
        """Wrap a deep copy of a plain `model` with saved bounds (`bounds_state()`'s mapping)."""
        layers, parts = [], {}
        for key, value in bounds_state.items():
            name, _, kind = key.rpartition(".")
            if kind not in ("lower", "upper") or not name:
                raise ValueError(f"BadActs bounds key {key!r} must end in .lower or .upper")
            if name not in parts:
                layers.append(name)
            parts.setdefault(name, {})[kind] = torch.as_tensor(value)
        incomplete = [n for n in layers if len(parts[n]) != 2]
        if incomplete or not layers:
            raise ValueError(f"BadActs bounds need both .lower and .upper for every layer; incomplete: {incomplete}")
        return cls(copy.deepcopy(model), layers, [parts[n]["lower"] for n in layers],
                   [parts[n]["upper"] for n in layers])


class _LearnedBounds(nn.Module):
    """The learnable parametrisation: upper u and log-width m per layer; lower = u − exp(m)."""

    def __init__(self, lower: Sequence[torch.Tensor], upper: Sequence[torch.Tensor]):
        super().__init__()
        self.upper = nn.ParameterList([nn.Parameter(u.detach().clone()) for u in upper])
        self.log_width = nn.ParameterList([nn.Parameter(torch.log(u - lo).detach()) for lo, u in zip(lower, upper)])

    def get(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        upper = self.upper[index]
        return upper - torch.exp(self.log_width[index]), upper

    def widths(self) -> torch.Tensor:
        return torch.cat([m.exp() for m in self.log_width])

    def snapshot(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        with torch.no_grad():
            pairs = [self.get(i) for i in range(len(self.upper))]
        return [lo.detach().clone() for lo, _ in pairs], [up.detach().clone() for _, up in pairs]


@contextlib.contextmanager
def _recording(model: nn.Module, layers: Sequence[str], record: Callable[[int, torch.Tensor], None]):
    """Calls record(i, output) for each layer's output while active."""
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: record(i, out.detach()))
               for i, m in enumerate(_modules(model, layers))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def channel_stats(model: nn.Module, layers: Sequence[str], batches: Iterable) -> List[Dict[str, torch.Tensor]]:
    """Per layer, per channel over all samples and positions: min, max, mean and (population) std."""
    sums: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(layers)

    def record(i, out):
        flat = out.transpose(0, 1).reshape(out.shape[1], -1).double()
        now = {"min": flat.amin(1), "max": flat.amax(1), "n": flat.new_full((len(flat),), flat.shape[1]),
               "sum": flat.sum(1), "sq": (flat * flat).sum(1)}
        if sums[i] is not None:
            old = sums[i]
            now = {"min": torch.minimum(old["min"], now["min"]), "max": torch.maximum(old["max"], now["max"]),
                   **{k: old[k] + now[k] for k in ("n", "sum", "sq")}}
        sums[i] = now

    _forward_all(model, layers, batches, record)
    if sums[0] is None:
        raise ValueError("BadActs needs at least one clean batch")
    stats = []
    for s in sums:
        mean = s["sum"] / s["n"]
        std = (s["sq"] / s["n"] - mean * mean).clamp_min(0).sqrt()
        stats.append({k: v.float() for k, v in (("min", s["min"]), ("max", s["max"]), ("mean", mean), ("std", std))})
    return stats


def _forward_all(model: nn.Module, layers: Sequence[str], batches: Iterable, record) -> None:
    device, was_training = model_device(model), model.training
    model.eval()
    try:
        with _recording(model, layers, record):
            for inputs, _ in batches:
                model(inputs.to(device))
    finally:
        model.train(was_training)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable) -> float:
    device, was_training = model_device(model), model.training
    model.eval()
    correct, total = 0, 0
    try:
        for inputs, labels in batches:
            correct += int((model(inputs.to(device)).argmax(1) == labels.to(device)).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def initial_bounds(model: nn.Module, layers: Sequence[str], batches: Iterable, init_k: Optional[float]):
    """[mean − init_k·std, mean + init_k·std] ∩ [min, max] per channel (init_k None: [min, max]), widened
    by 1e-3 · its width + 1e-6 on each side."""
    lower, upper = [], []
    for s in channel_stats(model, layers, batches):
        lo, up = s["min"], s["max"]
        if init_k is not None:
            lo, up = torch.maximum(lo, s["mean"] - init_k * s["std"]), torch.minimum(up, s["mean"] + init_k * s["std"])
        pad = 1e-3 * (up - lo) + 1e-6
        lower.append(lo - pad)
        upper.append(up + pad)
    return lower, upper


@register_defense("badacts", config=BadActsConfig, data="clean")
def badacts(model: nn.Module, clean_batches: Iterable, config: Optional[BadActsConfig] = None, *,
            on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
            progress: Optional[str] = None):
    """Learn clean activation intervals on the reserved set; returns (ClippedModel, history), one row per
    epoch: epoch, loss, mse (batch means), width (mean interval width after the epoch), c (the weight used
    in that epoch), reserved_acc (clipped model after the epoch), lr, and `on_epoch`'s metrics. The
    returned bounds: those of the last epoch whose reserved_acc met the floor (the initial bounds count
    as epoch 0), or, when none did, of the most accurate epoch."""
    config = config or BadActsConfig()
    base = copy.deepcopy(model).eval()
    layers = list(config.layers or default_layers(base))
    plain = plain_batches(clean_batches)
    floor = config.acc_floor * accuracy(base, plain)
    lower, upper = initial_bounds(base, layers, plain, config.init_k)
    clipped = ClippedModel(base, layers, lower, upper)
    learned = _LearnedBounds(lower, upper)
    state = {"c": config.c, "kept": (lower, upper), "acc": accuracy(clipped, plain)}
    state["feasible"] = state["acc"] >= floor
    penalty, device = PENALTIES[config.penalty], model_device(base)

    def objective(net, inputs, _labels):
        inputs = inputs.to(device)
        with torch.no_grad():
            reference = base(inputs)
        mse = F.mse_loss(clipped(inputs), reference)
        loss = mse + state["c"] * penalty(learned.widths())
        return loss, {"loss": loss.detach(), "mse": mse.detach()}

    def after_epoch(epoch, net):
        acc = accuracy(clipped, plain)
        row = {"width": float(learned.widths().detach().mean()), "c": state["c"], "reserved_acc": acc}
        if acc >= floor or (not state["feasible"] and acc > state["acc"]):
            state.update(kept=learned.snapshot(), acc=acc, feasible=acc >= floor)
        state["c"] = state["c"] * config.c_factor if acc >= floor else state["c"] / config.c_factor
        row.update(on_epoch(epoch, net) if on_epoch is not None else {})
        return row

    grads = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)
    clipped._live = learned.get
    try:
        optimizer = torch.optim.Adam(learned.parameters(), lr=config.lr)
        history = fit(clipped, clean_batches, optimizer, objective, config.epochs, bn_train=False,
                      on_epoch=after_epoch, progress=progress)
    finally:
        clipped._live = None
        for p, flag in zip(base.parameters(), grads):
            p.requires_grad_(flag)
    clipped.set_bounds(*state["kept"])
    return clipped.eval(), history or [{"epoch": 0, "width": float(learned.widths().detach().mean()),
                                        "c": config.c, "reserved_acc": state["acc"]}]


# ----------------------------------------------------------------------------------------------- detection


@torch.no_grad()
def neuron_activations(model: nn.Module, layers: Sequence[str], batches: Iterable) -> torch.Tensor:
    """(N, neurons): each layer's output averaged over its spatial positions per channel, layers concatenated,
    from the UNCLIPPED model (a ClippedModel is run through its plain `base`)."""
    parts: List[List[torch.Tensor]] = [[] for _ in layers]

    def record(i, out):
        parts[i].append(out.flatten(2).mean(2).float().cpu() if out.dim() > 2 else out.float().cpu())

    _forward_all(model.base if isinstance(model, ClippedModel) else model, layers, batches, record)
    if not parts[0]:
        raise ValueError("BadActs detection needs at least one batch")
    return torch.cat([torch.cat(layer) for layer in parts], 1)


@dataclass
class Detector:
    """Per-neuron Gaussians (mean, std) at `layers` and the score threshold; flag = score < threshold."""

    layers: List[str]
    mean: torch.Tensor
    std: torch.Tensor
    k: float
    threshold: float
    clean_scores: torch.Tensor  # the held-out clean scores the threshold came from

    def score_activations(self, activations: torch.Tensor) -> torch.Tensor:
        """Fraction of neurons within μ ± k·σ (plus a 1e-6 relative tolerance for constant neurons)."""
        tolerance = self.k * self.std + 1e-6 * (1 + self.mean.abs())
        return ((activations - self.mean).abs() <= tolerance).float().mean(1)

    def scores(self, model_or_clipped: nn.Module, batches: Iterable) -> torch.Tensor:
        return self.score_activations(neuron_activations(model_or_clipped, self.layers, batches))

    def flag(self, model_or_clipped: nn.Module, batches: Iterable) -> torch.BoolTensor:
        return self.scores(model_or_clipped, batches) < self.threshold


def fit_detector(model: nn.Module, clean_batches: Iterable, config: Optional[BadActsConfig] = None) -> Detector:
    """Fit the Gaussians on a seeded half of the reserved set; set the threshold on the other half."""
    config = config or BadActsConfig()
    net = model.base if isinstance(model, ClippedModel) else model
    layers = list(config.layers or (model.layers if isinstance(model, ClippedModel) else default_layers(net)))
    activations = neuron_activations(model, layers, plain_batches(clean_batches))
    if len(activations) < 4:
        raise ValueError(f"BadActs detection needs at least 4 clean samples, got {len(activations)}")
    order = torch.randperm(len(activations), generator=torch.Generator().manual_seed(config.seed))
    half = len(order) // 2
    fitted, held_out = activations[order[:half]], activations[order[half:]]
    detector = Detector(layers, fitted.mean(0), fitted.std(0, unbiased=False), config.k, 0.0, torch.empty(0))
    detector.clean_scores = detector.score_activations(held_out)
    detector.threshold = float(detector.clean_scores.sort().values[int(len(held_out) * config.fpr)])
    return detector


def _midranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks in ascending order, ties sharing their mean rank."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def detection_metrics(clean_scores, poisoned_scores, threshold: float, fpr: float = 0.05) -> Dict[str, float]:
    """Low score = poisoned. auroc = P(poisoned < clean) + ½ P(tie) (Mann–Whitney rank statistic);
    flagged_* = fraction with score < threshold; tpr_at_fpr = fraction of poisoned below the ⌊n·fpr⌋-th
    smallest of these clean scores (the detector's own rule, calibrated on these clean scores)."""
    clean = torch.as_tensor(clean_scores, dtype=torch.float64).reshape(-1)
    poisoned = torch.as_tensor(poisoned_scores, dtype=torch.float64).reshape(-1)
    if not len(clean) or not len(poisoned):
        raise ValueError("detection_metrics needs at least one clean and one poisoned score")
    ranks = _midranks(torch.cat([-poisoned, -clean]))  # ascending anomaly: poisoned should rank high
    n_p, n_c = len(poisoned), len(clean)
    auroc = (ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_c)
    cut = clean.sort().values[min(int(n_c * fpr), n_c - 1)]
    return {"auroc": float(auroc), "tpr_at_fpr": float((poisoned < cut).double().mean()),
            "flagged_clean": float((clean < threshold).double().mean()),
            "flagged_poisoned": float((poisoned < threshold).double().mean())}
