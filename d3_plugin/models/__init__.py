"""Model constructors by name, and each architecture's classifier head (D3's θs: d3_plugin.d3_targets)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from .small import SmallCNN

Constructor = Callable[..., nn.Module]
_MODELS: Dict[str, Constructor] = {}
_HEADS: Dict[str, str] = {}


def register_model(name: str, head: str):
    """Decorator: register `constructor(num_classes, in_channels, image_size)` under `name`, with the name
    of its classifier module (`head`: the last layer, the one that maps features to classes)."""
    def decorate(constructor: Constructor) -> Constructor:
        _MODELS[name] = constructor
        _HEADS[name] = head
        return constructor
    return decorate


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a model by name, randomly initialised (nothing is downloaded)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def head_layer(name: str) -> Optional[str]:
    """The classifier module of a registered architecture; None for an unregistered name."""
    return _HEADS.get(name)


@register_model("small_cnn", head="linear")
def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


from . import zoo  # noqa: E402,F401  (registers preactresnet18 and BackdoorBench's torchvision names)
