"""CLP: channel Lipschitzness-based pruning (Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022, arXiv 2208.03111). Data-free: no clean sample is ever used.

The channel Lipschitz constant (CLC) of output channel k of a layer is the Lipschitz constant of the map
from the input image to that channel. The paper bounds it by ‖W_k‖₂ (the spectral norm of the channel's
own weight) times the spectral norms of the earlier layers; the latter factor is common to all channels
of a layer, so within a layer channels are ranked by ‖W_k‖₂ alone (the UCLC). Channels that the trigger
drives hard have outlying UCLCs, and removing them removes the backdoor. For every nn.Conv2d:

    UCLC_k = σ_max(W_k) · s_k      W_k = conv.weight[k] as a (C_in/groups) × (kh·kw) matrix (as the authors' code)
    s_k    = |γ_k| / sqrt(running_var_k + eps)  from the BatchNorm that normalises the conv's output: the
             paper's CONV-BN case, where BN is folded into the conv; s_k = 1 for a conv without a BN
    prune k  ⇔  UCLC_k > mean + u · std      (mean and unbiased std over that layer's channels)

Pairing a conv with its BN: the Conv2d / BatchNorm2d modules are walked in `named_modules()` order (their
registration order, which for the models here is the order the data flows in); a conv is paired with the
module right after it if that module is a BatchNorm2d with num_features == out_channels. Each BN is thus
claimed by at most one conv. A conv followed by another conv, by a mismatched BN or by nothing is
unpaired. Examples: in a plain ResNet / `small_cnn` every conv gets the BN that follows it. In
PreAct-ResNet18 (BN before conv) the stem `conv1` gets `layer1.0.bn1`, a block's `conv1` gets the block's
`bn2`, a block's `conv2` gets the next block's `bn1` (whose input is conv2's output plus the shortcut, so
the bound ignores the shortcut), a projection block's `conv2` is unpaired (next comes `shortcut.0`, which
gets the next block's `bn1`), and `layer4.1.conv2` is unpaired.

Pruning channel k removes its activation. Paired with an affine BN: γ_k = β_k = 0, so the BN outputs
exactly 0 for that channel whatever the conv computes (zeroing the conv's weight instead would leave the
BN emitting the constant β_k − γ_k·μ_k/σ_k). Unpaired, or paired with a BN without affine parameters: the
conv's output-channel weight (and bias) are zeroed, so the conv outputs 0 there (after a non-affine BN the
channel is then the constant −μ_k/σ_k: it no longer depends on the input). Nothing is reshaped: the
pruned model has the input's architecture and state_dict keys. Only Conv2d channels are scored (as in the
paper); a layer with fewer than two channels has no spread and is skipped. A BN without running
statistics contributes |γ_k| only (its 1/σ needs data).

Defaults and their source: u = 3 (BackdoorBench config/defense/clp/cifar10.yaml, cifar100.yaml and
gtsrb.yaml; its tiny.yaml uses 5). Differences from the authors' code (which BackdoorBench reuses): it
scales by 1/sqrt(running_var) without BN's eps, pairs each BN with whichever conv came last without
checking shapes, and never prunes a conv that has no BN after it (`prune_unpaired=False` reproduces the
last point).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..registry import register_defense

BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


@dataclass
class CLPConfig:
    u: float = 3.0  # prune channels whose UCLC exceeds its layer's mean + u·std
    prune_unpaired: bool = True  # also score and prune convs with no BN after them (weight alone)

    def __post_init__(self):
        if isinstance(self.u, bool) or not isinstance(self.u, Real) or not math.isfinite(self.u) or self.u < 0:
            raise ValueError(f"CLP needs a finite threshold u ≥ 0, got {self.u!r}")
        if not isinstance(self.prune_unpaired, bool):
            raise ValueError(f"prune_unpaired must be true or false, got {self.prune_unpaired!r}")

    def to_dict(self) -> dict:
        return asdict(self)


Pair = Tuple[str, nn.Conv2d, Optional[str], Optional[nn.Module]]


def conv_bn_pairs(model: nn.Module) -> List[Pair]:
    """(conv name, conv, BN name, BN) for every Conv2d; the BN is None when the conv is unpaired (see above)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d,) + BATCHNORMS)]
    pairs: List[Pair] = []
    for i, (name, module) in enumerate(layers):
        if not isinstance(module, nn.Conv2d):
            continue
        after = layers[i + 1] if i + 1 < len(layers) else (None, None)
        paired = isinstance(after[1], BATCHNORMS) and after[1].num_features == module.out_channels
        pairs.append((name, module, *(after if paired else (None, None))))
    return pairs


