"""Registry of backdoor defenses: the shipped `registry/*.yaml` entries plus entry-point plugins.

    from d3_plugin import registry
    registry.names()                                  # ['aft', 'd3', 'fp', 'ft', ...]
    entry = registry.get("ft-sam")                    # paper, data needed, implementation, defaults
    defense = registry.build("ft-sam", dataset="cifar10", epochs=20)
    purified, history = defense(model, clean_batches)

An entry (one YAML file per defense) holds:
    name: ft-sam                         lookup key
    title: FT-SAM                        display name (optional)
    paper: {title, venue, arxiv}
    data: clean | none | poisoned        what it needs besides the model (clean = the reserved set)
    implementation:
      native: module:function            defend(model, clean_batches, config, *, on_epoch, progress)
      config: module:Class               its config dataclass
      backdoorbench: ft-sam              script defense/<name>.py of a BackdoorBench checkout
      entry_point: name                  (set for plugins)
    defaults:                            hyper-parameters: `all` first, then the dataset's own
      all:    {source: "...", values: {epochs: 100, lr: 0.01}}
      gtsrb:  {source: "...", values: {rho: 8.0}}
    notes: free text

Plugins: distributions may declare entry points in the group `backdoorbench.defenses`. The object an
entry point names may be (a) a mapping with the fields above, (b) a defend-style function (its config
class, if any, as the attribute `config_class`), or (c) a BackdoorBench-style defense class
(`add_arguments(parser)`, `cls(args).defense(result_file)`), runnable only inside a BackdoorBench
checkout through `python -m d3_plugin.registry run-class NAME ...`. A YAML entry with the same name wins;
the plugin is then recorded as that entry's `entry_point`.
"""
from __future__ import annotations

import builtins
import copy
import dataclasses
import hashlib
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import yaml

from . import plugins
from .shipped import shipped_folder

ENTRY_POINT_GROUP = plugins.DEFENSES
DATA_KINDS = ("clean", "none", "poisoned")
BASE_KEYS = ("all", "default", "common", "*")


@dataclass
class Entry:
    name: str
    title: str = ""
    paper: Dict[str, Any] = field(default_factory=dict)
    data: str = "clean"
    native: Optional[str] = None
    config: Optional[str] = None
    backdoorbench: Optional[str] = None
    entry_point: Optional[str] = None
    defaults: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    notes: str = ""
    origin: str = ""
    plugin: Any = None  # the loaded entry-point object, when the entry comes from a plugin

    @property
    def kind(self) -> str:
        """native | backdoorbench (script only) | external (plugin class) | unavailable."""
        if self.native or callable_plugin(self.plugin):
            return "native"
        if self.backdoorbench:
            return "backdoorbench"
        if self.plugin is not None:
            return "external"
        return "unavailable"

    def hyperparameters(self, dataset: Optional[str] = None) -> Dict[str, Any]:
        """Defaults for `dataset`: the `all` values overlaid with the dataset's own."""
        values = {}
        for key in BASE_KEYS:
            values.update(self.defaults.get(key, {}))
        if dataset:
            values.update(self.defaults.get(_dataset_key(dataset), {}))
        return values

    def summary(self) -> Dict[str, Any]:
        return {"name": self.name, "title": self.title or self.name, "kind": self.kind, "data": self.data,
                "paper": self.paper, "native": self.native, "backdoorbench": self.backdoorbench,
                "entry_point": self.entry_point, "origin": self.origin}


def callable_plugin(obj) -> bool:
    """A plugin object usable as a native defend function (a function, not a BackdoorBench class)."""
    return callable(obj) and not isinstance(obj, type)


def _dataset_key(name: str) -> str:
    return name.lower().replace("-", "_")


