"""The attacks: `Attack` (trigger factory, clean-label flag, default parameters) objects registered in
`d3_plugin.registry` (group "attack"), with the record transform `sam-flatten` and the trained-trigger
attack `input-aware` (its trigger is a network trained with the model, so it is no static `Attack`).
Other packages add theirs through the entry-point group `backdoorbench.attacks` (see `d3_plugin.registry`
for the shapes accepted).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

from .. import registry
from ..data import ImageSet
from .badnets import BadNets
from .base import Trigger, poison_test_set, poison_training_set
from .blended import Blended
from .input_aware import InputAwareConfig, input_aware
from .lf import LowFrequency
from .sam_flatten import FlattenConfig, sam_flatten
from .sig import SIG
from .wanet import WaNet, poison_with_cross


@dataclass(frozen=True)
class Attack:
    """How to run one attack: `trigger(**trigger_params)` builds the trigger; `poison(train, trigger,
    ratio, target, clean_label=, seed=, **poison_params)` builds the poisoned training set."""

    name: str
    trigger: Callable[..., Trigger]
    description: str
    clean_label: bool = False
    trigger_params: Mapping[str, Any] = field(default_factory=dict)
    poison_params: Mapping[str, Any] = field(default_factory=dict)
    poison: Callable[..., ImageSet] = poison_training_set
    ratio: float = 0.1
    target: int = 0

    def split_params(self, params: Optional[Mapping[str, Any]] = None) -> tuple[dict, dict]:
        """Defaults overridden by `params`, split into (trigger params, poisoning params)."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.trigger_params) - set(self.poison_params))
        if unknown:
            known = ", ".join(sorted({**self.trigger_params, **self.poison_params})) or "none"
            raise ValueError(f"attack {self.name!r} has no parameter {', '.join(unknown)}; known: {known}")
        trigger = {k: params.get(k, v) for k, v in self.trigger_params.items()}
        poison = {k: params.get(k, v) for k, v in self.poison_params.items()}
        return trigger, poison

    def make_trigger(self, **params) -> Trigger:
        return self.trigger(**self.split_params(params)[0])

    def poison_train(self, train: ImageSet, *, ratio: Optional[float] = None, target: Optional[int] = None,
                     seed: int = 0, **params) -> ImageSet:
        trigger_params, poison_params = self.split_params(params)
        return self.poison(train, self.trigger(**trigger_params), self.ratio if ratio is None else ratio,
                           self.target if target is None else target, clean_label=self.clean_label, seed=seed,
                           **poison_params)

    def poison_test(self, test: ImageSet, *, target: Optional[int] = None, **params) -> ImageSet:
        """The backdoor test set (non-target samples, triggered, labelled target)."""
        return poison_test_set(test, self.make_trigger(**params), self.target if target is None else target)


def _blended_trigger(alpha: float = 0.2, seed: int = 0, image: Optional[str] = None) -> Blended:
    return Blended.from_image(image, alpha) if image else Blended(alpha=alpha, seed=seed)


badnets = Attack("badnets", BadNets, "3×3 white patch, bottom-right (Gu et al. 2017)",
                 trigger_params={"size": 3, "position": "bottom-right", "value": 255, "margin": 0})
blended = Attack("blended", _blended_trigger, "image alpha-blended with a noise pattern or image, α = 0.2 "
                 "(Chen et al. 2017)", trigger_params={"alpha": 0.2, "seed": 0, "image": None})
sig = Attack("sig", SIG, "clean-label sinusoidal signal Δ = 40, f = 6 (Barni et al. 2019)", clean_label=True,
             trigger_params={"delta": 40.0, "frequency": 6.0})
wanet = Attack("wanet", WaNet, "smooth warping field k = 4, s = 0.5, noise mode cross ratio 2 "
               "(Nguyen & Tran 2021)", trigger_params={"k": 4, "s": 0.5, "grid_rescale": 1.0, "seed": 0},
               poison_params={"cross_ratio": 2.0}, poison=poison_with_cross)
lf = Attack("lf", LowFrequency, "low-pass filtered seeded noise, additive, range 0–51 (after Zeng et al. "
            "2021; not adversarially optimised)", trigger_params={"cutoff": 3.0, "budget": 51.0, "seed": 0})

for _attack in (badnets, blended, sig, wanet, lf):
    registry.register_attack(_attack)
SAM_FLATTEN = "sam-flatten"
registry.register_attack(sam_flatten, name=SAM_FLATTEN, config=FlattenConfig,
                         notes="the paper's adaptive attack: (A)SAM-flattens an existing record's backdoor (ρ 1–3)")
INPUT_AWARE = "input-aware"
registry.register_attack(input_aware, name=INPUT_AWARE, config=InputAwareConfig,
                         notes="per-image triggers from a generator trained with the classifier "
                               "(Nguyen & Tran 2020)")


def resumes(attack: str) -> bool:
    """Whether training `attack` keeps the epoch checkpoints that `d3-plugin attack --resume` continues."""
    return attack != INPUT_AWARE


def attack_plugin(name: str, obj: Any) -> registry.Entry:
    """The entry of an attack plugin: an `Attack`, or a trigger factory whose parameters all have defaults
    (TypeError: neither)."""
    if isinstance(obj, Attack):
        return registry.Entry(name, "attack", obj, data="poisoned")
    if not callable(obj):
        raise TypeError(f"{type(obj).__name__} is neither an Attack nor a trigger factory")
    parameters = inspect.signature(obj).parameters.values()
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise TypeError(f"trigger factory {getattr(obj, '__name__', name)} needs defaults for {', '.join(required)}")
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    description = (obj.__doc__ or "").strip().split("\n")[0]
    attack = Attack(name, obj, description or name, trigger_params=defaults)
    return registry.Entry(attack.name, "attack", attack, data="poisoned", notes=attack.description)


registry.PLUGIN_READERS["attack"] = attack_plugin


def attacks() -> Dict[str, Attack]:
    """Every trigger attack by name: ours and those of `backdoorbench.attacks` plugins (not sam-flatten nor
    input-aware)."""
    return {e.name: e.run for e in registry.list_entries("attack") if isinstance(e.run, Attack)}


def get_attack(name: str) -> Attack:
    attack = registry.get(name, "attack").run
    if not isinstance(attack, Attack):
        raise ValueError(f"{name!r} is not a trigger attack; run `d3-plugin attack {name}` for it")
    return attack