def spectral_norms(conv: nn.Conv2d) -> torch.Tensor:
    """σ_max of each output channel's kernel viewed as a (C_in/groups) × (kh·kw) matrix, in float32."""
    weight = conv.weight.detach().float()
    matrices = weight.reshape(weight.shape[0], weight.shape[1], -1)
    if matrices.device.type not in ("cpu", "cuda"):  # SVD is not implemented on every backend
        return torch.linalg.matrix_norm(matrices.cpu(), ord=2).to(matrices.device)
    return torch.linalg.matrix_norm(matrices, ord=2)


def bn_scale(bn: Optional[nn.Module], like: torch.Tensor) -> torch.Tensor:
    """|γ| / sqrt(running_var + eps) of the BN (its parts that exist); ones without a BN."""
    scale = torch.ones_like(like)
    if bn is None:
        return scale
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float().abs()
    if bn.running_var is not None:
        scale = scale / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    return scale


def channel_lipschitz_bounds(model: nn.Module) -> Dict[str, torch.Tensor]:
    """UCLC of every output channel, by conv name (on the conv's device)."""
    bounds = {}
    for name, conv, _, bn in conv_bn_pairs(model):
        norms = spectral_norms(conv)
        bounds[name] = norms * bn_scale(bn, norms)
    return bounds


def outliers(bounds: torch.Tensor, u: float) -> torch.Tensor:
    """Mask of the channels above mean + u·std (unbiased) of their layer; none for fewer than two channels."""
    if bounds.numel() < 2:
        return torch.zeros_like(bounds, dtype=torch.bool)
    return bounds > bounds.mean() + u * bounds.std()


def clp_masks(model: nn.Module, config: Optional[CLPConfig] = None) -> Dict[str, torch.Tensor]:
    """Channels CLP prunes, as a boolean mask per conv name (convs it does not score are left out)."""
    config = config or CLPConfig()
    bounds = channel_lipschitz_bounds(model)
    return {name: outliers(bounds[name], config.u) for name, _, _, bn in conv_bn_pairs(model)
            if bn is not None or config.prune_unpaired}


@torch.no_grad()
def prune_channels(conv: nn.Conv2d, bn: Optional[nn.Module], mask: torch.Tensor) -> None:
    """Zero what produces the masked channels: the BN's γ and β when it has them, else the conv's output."""
    if bn is not None and bn.weight is not None:
        targets = [bn.weight, bn.bias]
    else:
        targets = [conv.weight, conv.bias]
    for param in targets:
        if param is not None:
            param[mask.to(param.device)] = 0


@register_defense("clp", config=CLPConfig, data="none")
def clp(model: nn.Module, clean_batches: Optional[Iterable] = None, config: Optional[CLPConfig] = None, *,
        on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
        progress: Optional[str] = None):
    """Prune a copy of `model` by channel Lipschitzness; returns (model, history).

    Data-free: `clean_batches` is accepted and ignored, and so is `progress` (one pass, no loop). The
    history is one row {"epoch": 1, "pruned", "channels"} (channels: all channels scored), merged with
    `on_epoch(1, model)`'s results when given.
    """
    config = config or CLPConfig()
    model = copy.deepcopy(model)
    masks = clp_masks(model, config)
    for name, conv, _, bn in conv_bn_pairs(model):
        if name in masks:
            prune_channels(conv, bn, masks[name])
    row = {"epoch": 1, "pruned": float(sum(int(m.sum()) for m in masks.values())),
           "channels": float(sum(m.numel() for m in masks.values()))}
    if on_epoch is not None:
        row.update(on_epoch(1, model))
    return model, [row]
