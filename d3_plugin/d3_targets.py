"""D3's θs per architecture: the modules whose weights D3 moves, under this package's default preset and
the paper's (`d3.PRESETS`). An architecture not listed here: its classifier head under both presets
(`models.head_layer`); an unknown architecture: None, every nn.Linear."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from .models import head_layer

PRESETS = ("default", "paper")

LAYERS: Dict[str, Dict[str, Optional[Sequence[str]]]] = {
    # the 3-block CNN: its last conv block and the two-layer head. With only the head (every nn.Linear)
    # the demo backdoor kept 7 % ASR; adding the last conv block took it to 2.8 % (docs/findings.md).
    "small_cnn": {"default": ["features.4", "fc", "linear"], "paper": None},
    # reaching into the last two residual stages: with the paper's `linear` alone a BackdoorBench Blended
    # record kept 46-58 % ASR in two of three seeds at a 20-epoch budget (docs/d3-stability.md).
    "preactresnet18": {"default": ["layer3", "layer4", "linear"], "paper": ["linear"]},
}


def default_layers(name: str, preset: str = "default") -> Optional[Sequence[str]]:
    """The modules whose weights D3 moves for this architecture under a preset: "default" or "paper".
    None: every nn.Linear (also for an unregistered name)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown D3 preset {preset!r}; use default or paper")
    if name in LAYERS:
        return LAYERS[name][preset]
    head = head_layer(name)
    return None if head is None else [head]
