"""ANP — Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Each BatchNorm2d channel k ("neuron") gets a mask m_k ∈ [0, 1] (init 1) and bounded multiplicative
perturbations δ_k, ξ_k ∈ [−ε, ε]: its output becomes (m_k + δ_k)·γ_k·x̂ + (1 + ξ_k)·β_k. The masks
minimise   α·L(clean, m) + (1 − α)·max_{δ,ξ} L(perturbed, m)   on the clean reserved data (the
inner max: random start in [−ε, ε], `steps` sign-gradient steps of size ε/steps, clipped to ±ε).
Backdoor neurons are the ones the model is most sensitive to, so their masks fall first. Pruning
then zeroes γ_k of the neurons with the smallest masks, in the original model.

How much to prune: a fixed `prune_value` (mask threshold or neuron count), or — when it is None — the
largest candidate from `prune_step` to `prune_max` whose accuracy on a HELD-OUT part of the reserved
data (a seeded `holdout` fraction, never used to learn the masks) drops by at most `acc_tolerance`
(relative). Test data and ASR are never looked at. (BackdoorBench instead picks, among candidates
within its `acc_ratio`, the one with the lowest *test* ASR, which needs the trigger.)

Implementation: the perturbation is a forward hook on each BatchNorm2d rewriting y = γ·x̂ + β as
(m + δ)·(y − β) + (1 + ξ)·β, so any model with BatchNorm2d works without replacing its modules.
The masks are trained through the common `fit` loop (objective = the ANP loss, after_step = clip).

Defaults and their source (paper = Wu & Wang 2021; BB = BackdoorBench config/defense/anp):
    eps=0.4, alpha=0.2, steps=1, iterations=2000, batch 256     paper / BB  (`epochs`, if set, wins)
    mask_lr=0.2 (SGD, momentum 0.9)                             ANP authors' code (BB uses lr 0.01)
    prune_by="threshold", prune_max=0.9, prune_step=0.05        BB
    acc_tolerance=0.1 (relative held-out accuracy drop)         BB's acc_ratio, applied to held-out data
    holdout=0.1                                                 ours
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, asdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Loader
from ..evaluation import evaluate
from ..training import fit
from ..registry import register_defense

PRUNE_BY = ("threshold", "number")


@dataclass
class ANPConfig:
    eps: float = 0.4
    alpha: float = 0.2
    steps: int = 1
    iterations: int = 2000
    epochs: Optional[int] = None  # when set: passes over the mask-learning split, instead of `iterations`
    mask_lr: float = 0.2
    momentum: float = 0.9
    batch_size: int = 256
    bn_train: bool = True
    prune_by: str = "threshold"
    prune_value: Optional[float] = None
    prune_max: float = 0.9
    prune_step: float = 0.05
    acc_tolerance: float = 0.1
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.prune_by not in PRUNE_BY:
            raise ValueError(f"prune_by must be one of {PRUNE_BY}, got {self.prune_by!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.eps < 0 or self.steps < 0 or self.iterations < 0 or (self.epochs or 0) < 0 \
                or not 0.0 <= self.alpha <= 1.0:
            raise ValueError("ANP needs eps, steps, iterations and epochs ≥ 0 and alpha in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def batchnorm_layers(model: nn.Module) -> Dict[str, nn.BatchNorm2d]:
    """The model's affine BatchNorm2d layers by name (ANP's neurons); a clear error when there are none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}
    if not layers:
        raise ValueError("ANP prunes BatchNorm2d channels but the model has no (affine) BatchNorm2d; "
                         "use another defense, e.g. fp or d3")
    return layers