def _parse_defaults(raw: Any, origin: str):
    """`defaults:` → ({dataset: values}, {dataset: source}); accepts {values, source} or flat mappings."""
    if raw is None:
        return {}, {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{origin}: `defaults` must map dataset names to hyper-parameters")
    defaults, sources = {}, {}
    for dataset, block in raw.items():
        block = dict(block or {})
        source = block.pop("source", None)
        values = block.pop("values", None)
        if values is not None and block:
            raise ValueError(f"{origin}: defaults.{dataset} mixes `values` with other keys {sorted(block)}")
        defaults[_dataset_key(str(dataset))] = dict(values if values is not None else block)
        if source:
            sources[_dataset_key(str(dataset))] = str(source)
    return defaults, sources


def entry_from_mapping(raw: Mapping, origin: str) -> Entry:
    """Validate one declarative entry (a parsed YAML file or a plugin's mapping)."""
    if not isinstance(raw, Mapping) or not raw.get("name"):
        raise ValueError(f"{origin}: a registry entry must be a mapping with a `name`")
    impl = dict(raw.get("implementation") or {})
    unknown = set(impl) - {"native", "config", "backdoorbench", "entry_point"}
    if unknown:
        raise ValueError(f"{origin}: unknown implementation keys {sorted(unknown)}; "
                         "use native, config, backdoorbench or entry_point")
    data = str(raw.get("data", "clean")).split()[0].lower()
    if data not in DATA_KINDS:
        raise ValueError(f"{origin}: `data` must be one of {DATA_KINDS}, got {raw.get('data')!r}")
    defaults, sources = _parse_defaults(raw.get("defaults"), origin)
    if isinstance(raw.get("source"), str):
        sources.setdefault("all", raw["source"])
    return Entry(name=str(raw["name"]).lower(), title=str(raw.get("title") or ""), paper=dict(raw.get("paper") or {}),
                 data=data, native=impl.get("native"), config=impl.get("config"),
                 backdoorbench=impl.get("backdoorbench"), entry_point=impl.get("entry_point"),
                 defaults=defaults, sources=sources, notes=str(raw.get("notes") or "").strip(), origin=origin)


_PARSED: Dict[tuple, Any] = {}  # (path, mtime, size) → parsed YAML: lookups re-read only changed files
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> Any:
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        with open(path, encoding="utf-8") as f:
            _PARSED[key] = yaml.load(f, Loader=_LOADER)  # noqa: S506 — a safe loader
    return copy.deepcopy(_PARSED[key])


def _yaml_entries(folder: Optional[Path] = None) -> Dict[str, Entry]:
    folder = folder or shipped_folder("registry")
    entries = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name.startswith(("_", ".")):  # private/scratch files are not entries
            continue
        entry = entry_from_mapping(_read_yaml(path), str(path.name))
        if entry.name in entries:
            raise ValueError(f"registry: {path.name} repeats the name {entry.name!r} of {entries[entry.name].origin}")
        entries[entry.name] = entry
    return entries


def _plugin_entries() -> Dict[str, Entry]:
    """Entries for every plugin of the `backdoorbench.defenses` entry-point group."""
    found = {}
    for point in plugins.discover(plugins.DEFENSES):
        origin = f"entry point {point.name} = {point.value}" + (f" ({point.distribution})" if point.distribution else "")
        try:
            obj = point.load()
        except Exception as error:  # a broken plugin is listed with its error, not fatal
            found[point.name.lower()] = Entry(point.name.lower(), entry_point=point.name, origin=origin,
                                              notes=f"failed to load: {error}")
            continue
        if isinstance(obj, Mapping):
            entry = entry_from_mapping({"name": point.name, **obj}, origin)
        else:
            entry = Entry(point.name.lower(), title=getattr(obj, "__name__", point.name), origin=origin,
                          notes=(obj.__doc__ or "").strip().split("\n")[0])
            entry.plugin = obj
        entry.entry_point = point.name
        found.setdefault(entry.name, entry)
    return found


def load(folder: Optional[Path] = None) -> Dict[str, Entry]:
    """Every entry by name: shipped YAML first, plugins added (a YAML entry of the same name wins)."""
    entries = _yaml_entries(folder)
    for name, plugin in _plugin_entries().items():
        if name in entries:
            entries[name].entry_point = entries[name].entry_point or plugin.entry_point
            entries[name].plugin = entries[name].plugin or plugin.plugin
        else:
            entries[name] = plugin
    return entries


def list_entries() -> builtins.list:
    return builtins.list(load().values())


def names() -> builtins.list:
    return sorted(load())


def get(name: str) -> Entry:
    entries = load()
    key = name.lower().strip()
    if key not in entries:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted(entries))}")
    return entries[key]


