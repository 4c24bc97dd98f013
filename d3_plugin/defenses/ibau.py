"""i-BAU — Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

A minimax problem   min_θ  max_δ  L_in(δ, θ),   solved in rounds (= epochs here):
1. perturbation: a universal δ (one (1, C, H, W) tensor in normalised input space) is found by SGD
   (lr `pert_lr`) on   −CE(f(x + δ), f(x)'s own prediction) + reg·‖δ‖²   over one pass of the data;
2. unlearning: for every batch, θ takes one Adam step on the outer loss
   L_out(δ, θ) = CE(f(x + mask·δ), y), where `patch_portion` of the batch carries δ, through the
   *implicit hypergradient*: δ* is the fixed point of Φ(δ, θ) = δ − inner_lr·∇_δ L_in(δ, θ) with
   L_in = −CE(f(x + δ), y) + reg·‖δ‖², so
       dL_out/dθ = ∂_θ L_out + (∂_θ Φ)ᵀ v,    v = (∂_δ Φ)ᵀ v + ∂_δ L_out,
   v obtained by K fixed-point iterations (Hessian-vector products; as in the authors' code, which
   follows Grazzi et al. 2020). Here the Adam step minimises the surrogate L_out + ⟨v, Φ⟩ (v detached),
   whose θ-gradient is exactly that hypergradient — so the step runs through the common `fit` loop.

Honest notes on what differs from the authors' / BackdoorBench's script:
- L_in in the fixed point uses the current batch (their code uses the first batch of the data in
  every step); at least one sample per batch carries δ (their int(n·0.01) is 0 for batches < 100).
- devices follow the model (their code hard-codes cuda). The model stays in eval mode, as theirs.
- δ is unbounded apart from the L2 regulariser, like theirs (no clipping to the image range).

Defaults and their source (BB = BackdoorBench config/defense/i-bau; code = the authors' script):
    rounds=5, K=5, lr=1e-4 (Adam), batch 256      BB
    pert_lr=10 (SGD), inner_lr=0.1, reg=0.001,
    patch_portion=0.01                            code / BB's defense/i-bau.py
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, asdict
from typing import Callable, ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..training import fit
from ..adversarial import evaluating
from ..registry import register_defense


@dataclass
class IBAUConfig:
    rounds: int = 5
    K: int = 5
    lr: float = 1e-4
    pert_lr: float = 10.0
    inner_lr: float = 0.1
    reg: float = 0.001
    patch_portion: float = 0.01
    batch_size: int = 256
    bn_train: bool = False
    seed: int = 0
    budget_fields: ClassVar[tuple] = ('rounds',)  # what a shared `--epochs` sets

    def __post_init__(self):
        if self.rounds < 0 or self.K < 0 or not 0.0 < self.patch_portion <= 1.0:
            raise ValueError("i-BAU needs rounds ≥ 0, K ≥ 0 and patch_portion in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def universal_perturbation(model: nn.Module, batches, config: IBAUConfig) -> torch.Tensor:
    """One SGD pass over `batches` maximising CE against the model's own predictions (eval mode)."""
    delta = None
    with evaluating(model):
        for inputs, _ in batches:
            if delta is None:
                delta = torch.zeros((1, *inputs.shape[1:]), device=inputs.device, requires_grad=True)
            with torch.no_grad():
                predicted = model(inputs).argmax(1)
            loss = -F.cross_entropy(model(inputs + delta), predicted) + config.reg * delta.pow(2).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= config.pert_lr * grad
    if delta is None:
        raise ValueError("i-BAU got no clean batches; give it a non-empty reserved set")
    return delta.detach()


def hypergradient_objective(state: Dict[str, torch.Tensor], config: IBAUConfig, generator: torch.Generator):
    """Objective whose θ-gradient is the implicit hypergradient of L_out at the current δ."""
    def objective(model, inputs, labels):
        delta = state["delta"].clone().requires_grad_(True)
        inner = -F.cross_entropy(model(inputs + delta), labels) + config.reg * delta.pow(2).sum()
        (inner_grad,) = torch.autograd.grad(inner, delta, create_graph=True)
        mapped = delta - config.inner_lr * inner_grad  # Φ(δ, θ)

        n = len(inputs)
        chosen = torch.randperm(n, generator=generator)[:max(1, int(n * config.patch_portion))]
        carries = torch.zeros((n,) + (1,) * (inputs.dim() - 1), device=inputs.device)
        carries[chosen.to(inputs.device)] = 1.0
        outer = F.cross_entropy(model(inputs + carries * delta), labels)
        (outer_grad,) = torch.autograd.grad(outer, delta, retain_graph=True)

        v = torch.zeros_like(delta)
        for _ in range(config.K):
            (jvp,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
            v = jvp + outer_grad
        surrogate = outer + (v.detach() * mapped).sum()
        return surrogate, {"loss": outer.detach(), "inner_loss": inner.detach()}
    return objective


@register_defense("i-bau", config=IBAUConfig)
def defend(model: nn.Module, clean_batches, config: Optional[IBAUConfig] = None, *,
           on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
           progress: Optional[str] = None):
    """Run i-BAU on a copy of `model` (one epoch of `fit` per round); returns (purified, history)."""
    config = config or IBAUConfig()
    model = copy.deepcopy(model)
    state = {"delta": universal_perturbation(model, clean_batches, config)}

    def next_round(epoch: int, current: nn.Module) -> Dict[str, float]:
        row = dict(on_epoch(epoch, current)) if on_epoch is not None else {}
        row["delta_norm"] = float(state["delta"].norm())
        if epoch < config.rounds:
            state["delta"] = universal_perturbation(current, clean_batches, config)
        return row

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = fit(model, clean_batches, optimizer, hypergradient_objective(state, config, generator),
                  config.rounds, bn_train=config.bn_train, on_epoch=next_round, progress=progress)
    return model, history
