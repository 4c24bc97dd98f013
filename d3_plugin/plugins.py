"""Plugins found through entry points: BackdoorBench-style defenses and attacks from any installed package.

A distribution offers a defense by declaring, in its packaging metadata,

    [options.entry_points]
    backdoorbench.defenses =
        mydefense = mypackage.module:MyDefenseClass

(see docs/plugins.md for the interface the class implements). `discover(group)` lists what is installed.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any, List

DEFENSES = "backdoorbench.defenses"
ATTACKS = "backdoorbench.attacks"
GROUPS = (DEFENSES, ATTACKS)


@dataclass(frozen=True)
class Plugin:
    group: str
    name: str
    value: str          # "module:attribute"
    distribution: str   # the installed package that declares it ("" when unknown)
    version: str

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def discover(group: str = DEFENSES) -> List[Plugin]:
    """Every entry point installed in `group`, sorted by name (duplicates from several packages kept)."""
    found = []
    for point in importlib.metadata.entry_points(group=group):
        dist = getattr(point, "dist", None)
        found.append(Plugin(group, point.name, point.value,
                            dist.metadata["Name"] if dist is not None else "",
                            dist.version if dist is not None else ""))
    return sorted(set(found), key=lambda p: (p.name, p.distribution))


def load(name: str, group: str = DEFENSES) -> Any:
    """The object the plugin `name` of `group` points at (e.g. a defense class)."""
    matches = [plugin for plugin in discover(group) if plugin.name == name]
    if not matches:
        known = ", ".join(p.name for p in discover(group)) or "none installed"
        raise ValueError(f"no plugin {name!r} in entry-point group {group} ({known}); install the package "
                         f"that provides it")
    return matches[0].load()
