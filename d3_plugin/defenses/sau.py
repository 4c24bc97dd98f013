"""SAU — Shared Adversarial Unlearning (Wei, Zhang, Zha, Wu; NeurIPS 2023).

The backdoor risk of the purified model h is bounded by its risk on *shared adversarial examples*
(SAEs): perturbed inputs that fool both h and the frozen backdoored model h₀ into the same class.
Each batch:
1. SAE search — PGD (pixel L∞ ε = 0.2, 5 sign steps of 0.2, start at +ε) minimising
   β₁·L_adv + β₂·L_share:  L_adv = −½·mean over samples not yet fooled of CE(h(x'), y) + CE(h₀(x'), y),
   L_share = mean over samples not yet shared of JS(h(x') ‖ h₀(x')).
2. unlearning — one Adam step of   λ₁·CE(h(x), y) + λ₂·CE(h(x'), y) + λ₃·L_sar,  where L_sar pushes
   h away from h₀'s adversarial class ŷ₀ on samples that fool h₀ (ŷ₀ ≠ y and ŷ₀ ≠ h₀(x)):
   mean of −log(1 − p_h(ŷ₀ | x')), samples with p_h(ŷ₀ | x') < 0.001 discarded.
Both models stay in eval mode (BackdoorBench's default, no --train_mode).

Honest notes on what differs from BackdoorBench's defense/sau.py: SAEs are clipped to the valid image
range (their clip is commented out); no early stop of the PGD once every sample is shared; L_sar
uses a log-sum-exp form of log(1 − p) instead of averaging two clamped forms; h and h₀ evaluate x and
x' in separate forward passes (same result in eval mode).

Defaults and their source: BackdoorBench config/defense/sau/{cifar10,gtsrb,...}.yaml — eps (trigger_norm)
0.2, step_size (adv_lr) 0.2, steps 5, init max, β₁ 0.01, β₂ 1, λ₁ 1, λ₂ 0, λ₃ 1, Adam lr 1e-4,
epochs (n_rounds) 100, batch 256.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, asdict
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..training import fit
from ..adversarial import INITS, InputBox, evaluating, input_box, pgd
from ..registry import register_defense


@dataclass
class SAUConfig:
    epochs: int = 100
    lr: float = 1e-4
    eps: float = 0.2
    step_size: float = 0.2
    steps: int = 5
    init: str = "max"
    beta1: float = 0.01
    beta2: float = 1.0
    lmd1: float = 1.0
    lmd2: float = 0.0
    lmd3: float = 1.0
    batch_size: int = 256
    bn_train: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.eps < 0 or self.steps < 0 or self.epochs < 0:
            raise ValueError("SAU needs eps, steps and epochs ≥ 0")

    def to_dict(self) -> dict:
        return asdict(self)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen–Shannon divergence between two softmax distributions."""
    p, q = F.softmax(logits_a, 1).clamp(min=1e-8), F.softmax(logits_b, 1).clamp(min=1e-8)
    m = (p + q) / 2
    return 0.5 * ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1))


def shared_attack_loss(model, reference, inputs, labels, config: SAUConfig):
    """Loss PGD maximises (−(β₁·L_adv + β₂·L_share)) to find shared adversarial examples."""
    with torch.no_grad():
        clean_pred, clean_pred_ref = model(inputs).argmax(1), reference(inputs).argmax(1)
    n = len(inputs)

    def loss_fn(perturbed):
        logits, logits_ref = model(perturbed), reference(perturbed)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        adv = (F.cross_entropy(logits, labels, reduction="none")[~fooled].sum()
               + F.cross_entropy(logits_ref, labels, reduction="none")[~fooled_ref].sum())
        loss_adv = -adv / (2 * n)
        loss_share = js_divergence(logits, logits_ref)[~shared].sum() / n
        return -(config.beta1 * loss_adv + config.beta2 * loss_share)
    return loss_fn


def shared_risk(logits_adv, logits_ref_clean, logits_ref_adv, labels) -> torch.Tensor:
    """L_sar: mean over the batch of −log(1 − p_h(ŷ₀ | x')) on samples whose x' fools h₀."""
    target = logits_ref_adv.argmax(1)
    fools_ref = (target != labels) & (target != logits_ref_clean.argmax(1))
    log_p = F.log_softmax(logits_adv, 1)
    others = log_p.masked_fill(F.one_hot(target, log_p.shape[1]).bool(), float("-inf"))
    log_not_target = torch.logsumexp(others, 1)  # log(1 − p(ŷ₀))
    keep = fools_ref & (log_p.gather(1, target[:, None]).squeeze(1).exp() >= 1e-3)
    return -(log_not_target * keep).sum() / len(labels)


def sau_objective(reference: nn.Module, box: InputBox, config: SAUConfig):
    def objective(model, inputs, labels):
        with evaluating(model):
            adversarial = pgd(shared_attack_loss(model, reference, inputs, labels, config), inputs, box,
                              config.eps, config.step_size, config.steps, init=config.init)
        logits, logits_adv = model(inputs), model(adversarial)
        with torch.no_grad():
            ref_clean, ref_adv = reference(inputs), reference(adversarial)
        clean = F.cross_entropy(logits, labels)
        robust = F.cross_entropy(logits_adv, labels)
        shared = shared_risk(logits_adv, ref_clean, ref_adv, labels)
        loss = config.lmd1 * clean + config.lmd2 * robust + config.lmd3 * shared
        return loss, {"loss": loss.detach(), "clean_loss": clean.detach(), "shared_loss": shared.detach()}
    return objective


@register_defense("sau", config=SAUConfig)
def defend(model: nn.Module, clean_batches, config: Optional[SAUConfig] = None, *,
           on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
           progress: Optional[str] = None):
    """SAU on a copy of `model` (the original, frozen, is h₀); returns (purified, history)."""
    config = config or SAUConfig()
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = fit(model, clean_batches, optimizer, sau_objective(reference, input_box(clean_batches), config),
                  config.epochs, bn_train=config.bn_train, on_epoch=on_epoch, progress=progress)
    return model, history