class NeuronPerturbation:
    """Masks and bounded perturbations on every BatchNorm2d of a model, applied by forward hooks."""

    def __init__(self, model: nn.Module, eps: float):
        self.layers = batchnorm_layers(model)
        self.eps, self.perturbed = eps, False
        self.masks, self.noise, self.noise_bias = {}, {}, {}
        for name, bn in self.layers.items():
            self.masks[name] = torch.ones_like(bn.weight, requires_grad=True)
            self.noise[name] = torch.zeros_like(bn.weight, requires_grad=True)
            self.noise_bias[name] = torch.zeros_like(bn.weight, requires_grad=True)
        self.handles = [bn.register_forward_hook(self._hook(name)) for name, bn in self.layers.items()]

    def _hook(self, name: str):
        def rewrite(module, _inputs, output):
            shape = (1, -1, 1, 1)
            bias = module.bias.view(shape)
            scale, shift = self.masks[name], 1.0
            if self.perturbed:
                scale, shift = scale + self.noise[name], 1.0 + self.noise_bias[name].view(shape)
            return scale.view(shape) * (output - bias) + shift * bias
        return rewrite

    def noise_tensors(self) -> List[torch.Tensor]:
        return list(self.noise.values()) + list(self.noise_bias.values())

    @torch.no_grad()
    def randomize_noise(self, generator: torch.Generator) -> None:
        for t in self.noise_tensors():
            t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1).to(t.device) * self.eps)

    @torch.no_grad()
    def clip_masks(self) -> None:
        for m in self.masks.values():
            m.clamp_(0.0, 1.0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def mask_values(self) -> List[Tuple[str, int, float]]:
        """(layer name, channel, mask value) for every neuron, smallest mask first (stable order)."""
        values = [(name, k, float(v)) for name, m in self.masks.items() for k, v in enumerate(m.detach().cpu())]
        return sorted(values, key=lambda item: item[2])


def anp_objective(perturbation: NeuronPerturbation, config: ANPConfig, generator: torch.Generator):
    """α·CE(clean, masks) + (1 − α)·CE(worst neuron perturbation, masks); the inner max runs here."""
    step = config.eps / max(config.steps, 1)

    def objective(model, inputs, labels):
        robust = torch.zeros((), device=inputs.device)
        if config.eps > 0:
            perturbation.randomize_noise(generator)
            perturbation.perturbed = True
            for _ in range(config.steps):
                noise = perturbation.noise_tensors()
                grads = torch.autograd.grad(F.cross_entropy(model(inputs), labels), noise)
                with torch.no_grad():
                    for t, g in zip(noise, grads):
                        t.add_(step * g.sign()).clamp_(-config.eps, config.eps)
            robust = F.cross_entropy(model(inputs), labels)
            perturbation.perturbed = False
        natural = F.cross_entropy(model(inputs), labels)
        loss = config.alpha * natural + (1 - config.alpha) * robust
        return loss, {"loss": loss.detach(), "natural_loss": natural.detach(), "robust_loss": robust.detach()}
    return objective


def split_reserved(batches, fraction: float, seed: int) -> Tuple[Loader, Loader]:
    """Seeded split of the Loader's ImageSet into (mask-learning loader, held-out evaluation loader)."""
    data = getattr(batches, "data", None)
    if data is None or getattr(batches, "spec", None) is None:
        raise ValueError("ANP needs a d3_plugin Loader over the reserved data to split off a held-out part")
    n = len(data)
    held = max(1, round(fraction * n))
    if held >= n:
        raise ValueError(f"{n} reserved samples are too few to hold out {fraction:.0%}; use more reserved data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    device, size = batches.device, batches.batch_size
    train = Loader(data.subset(order[held:]), batches.spec, size, train=batches.train, device=device, seed=seed)
    heldout = Loader(data.subset(order[:held]), batches.spec, size, train=False, device=device)
    return train, heldout


def learn_masks(model: nn.Module, batches, config: ANPConfig, *, on_epoch=None, progress=None):
    """Optimise the neuron masks on a scratch copy of `model`; returns (sorted mask values, history)."""
    scratch = copy.deepcopy(model)
    for p in scratch.parameters():
        p.requires_grad_(False)
    perturbation = NeuronPerturbation(scratch, config.eps)
    optimizer = torch.optim.SGD(list(perturbation.masks.values()), lr=config.mask_lr, momentum=config.momentum)
    epochs = config.epochs if config.epochs is not None else math.ceil(config.iterations / max(len(batches), 1))
    generator = torch.Generator().manual_seed(config.seed)
    history = fit(scratch, batches, optimizer, anp_objective(perturbation, config, generator), epochs,
                  after_step=lambda _: perturbation.clip_masks(), bn_train=config.bn_train,
                  on_epoch=on_epoch, progress=progress)
    perturbation.remove()
    return perturbation.mask_values(), history


@torch.no_grad()
def prune(model: nn.Module, neurons) -> nn.Module:
    """A copy of `model` with γ = 0 for each (layer, channel) in `neurons`."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for name, channel, *_ in neurons:
        modules[name].weight[channel] = 0.0
    return pruned


def chosen(mask_values, config: ANPConfig, amount: float):
    """The neurons pruned at `amount`: mask ≤ threshold, or the `amount` smallest masks."""
    if config.prune_by == "threshold":
        return [v for v in mask_values if v[2] <= amount]
    return mask_values[:int(amount)]


def candidates(config: ANPConfig) -> List[float]:
    if config.prune_value is not None:
        return [config.prune_value]
    count = int(math.floor(config.prune_max / config.prune_step + 1e-9))
    return [round(config.prune_step * i, 10) for i in range(1, count + 1)]


def select_pruning(model: nn.Module, mask_values, heldout: Loader, config: ANPConfig):
    """Largest candidate whose held-out accuracy stays within the tolerance; returns (model, record)."""
    base = evaluate(model, heldout)["acc"]
    best = prune(model, [])  # a copy, even when nothing can be pruned within the tolerance
    record = {"heldout_acc_before": base, "pruned": 0, "amount": 0.0, "heldout_acc": base}
    for amount in candidates(config):
        neurons = chosen(mask_values, config, amount)
        candidate = prune(model, neurons)
        acc = evaluate(candidate, heldout)["acc"]
        within = config.prune_value is not None or base - acc <= config.acc_tolerance * base
        if within:
            best, record = candidate, {"heldout_acc_before": base, "pruned": len(neurons), "amount": amount,
                                       "heldout_acc": acc}
    return best, record


@register_defense("anp", config=ANPConfig)
def defend(model: nn.Module, clean_batches, config: Optional[ANPConfig] = None, *,
           on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
           progress: Optional[str] = None):
    """Learn neuron masks on part of the reserved data, prune by held-out accuracy; returns (copy, history).

    History: one row per mask-learning epoch (loss, natural_loss, robust_loss — `on_epoch` sees the
    masked scratch model), then a final row with the pruning decision (pruned, amount, held-out ACC)
    and `on_epoch` of the pruned model.
    """
    config = config or ANPConfig()
    batchnorm_layers(model)  # fail fast, with a clear message, on a model without BN
    train, heldout = split_reserved(clean_batches, config.holdout, config.seed)
    mask_values, history = learn_masks(model, train, config, on_epoch=on_epoch, progress=progress)
    pruned, record = select_pruning(model, mask_values, heldout, config)
    row = {"epoch": len(history) + 1, **record}
    if on_epoch is not None:
        row.update(on_epoch(row["epoch"], pruned))
    history.append(row)
    return pruned, history
