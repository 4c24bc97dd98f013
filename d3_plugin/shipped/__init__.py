"""Data files shipped with the package: the repo's top-level `registry/` and `configs/` folders,
installed as `d3_plugin.shipped.registry` and `d3_plugin.shipped.configs`."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_folder(name: str) -> Path:
    """Path of the shipped `registry` or `configs` folder, installed or in a source checkout."""
    source = Path(__file__).resolve().parents[2] / name
    if source.is_dir():
        return source
    return Path(str(resources.files(f"d3_plugin.shipped.{name}")))
