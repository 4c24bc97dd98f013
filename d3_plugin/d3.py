"""D3 — Distance-Driven Detoxification (Wei, Liu, Zha, ICCV 2025), the algorithm only.

    minimise over θ with θs ∈ S:   −Σ_layers ‖W − W_init‖_F  +  λ · hinge(L_clean − ε)

solved by projected gradient descent: one optimizer step on every parameter, then each selected
weight W is rescaled back onto S = {‖W‖_F = ‖W_init‖_F}. θs are the weights (not biases) of the
selected layers. This module knows nothing about files, datasets or BackdoorBench: it takes a model,
an iterable of clean (inputs, labels) batches and a `D3Config`.

Defaults and their source (paper = arXiv 2411.09585; code = the authors' defense/d3.py):
    lam=1                           measured (docs/d3-stability.md): with the paper's λ 10 and a short
                                    budget the distance term barely moves θs and a Blended backdoor came
                                    back in 2 of 3 seeds; λ 1 is in the paper's range (Table 7: 1–40)
    eps=0.1                         paper §4 (the authors' YAML ships lmd 0.5)
    hinge="sample"                  code: mean_i relu(CE_i − ε); "batch" is the paper's relu(mean CE − ε)
    normalize=True                  code: loss / (λ + 1) when λ > 1
    warm_start="random"             code: uniform(−0.5, 0.5) rescaled to ‖W_init‖_F
    layers=None → every nn.Linear   paper: "the linear layers"; code selects a named module (callers
                                    pass the architecture's θs: d3_targets.default_layers(name, preset))
    lr=0.01, lr_rest=None (= lr)    code; per architecture where measured (ARCHITECTURE_SOLVER)
    momentum=0.9, wd=0,
    cosine schedule, batch 256,
    bn_train=True, epochs=100       code (CIFAR-10)

Candidates measured for issue 28, all off by default (docs/d3-efficacy.md has their numbers): distill (weight
of T²·KL to the input model's soft labels on the clean batches, temperature distill_temperature), mixup (Beta α
of mixup on the clean batches), unlearn (weight of the true-label loss under the input model's universal
perturbation towards its easiest class, pixel L∞ unlearn_eps).

PRESETS["paper"] restores the paper's λ 10 (and, through d3_targets.default_layers(name, "paper"), its θs, and
the code's single lr 0.01 on every architecture).

Run settings (not the algorithm's): precision="auto" (d3_plugin.precision: bf16 autocast on a CPU with
native bf16 or a bf16 GPU, fp16 + GradScaler on older GPUs, else fp32; weights stay fp32 and the
distance and projection are computed in fp32), channels_last=None (precision's rule), eval_every=1
(on_epoch after every N-th epoch and the last), eval_batch_size=None (for callers' test loaders; None = by device,
evaluation.eval_batch_size).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, asdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import is_number
from .precision import check_precision, full_precision, model_device, resolve_precision
from .registry import register_defense
from .training import EpochCheckpoint, cosine, fit, sgd

WARM_STARTS = ("near", "random", "middle", "far", "noise")
PRESETS = {"default": {}, "paper": {"lam": 10.0}}  # values that differ from D3Config's defaults
HINGES = ("sample", "batch")


@dataclass
class D3Config:
    lam: float = 1.0
    eps: float = 0.1
    hinge: str = "sample"
    normalize: bool = True
    warm_start: str = "random"
    layers: Optional[Sequence[str]] = None
    epochs: int = 100
    lr: float = 0.01  # of θs (and of every weight when lr_rest is None)
    lr_rest: Optional[float] = None  # of every other parameter (None: lr)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    bn_train: bool = True
    seed: int = 0
    precision: str = "auto"
    channels_last: Optional[bool] = None
    eval_every: int = 1
    eval_batch_size: Optional[int] = None
    distill: float = 0.0  # weight of the input model's clean soft labels (0 = off; issue 28 candidate)
    distill_temperature: float = 2.0
    mixup: float = 0.0  # Beta(α, α) of mixup on the clean batches (0 = off; issue 28 candidate)
    unlearn: float = 0.0  # weight of the true-label loss under the input model's shortcut δ (0 = off; issue 28)
    unlearn_eps: float = 0.1  # the shortcut's pixel L∞ budget

    def __post_init__(self):
        if self.hinge not in HINGES:
            raise ValueError(f"hinge must be one of {HINGES}, got {self.hinge!r}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {self.warm_start!r}")
        for option in ("lam", "eps", "lr", "momentum", "weight_decay", "distill", "distill_temperature",
                       "mixup", "unlearn", "unlearn_eps"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{option} must be a finite number ≥ 0, got {value!r} (default "
                                 f"{getattr(D3Config, option)})")
        if self.distill_temperature == 0:
            raise ValueError("distill_temperature must be > 0 (the softmax temperature of the soft labels), got 0")
        if self.lr_rest is not None and not (is_number(self.lr_rest) and self.lr_rest > 0):
            raise ValueError(f"lr_rest must be a finite number > 0 (the lr of the weights outside θs), or empty for "
                             f"lr, got {self.lr_rest!r}")
        if self.lr == 0 or self.momentum >= 1:
            raise ValueError(f"lr must be > 0 and momentum < 1, got lr {self.lr!r}, momentum {self.momentum!r}")
        for option, least in (("epochs", 0), ("batch_size", 1)):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{option} must be an integer ≥ {least}, got {value!r}")
        if self.layers is not None and (isinstance(self.layers, str) or not self.layers
                                        or not all(isinstance(n, str) and n.strip() for n in self.layers)):
            raise ValueError(f"layers must name modules, e.g. --layers fc (leave it out for every nn.Linear), "
                             f"got {self.layers!r}")
        check_precision(self.precision)
        for option in ("eval_every", "eval_batch_size"):
            value = getattr(self, option)
            if value is None and option == "eval_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}; pass e.g. --{option} 1")

    def to_dict(self) -> dict:
        return asdict(self)


def select_weights(model: nn.Module, layers: Optional[Sequence[str]] = None) -> Dict[str, nn.Parameter]:
    """θs: weights of every nn.Linear (layers=None) or of every Linear/Conv2d inside the named modules."""
    modules = dict(model.named_modules())
    if layers is None:
        chosen = {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    else:
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ValueError(f"no module named {', '.join(unknown)} in the model; pick from its named_modules()")
        chosen = {f"{layer}.{sub}".rstrip("."): m for layer in layers
                  for sub, m in modules[layer].named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if not chosen and layers is None:
        raise ValueError("no weights selected for D3: the model has no nn.Linear; name the layers to use")
    if not chosen:
        raise ValueError(f"{', '.join(layers)} hold(s) no nn.Linear or nn.Conv2d weights for D3; name such a "
                         f"module or a block that contains one (e.g. the classifier head)")
    return {f"{name}.weight": m.weight for name, m in chosen.items()}


def distance(weights: Dict[str, torch.Tensor], initial: Dict[str, torch.Tensor]) -> torch.Tensor:
    """d(θs, θs_init) = Σ over selected layers of ‖W − W_init‖_F (not squared)."""
    return sum(torch.linalg.vector_norm(w - initial[name]) for name, w in weights.items())


@torch.no_grad()
def project(weights: Dict[str, torch.Tensor], norms: Dict[str, torch.Tensor]) -> None:
    """Rescale each W in place onto ‖W‖_F = norms[name] (a zero W has no direction and is left alone)."""
    for name, w in weights.items():
        current = torch.linalg.vector_norm(w)  # no `if current > 0`: that would sync the host every step
        w.mul_(torch.where(current > 0, norms[name] / current, torch.ones_like(current)))


@torch.no_grad()
def warm_start(weights: Dict[str, torch.Tensor], mode: str, generator: torch.Generator) -> None:
    """Re-initialise θs in place before training (the authors' "warm-up").

    near: keep W.  random: uniform(−0.5, 0.5).  far: −W.  noise: W + N(0, std(W)²).  middle: 0.
    Every mode but middle is then rescaled to ‖W_init‖_F, so training starts inside S; middle (the
    centre of S) reaches S at the first projection.
    """
    for w in weights.values():
        norm = torch.linalg.vector_norm(w)
        if mode == "random":
            fresh = torch.rand(w.shape, generator=generator) - 0.5
        elif mode == "noise":
            fresh = w.cpu() + torch.randn(w.shape, generator=generator) * w.std().cpu()
        elif mode == "far":
            fresh = -w
        elif mode == "middle":
            fresh = torch.zeros_like(w)
        else:
            continue
        fresh = fresh.to(w.device, w.dtype)
        scale = norm / torch.linalg.vector_norm(fresh) if mode != "middle" else 1.0
        w.copy_(fresh * scale)


def mixed(inputs: torch.Tensor, labels: torch.Tensor, alpha: float):
    """Mixup (Zhang et al. 2018): each image blended with another of the batch by a ~ Beta(α, α); returns the
    mixed images and (y, y_other, a), the soft target a·onehot(y) + (1 − a)·onehot(y_other) that clean_hinge
    takes. Draws from torch's global RNG."""
    a = torch.distributions.Beta(alpha, alpha).sample((len(inputs),)).to(inputs.device)
    other = torch.randperm(len(inputs)).to(inputs.device)
    shape = (-1,) + (1,) * (inputs.dim() - 1)
    images = a.view(shape) * inputs + (1 - a.view(shape)) * inputs[other]
    return images, (labels, labels[other], a)


def clean_hinge(logits: torch.Tensor, labels, eps: float, mode: str = "sample"):
    """Hinge on the clean loss: mean_i relu(CE_i − ε) ("sample") or relu(mean_i CE_i − ε) ("batch"); `labels`
    may be mixup's (labels, other labels, a)."""
    if isinstance(labels, tuple):
        first, second, a = labels
        per_sample = (a * F.cross_entropy(logits, first, reduction="none")
                      + (1 - a) * F.cross_entropy(logits, second, reduction="none"))
    else:
        per_sample = F.cross_entropy(logits, labels, reduction="none")
    hinge = F.relu(per_sample - eps).mean() if mode == "sample" else F.relu(per_sample.mean() - eps)
    return hinge, per_sample.mean()


def soft_label_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), the batch mean (Hinton et al.'s distillation loss)."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    student = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


SHORTCUT_IMAGES = 256  # reserved images the input model's shortcut is fitted on


def input_shortcut(model: nn.Module, clean_batches, eps: float):
    """(δ, box): the universal perturbation (pixel L∞ ≤ eps) that sends the most clean images to one class on
    the input model (d3_plugin.probe, in eval mode; on a backdoored model that class is the target, δ the
    shortcut to it), fitted on the first SHORTCUT_IMAGES reserved images without augmentation."""
    from .data import Loader
    from .adversarial import input_box
    from .probe import ProbeConfig, class_perturbations
    plain = Loader(clean_batches.data.subset(torch.arange(min(SHORTCUT_IMAGES, len(clean_batches.data)))),
                   clean_batches.spec, SHORTCUT_IMAGES, device=clean_batches.device)
    found = class_perturbations(model, plain, clean_batches.spec, ProbeConfig(eps=eps, steps=20, step_size=eps / 5))
    _, delta = max(found.values(), key=lambda score_delta: score_delta[0])
    return delta, input_box(clean_batches)


def objective(weights: Dict[str, torch.Tensor], initial: Dict[str, torch.Tensor], config: D3Config,
              teacher: Optional[nn.Module] = None, shortcut=None):
    """The D3 loss −d + λ·hinge (divided by λ + 1 when `normalize` and λ > 1) as a training objective; with
    a `teacher` (the input model) also + distill·soft_label_loss on the same clean batch, with a `shortcut`
    (input_shortcut) also + unlearn·CE of the batch under δ with its true labels."""
    scale = 1.0 / (config.lam + 1.0) if config.normalize and config.lam > 1 else 1.0
    device = next(iter(weights.values())).device

    def d3_loss(model, inputs, labels):
        clean_inputs, true_labels = inputs, labels
        if config.mixup > 0:
            inputs, labels = mixed(inputs, labels, config.mixup)
        logits = model(inputs).float()
        hinge, clean_loss = clean_hinge(logits, labels, config.eps, config.hinge)
        with full_precision(device):  # the distance stays fp32 under autocast
            dist = distance(weights, initial)
        loss = config.lam * hinge - dist
        stats = {"clean_loss": clean_loss.detach(), "hinge": hinge.detach(), "distance": dist.detach()}
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(inputs).float()
            soft = soft_label_loss(logits, teacher_logits, config.distill_temperature)
            loss = loss + config.distill * soft
            stats["distill"] = soft.detach()
        if shortcut is not None:  # the true class despite the input model's shortcut
            delta, box = shortcut
            unlearned = F.cross_entropy(model(box.clamp(clean_inputs + delta)).float(), true_labels)
            loss = loss + config.unlearn * unlearned
            stats["unlearn"] = unlearned.detach()
        loss = loss * scale
        return loss, {"loss": loss.detach(), **stats}
    return d3_loss


def parameter_groups(model: nn.Module, weights: Dict[str, torch.Tensor], config: D3Config):
    """Every parameter at `lr`, or θs at `lr` and the rest at `lr_rest`."""
    if config.lr_rest is None:
        return model.parameters()
    chosen = {id(w) for w in weights.values()}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": list(weights.values())}, {"params": rest, "lr": config.lr_rest}]


# Solver settings per architecture, where measured (docs/d3-efficacy.md, issue 28). small_cnn: θs restart from
# a random warm start, so they are re-learnt at 10× the code's lr while every other weight keeps its 0.01. At
# Table 1's budget (240 steps) this gave 4.1–5.3 ACC points and removed the one backdoor the code's lr kept (LF:
# 37 %), on the dev half of 3 records × 3 seeds. Not yet measured on preactresnet18, which keeps the code's lr.
ARCHITECTURE_SOLVER = {"small_cnn": {"lr": 0.1, "lr_rest": 0.01}}


def architecture_layers(model_name, preset: str) -> dict:
    """D3's θs for an architecture under a preset (`d3_targets.default_layers`), and under the default preset its
    solver settings (ARCHITECTURE_SOLVER)."""
    from .d3_targets import default_layers
    solver = ARCHITECTURE_SOLVER.get(model_name, {}) if preset == "default" else {}
    return {"layers": default_layers(model_name, preset), **solver}


# BackdoorBench / the authors' option names for D3's settings, and the choices D3 does not offer
BACKDOORBENCH_NAMES = {"lmd": "lam", "select_layer_name": "layers", "warm_up_method": "warm_start",
                       "train_mode": "bn_train"}
BACKDOORBENCH_FIXED = {"Lp": (2, 2.0), "client_optimizer": ("sgd",), "lr_scheduler": ("CosineAnnealingLR",)}


@register_defense("d3", config=D3Config, data="clean", presets=PRESETS, model_defaults=architecture_layers,
                  aliases=BACKDOORBENCH_NAMES, fixed=BACKDOORBENCH_FIXED)
def detoxify(model: nn.Module, clean_batches: Iterable, config: Optional[D3Config] = None, *,
             on_epoch: Optional[Callable[[int, nn.Module], Dict[str, float]]] = None,
             progress: Optional[str] = None,
             checkpoint: Optional[str | EpochCheckpoint] = None) -> Tuple[nn.Module, List[Dict[str, float]]]:
    """Run D3 on a copy of `model`; returns (purified model, per-epoch history).

    History rows: epoch, lr, loss, clean_loss, hinge, distance (means over the epoch's batches, taken
    before each step), plus whatever `on_epoch(epoch, model)` returns (e.g. ACC/ASR) after every
    `config.eval_every`-th epoch and the last. Training runs in `config.precision` (module docstring).
    `checkpoint` (a path, or an EpochCheckpoint whose path is used): saved after every epoch and resumed
    from when it exists (training.fit); it is tied to this input model (θs_init, compared bit for bit on
    the CPU; not the norms, which differ in the last bit between devices) and D3's algorithm settings, so
    a resume with another model or config is refused and one on another device is not (docs/gpu.md).
    """
    config = config or D3Config()
    model = copy.deepcopy(model)
    weights = select_weights(model, config.layers)
    initial = {name: w.detach().clone() for name, w in weights.items()}
    norms = {name: torch.linalg.vector_norm(w) for name, w in initial.items()}
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.distill > 0 else None
    shortcut = input_shortcut(model, clean_batches, config.unlearn_eps) if config.unlearn > 0 else None
    warm_start(weights, config.warm_start, torch.Generator().manual_seed(config.seed))
    optimizer = sgd(parameter_groups(model, weights, config), config.lr, config.momentum, config.weight_decay)
    precision = resolve_precision(config.precision, model_device(model), model=model,
                                  channels_last=config.channels_last)
    if checkpoint is not None:  # the warm start above is seeded: a resumed run redoes it, then loads θ
        settings = {name: getattr(config, name) for name in ("lam", "eps", "hinge", "normalize", "warm_start",
                    "layers", "lr", "momentum", "weight_decay", "bn_train", "seed", "distill",
                    "distill_temperature", "mixup", "unlearn", "unlearn_eps", "lr_rest")}  # epochs: fit checks them
        checkpoint = EpochCheckpoint(getattr(checkpoint, "path", checkpoint),
                                     {"theta_init": initial, "settings": settings})
    history = fit(model, clean_batches, optimizer, objective(weights, initial, config, teacher, shortcut),
                  config.epochs, scheduler=cosine(optimizer, config.epochs),
                  after_step=lambda _: project(weights, norms),
                  bn_train=config.bn_train, on_epoch=on_epoch, on_epoch_every=config.eval_every,
                  precision=precision, progress=progress, checkpoint=checkpoint)
    return model, history
