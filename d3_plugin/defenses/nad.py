"""NAD: neural attention distillation (Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021, arXiv 2101.05930).

A teacher is fine-tuned from the backdoored model on the clean reserved set (plain FT); the student,
also starting from the backdoored model, is then trained on the same data with
    CE + Σ_k β_k · MSE(A(f_k^student), A(f_k^teacher)),   A(f) = normalise(Σ_c |f_c|^p)
over a few intermediate feature maps f_k. Defaults follow BackdoorBench's config/defense/nad/cifar10.yaml
(teacher and student 10 epochs each, β = 500, 1000, 1000, p = 2, SGD lr 0.01, wd 5e-4, cosine).

Layers: by default the three last residual stages (`layer2..layer4`) when the model has them
(ResNets), otherwise the last three convolution blocks (a Sequential holding exactly one Conv2d, or the
Conv2d itself) — e.g. features.0/2/4 of small_cnn. Name them explicitly with `layers`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..training import cosine, fit, sgd
from .ft import FTConfig, finetune
from ..registry import register_defense


@dataclass
class NADConfig:
    teacher_epochs: int = 10
    epochs: int = 10
    betas: Sequence[float] = (500.0, 1000.0, 1000.0)
    power: float = 2.0
    layers: Optional[Sequence[str]] = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    seed: int = 0
    budget_fields: ClassVar[tuple] = ('teacher_epochs', 'epochs')  # what a shared `--epochs` sets

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if len(self.layers) != len(self.betas):
                raise ValueError(f"NAD needs one beta per layer: {len(self.layers)} layers, {len(self.betas)} betas")

    def to_dict(self) -> dict:
        return asdict(self)


def attention_layers(model: nn.Module, count: int = 3) -> List[str]:
    """Default distillation layers: ResNet stages layer2..4, else the last `count` conv blocks."""
    modules = dict(model.named_modules())
    stages = [f"layer{i}" for i in range(5 - count, 5)]
    if all(name in modules for name in stages):
        return stages
    blocks = []
    for name, module in modules.items():
        if not isinstance(module, nn.Conv2d):
            continue
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name)
        convs = [m for m in parent.modules() if isinstance(m, nn.Conv2d)] if parent is not None else []
        blocks.append(parent_name if isinstance(parent, nn.Sequential) and len(convs) == 1 and parent_name else name)
    if not blocks:
        raise ValueError("NAD found no convolution layers to distil; name them with `layers`")
    return blocks[-count:]


def attention_map(features: torch.Tensor, power: float) -> torch.Tensor:
    """Σ_c |f_c|^p per position, flattened and L2-normalised per sample."""
    if features.dim() != 4:
        raise ValueError(f"NAD layers must output feature maps (N, C, H, W), got shape {tuple(features.shape)}")
    return F.normalize(features.abs().pow(power).sum(1).flatten(1), dim=1)


@contextmanager
def tap(model: nn.Module, layers: Sequence[str], store: Dict[str, torch.Tensor], clone: bool = False):
    """Record the outputs of the named modules into `store` while the context is open."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"no module named {', '.join(missing)} in the model; pick from its named_modules()")

    def hook_for(name):
        def hook(_module, _inputs, output):
            store[name] = output.clone() if clone else output
        return hook
    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@register_defense("nad", config=NADConfig)
def nad(model: nn.Module, clean_batches: Iterable, config: Optional[NADConfig] = None, *,
        on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
        progress: Optional[str] = None):
    """Distil a fine-tuned teacher's attention into a copy of `model`; returns (student, history)."""
    config = config or NADConfig()
    teacher_config = FTConfig(epochs=config.teacher_epochs, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, batch_size=config.batch_size, seed=config.seed)
    teacher, _ = finetune(model, clean_batches, teacher_config,
                          progress=f"{progress} teacher" if progress else None)
    teacher.eval()
    student = copy.deepcopy(model)
    layers = list(config.layers or attention_layers(student, len(config.betas)))
    betas = config.betas[-len(layers):]
    student_maps: Dict[str, torch.Tensor] = {}
    teacher_maps: Dict[str, torch.Tensor] = {}

    def objective(net, inputs, labels):
        ce = F.cross_entropy(net(inputs), labels)
        with torch.no_grad():
            teacher(inputs)
        at = sum(beta * F.mse_loss(attention_map(student_maps[name], config.power),
                                   attention_map(teacher_maps[name], config.power))
                 for beta, name in zip(betas, layers))
        loss = ce + at
        return loss, {"loss": loss.detach(), "clean_loss": ce.detach(), "attention": at.detach()}

    optimizer = sgd(student.parameters(), config.lr, config.momentum, config.weight_decay)
    with tap(student, layers, student_maps), tap(teacher, layers, teacher_maps, clone=True):
        history = fit(student, clean_batches, optimizer, objective, config.epochs,
                      scheduler=cosine(optimizer, config.epochs), on_epoch=on_epoch, progress=progress)
    return student, history