def resolve(reference: str) -> Any:
    """'package.module:attribute' → the object."""
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise ValueError(f"implementation reference {reference!r} must look like 'package.module:name'")
    obj = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def config_hash(payload: Mapping) -> str:
    """Short stable hash of a JSON-able mapping (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Defense:
    """A runnable defense: `defense(model, clean_batches, on_epoch=, progress=)` → (model, history)."""

    entry: Entry
    function: Callable
    config: Any

    @property
    def name(self) -> str:
        return self.entry.name

    def config_dict(self) -> Dict[str, Any]:
        if dataclasses.is_dataclass(self.config):
            return dataclasses.asdict(self.config)
        return dict(self.config or {})

    def hash(self) -> str:
        return config_hash({"name": self.name, "config": self.config_dict()})

    def __call__(self, model, clean_batches, *, on_epoch=None, progress=None):
        return self.function(model, clean_batches, self.config, on_epoch=on_epoch, progress=progress)


@dataclass
class ScriptDefense:
    """A defense available only as a BackdoorBench script (or plugin class), run in a checkout."""

    entry: Entry
    overrides: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name

    def config_dict(self) -> Dict[str, Any]:
        return {"backdoorbench": self.entry.backdoorbench or f"plugin:{self.entry.entry_point}",
                **self.overrides}

    def hash(self) -> str:
        return config_hash({"name": self.name, "config": self.config_dict()})


def config_fields(name: str) -> Optional[set]:
    """Field names the native config accepts (None when the entry has no config class)."""
    entry = get(name)
    cls = resolve(entry.config) if entry.config else getattr(entry.plugin, "config_class", None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    return {f.name for f in dataclasses.fields(cls)}


def build(name: str, dataset: Optional[str] = None, **overrides):
    """A runnable defense with the entry's defaults for `dataset`, then `overrides`, applied.

    Native entries give a `Defense`; script-only or plugin-class entries a `ScriptDefense` (run it
    with `d3_plugin.compare.run_backdoorbench`). Unknown hyper-parameter names are an error.
    """
    entry = get(name)
    if entry.kind == "unavailable":
        raise ValueError(f"defense {entry.name!r} has no implementation available here ({entry.notes or 'see its entry'})")
    if entry.kind != "native":
        return ScriptDefense(entry, dict(overrides))
    function = resolve(entry.native) if entry.native else entry.plugin
    config_cls = resolve(entry.config) if entry.config else getattr(function, "config_class", None)
    values = {**entry.hyperparameters(dataset), **overrides}
    if config_cls is None:
        return Defense(entry, function, values)
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{entry.name}: unknown hyper-parameter(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(valid))}")
    return Defense(entry, function, config_cls(**values))


def run_plugin_class(name: str, argv: builtins.list) -> int:
    """Run a BackdoorBench-style plugin class as its script would (call from the checkout root)."""
    import argparse
    entry = get(name)
    if not isinstance(entry.plugin, type):
        raise ValueError(f"{name!r} is not a BackdoorBench-style plugin class")
    sys.path.insert(0, str(Path.cwd()))
    parser = argparse.ArgumentParser(prog=name)
    entry.plugin.add_arguments(parser)
    args = parser.parse_args(argv)
    entry.plugin(args).defense(args.result_file)
    return 0


list = list_entries  # noqa: A001 — the documented API name `registry.list()`

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run-class":
        sys.exit(run_plugin_class(sys.argv[2], sys.argv[3:]))
    for item in list_entries():
        print(f"{item.name:10s} {item.kind:13s} {item.paper.get('title', '')}")
