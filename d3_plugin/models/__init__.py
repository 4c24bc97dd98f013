"""Model constructors by name, and each architecture's D3 layers (θs): this package's default and the paper's."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from torch import nn

from .small import SmallCNN

Constructor = Callable[..., nn.Module]
_MODELS: Dict[str, Constructor] = {}
_LAYERS: Dict[str, Dict[str, Optional[Sequence[str]]]] = {}
_SAME = object()


def register_model(name: str, default_layers: Optional[Sequence[str]] = None, paper_layers=_SAME):
    """Decorator: register `constructor(num_classes, in_channels, image_size)` under `name`, with the
    modules D3 moves by default and, when they differ, the paper's (its classifier head)."""
    def decorate(constructor: Constructor) -> Constructor:
        _MODELS[name] = constructor
        _LAYERS[name] = {"default": default_layers,
                         "paper": default_layers if paper_layers is _SAME else paper_layers}
        return constructor
    return decorate


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a model by name, randomly initialised (nothing is downloaded)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def default_layers(name: str, preset: str = "default") -> Optional[Sequence[str]]:
    """The modules whose weights D3 moves for this architecture under a preset (`d3.PRESETS`): "default"
    or "paper". None: every nn.Linear (also for an unregistered name)."""
    if preset not in ("default", "paper"):
        raise ValueError(f"unknown D3 preset {preset!r}; use default or paper")
    return _LAYERS.get(name, {}).get(preset)


# θs for the 3-block CNN: its last conv block and the two-layer head. With only the head (every
# nn.Linear) the demo backdoor kept 7 % ASR; adding the last conv block took it to 2.8 % (README).
@register_model("small_cnn", default_layers=["features.4", "fc", "linear"], paper_layers=None)
def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


from . import zoo  # noqa: E402,F401  (registers preactresnet18 and BackdoorBench's torchvision names)
