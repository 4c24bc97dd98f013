"""The one registry of defenses and attacks: ours and third-party plugins, found the same way.

    from d3_plugin import registry
    registry.names()                                   # defenses: ['aft', 'anp', 'clp', 'd3', ...]
    registry.names("attack")                           # ['badnets', 'blended', 'lf', 'sam-flatten', ...]
    defense = registry.build("ft-sam", dataset="gtsrb", budget=20)
    purified, history = defense(model, clean_batches)

Adding a defense is one module (docs/plugins.md):

    @dataclass
    class MyConfig:                       # the single source of the defaults
        epochs: int = 10
        lr: float = 0.01
        budget_fields: ClassVar[tuple] = ("epochs",)   # what `--epochs` sets (default: `epochs` if present)

    @registry.register_defense("mine", config=MyConfig, data="clean")
    def mine(model, clean_batches, config, *, on_epoch=None, progress=None):
        ...
        return purified_copy, history_rows

plus, if wanted, `registry/mine.yaml` with notes only: title, paper, `source` of the defaults, per-dataset
`overrides`, BackdoorBench's script of the same method (`backdoorbench:`). A YAML file without a
registered implementation describes a method that runs only as a BackdoorBench script (`backdoorbench:`
and `data:` set) or not at all here.

Settings are merged by one rule, in `settings()`: config defaults < preset < the architecture's
defaults < the dataset's overrides < each further layer given (a YAML file, then the command line).

Plugins: an installed distribution lists objects in the entry-point groups `backdoorbench.defenses` /
`backdoorbench.attacks`. Shapes accepted (checked when loaded; a plugin that fails is listed as broken
with its one-line reason and never breaks another command):
  defenses: a function registered with `register_defense`; a plain function matching `DefendFunction`
            (its config dataclass, if any, as the attribute `config_class`); a BackdoorBench-style class
            (`add_arguments(parser)` and `defense(result_file)`), run in a checkout; or a mapping with
            the YAML fields above.
  attacks:  an `attacks.registry.Attack`, or a trigger factory (class or function) whose parameters all
            have defaults: `factory(**params)` returns a trigger (`trigger(images) -> images`).
This package's own entry points (setup.cfg) name the same objects its modules register.
"""
from __future__ import annotations

import builtins
import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import yaml

from .checks import COMMON_FIELDS, FLOAT32_MAX, fits_float32, is_bool_hint, is_integer, parse_bool
from .errors import one_line
from .shipped import shipped_folder

GROUPS = {"defense": "backdoorbench.defenses", "attack": "backdoorbench.attacks",
          "calibration": "backdoorbench.calibrations"}
DATA_KINDS = ("clean", "none", "poisoned")
DISTRIBUTION = "d3-plugin"
BUILTIN_MODULES = ("d3_plugin.d3", "d3_plugin.attacks.registry", "d3_plugin.gic")
BUILTIN_PACKAGES = ("d3_plugin.defenses",)
YAML_KEYS = {"name", "group", "title", "paper", "source", "overrides", "notes", "backdoorbench", "data"}


class DefendFunction(Protocol):
    """A native defense: purify a copy of `model` using the clean batches (inputs, labels) and return it
    with one history row per epoch; `on_epoch(epoch, model)` returns metrics merged into that epoch's
    row; `progress` is a label for a progress bar (None: no bar)."""

    def __call__(self, model, clean_batches: Iterable, config: Any = None, *,
                 on_epoch: Optional[Callable] = None, progress: Optional[str] = None) -> Tuple[Any, List[Dict]]: ...


@dataclass
class Entry:
    """One defense or attack: how it runs here, its defaults, and its paper."""

    name: str
    group: str = "defense"
    run: Any = None                      # defend function, Attack, or BackdoorBench-style class
    config: Optional[type] = None        # config dataclass: the defaults
    data: str = "clean"                  # clean (the reserved set) | none | poisoned
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    model_defaults: Optional[Callable[[Optional[str], str], Mapping[str, Any]]] = None
    aliases: Mapping[str, str] = field(default_factory=dict)      # BackdoorBench option → config field
    fixed: Mapping[str, tuple] = field(default_factory=dict)      # BackdoorBench option → accepted values
    backdoorbench: Optional[str] = None  # BackdoorBench's own script of this method
    title: str = ""
    paper: Dict[str, Any] = field(default_factory=dict)
    source: str = ""                     # where the defaults come from
    overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # dataset → values
    override_sources: Dict[str, str] = field(default_factory=dict)
    notes: str = ""
    origin: str = DISTRIBUTION           # the distribution that provides it
    broken: str = ""                     # why a plugin cannot be used

    def floating_fields(self) -> set:
        """Fields whose default depends on the preset or the architecture (e.g. D3's lam and layers)."""
        fields = {name for values in self.presets.values() for name in values}
        if self.model_defaults is not None:
            fields |= set(self.model_defaults(None, "default"))
        return fields

    @property
    def where(self) -> str:
        """native | plugin class (BackdoorBench-style, needs a checkout) | backdoorbench (its script) |
        unavailable | broken."""
        if self.broken:
            return "broken"
        if isinstance(self.run, type) and self.group == "defense":
            return "plugin class"
        if self.run is not None:
            return "native"
        return "backdoorbench" if self.backdoorbench else "unavailable"


_REGISTERED: Dict[Tuple[str, str], Entry] = {}
# group → reader of that group's plugin objects, set by the module that defines the group's shape
# (attacks.registry reads trigger factories and `Attack`s)
PLUGIN_READERS: Dict[str, Callable[[str, Any], Entry]] = {}


def _key(name: str) -> str:
    return str(name).lower().strip()


def register_defense(name: str, *, config: Optional[type] = None, data: str = "clean",
                     presets: Optional[Mapping] = None, model_defaults: Optional[Callable] = None,
                     aliases: Optional[Mapping[str, str]] = None, fixed: Optional[Mapping[str, tuple]] = None):
    """Decorator: register a `DefendFunction` under `name` with its config dataclass.

    presets: named value sets ("default" is used when none is chosen); model_defaults(model_name, preset):
    per-architecture values; aliases / fixed: BackdoorBench option names for config fields / options whose
    value must be one of a few (both used by the BackdoorBench adapter)."""
    if data not in DATA_KINDS:
        raise ValueError(f"register_defense({name!r}): data must be one of {DATA_KINDS}, got {data!r}")

    def decorate(function):
        check_defend_function(function)
        entry = Entry(_key(name), "defense", function, config, data, dict(presets or {}), model_defaults,
                      dict(aliases or {}), dict(fixed or {}), origin=_distribution_of(function))
        _claim(entry)
        function.registered_as = entry.name
        return function
    return decorate


def register_attack(attack, *, name: Optional[str] = None, config: Optional[type] = None, notes: str = ""):
    """Register an `Attack` under its name (or a record transform such as sam-flatten, with `name` and its
    `config`)."""
    entry = Entry(_key(name or attack.name), "attack", attack, config, "poisoned", origin=_distribution_of(attack),
                  notes=notes or getattr(attack, "description", None) or _first_line(attack.__doc__))
    _claim(entry)
    return attack


def register_calibration(name: str, *, config: Optional[type] = None):
    """Decorator: register a data-side step that transforms the reserved (auxiliary) set before any defense:
    `calibrate(model, data, spec, config, *, labeled, device, progress) -> (ImageSet, report)`."""
    def decorate(function):
        entry = Entry(_key(name), "calibration", function, config, "auxiliary", origin=_distribution_of(function))
        _claim(entry)
        function.registered_as = entry.name
        return function
    return decorate


def _claim(entry: Entry) -> None:
    """Register `entry`; a name this package ships cannot be taken over by another package."""
    existing = _REGISTERED.get((entry.group, entry.name))
    if existing is not None and existing.origin == DISTRIBUTION and entry.origin != DISTRIBUTION:
        raise ValueError(f"the {entry.group} name {entry.name!r} is taken by {DISTRIBUTION}; register under another name")
    _REGISTERED[(entry.group, entry.name)] = entry
    _LOADED.clear()


def _distribution_of(obj) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return DISTRIBUTION if module.split(".")[0] == "d3_plugin" else module.split(".")[0]


def check_defend_function(function) -> None:
    """TypeError unless `function` can be called as a `DefendFunction`."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        raise TypeError(f"{function!r} has no inspectable signature; a defense must be a function") from None
    values = builtins.list(parameters.values())
    positional = [p for p in values if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_keywords = any(p.kind == p.VAR_KEYWORD for p in values)
    missing = [k for k in ("on_epoch", "progress") if k not in parameters and not takes_keywords]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in values) or missing:
        raise TypeError(f"{getattr(function, '__name__', function)}{inspect.signature(function)} does not match "
                        f"defend(model, clean_batches, config, *, on_epoch=None, progress=None)")


# --- loading: built-in modules, shipped notes, entry points -----------------------------------------

@functools.cache
def _import_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_notes(folder: Path) -> Dict[str, Dict[str, Any]]:
    """`registry/*.yaml` by name (files starting with _ or . are scratch, not entries)."""
    found: Dict[str, Dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name.startswith(("_", ".")):
            continue
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_LOADER)  # noqa: S506 — a safe loader
        if not isinstance(raw, Mapping) or not raw.get("name"):
            raise ValueError(f"registry {path.name}: an entry must be a mapping with a `name`")
        unknown = set(raw) - YAML_KEYS
        if unknown:
            raise ValueError(f"registry {path.name}: unknown keys {sorted(unknown)}; use {sorted(YAML_KEYS)}")
        name = _key(raw["name"])
        if name in found:
            raise ValueError(f"registry {path.name} repeats the name {name!r}")
        found[name] = {**raw, "origin": path.name}
    return found


def apply_notes(entry: Entry, raw: Mapping[str, Any]) -> Entry:
    """Fill an entry's descriptive fields from a notes mapping (a YAML file or a plugin's mapping)."""
    origin = raw.get("origin", entry.name)
    entry.title = str(raw.get("title") or entry.title or "")
    entry.paper = dict(raw.get("paper") or entry.paper)
    entry.source = " ".join(str(raw.get("source") or entry.source or "").split())  # one line (YAML comments)
    entry.notes = str(raw.get("notes") or entry.notes or "").strip()
    entry.backdoorbench = raw.get("backdoorbench") or entry.backdoorbench
    if "data" in raw:
        if entry.run is not None:
            raise ValueError(f"registry {origin}: `data` of a native defense is declared where it is registered")
        entry.data = str(raw["data"]).lower()
        if entry.data not in DATA_KINDS:
            raise ValueError(f"registry {origin}: `data` must be one of {DATA_KINDS}, got {raw['data']!r}")
    for dataset, block in (raw.get("overrides") or {}).items():
        block = dict(block or {})
        source, values = block.pop("source", None), block.pop("values", block)
        entry.overrides[_dataset_key(dataset)] = dict(values)
        if source:
            entry.override_sources[_dataset_key(dataset)] = str(source)
    if entry.config is not None:
        for dataset, values in entry.overrides.items():
            _check_fields(entry, values, f"registry {origin}: overrides.{dataset}")
    return entry


def _plugin_entry(name: str, group: str, obj: Any) -> Entry:
    """The entry for a loaded entry-point object (TypeError/ValueError: not a valid shape)."""
    registered = getattr(obj, "registered_as", None)
    if registered and (group, registered) in _REGISTERED and group != "attack":
        return _REGISTERED[(group, registered)]
    if group in PLUGIN_READERS:
        return PLUGIN_READERS[group](_key(name), obj)
    if group == "calibration":
        if not callable(obj) or isinstance(obj, type):
            raise TypeError(f"a calibration plugin must be a function registered with register_calibration, "
                            f"got {type(obj).__name__}")
        return Entry(_key(name), "calibration", obj, getattr(obj, "config_class", None),
                     notes=_first_line(obj.__doc__))
    if isinstance(obj, Mapping):
        entry = apply_notes(Entry(_key(name)), {**obj, "origin": f"entry point {name}"})
        if entry.where == "unavailable":
            raise TypeError("a mapping plugin must name its BackdoorBench script (`backdoorbench:`)")
        return entry
    if isinstance(obj, type):
        missing = [m for m in ("add_arguments", "defense") if not callable(getattr(obj, m, None))]
        if missing:
            raise TypeError(f"class {obj.__name__} lacks {', '.join(missing)} of BackdoorBench's defense interface")
        return Entry(_key(name), run=obj, title=obj.__name__, notes=_first_line(obj.__doc__))
    if not callable(obj):
        raise TypeError(f"{type(obj).__name__} is neither a defend function, a BackdoorBench-style class nor a mapping")
    check_defend_function(obj)
    config = getattr(obj, "config_class", None)
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"{obj.__name__}.config_class must be a dataclass")
    return Entry(_key(name), run=obj, config=config, title=getattr(obj, "__name__", name),
                 notes=_first_line(obj.__doc__))


def _first_line(text: Optional[str]) -> str:
    return (text or "").strip().split("\n")[0]


def _plugins(group: str) -> List[Entry]:
    """Entries of other distributions' entry points in `group` (ours are registered by their modules)."""
    found = []
    for point in importlib.metadata.entry_points(group=GROUPS[group]):
        dist = getattr(point, "dist", None)
        distribution = dist.metadata["Name"] if dist is not None else ""
        if distribution == DISTRIBUTION:
            continue
        try:
            entry = _plugin_entry(point.name, group, point.load())
        except Exception as error:  # noqa: BLE001 - a broken plugin is listed, never fatal
            entry = Entry(_key(point.name), group, broken=f"{type(error).__name__}: {one_line(error)}")
        entry.origin = f"{distribution or 'unknown distribution'} ({point.value})"
        found.append(entry)
    return found


# (group, sys.path, registered names) → the shipped entries of `load`, read once per process: a
# registration empties it, another sys.path (a distribution added) or registered set is another key
_LOADED: Dict[tuple, Dict[str, Entry]] = {}


def load(group: str = "defense", notes: Optional[Path] = None) -> Dict[str, Entry]:
    """Every entry of `group` by name: registered modules, shipped notes (`registry/*.yaml`, defenses),
    then plugins (a name we ship wins over a plugin's). With the shipped notes, read once and kept."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; use {', '.join(GROUPS)}")
    _import_builtins()
    if notes is not None:
        return _read_entries(group, notes)
    key = (group, tuple(sys.path), tuple(_REGISTERED))
    if key not in _LOADED:
        _LOADED[key] = _read_entries(group, shipped_folder("registry"))
    return dict(_LOADED[key])


def _read_entries(group: str, notes: Path) -> Dict[str, Entry]:
    entries = {name: copy.copy(entry) for (g, name), entry in _REGISTERED.items() if g == group}
    for entry in entries.values():  # fresh per load: notes below fill them
        entry.overrides, entry.override_sources = dict(entry.overrides), dict(entry.override_sources)
    for name, raw in _read_notes(notes).items():
        if raw.get("group", "defense") == group:
            apply_notes(entries.setdefault(name, Entry(name, group)), raw)
    for entry in _plugins(group):
        entries.setdefault(entry.name, entry)
    return dict(sorted(entries.items()))


def list_entries(group: str = "defense") -> builtins.list:
    return builtins.list(load(group).values())


def names(group: str = "defense") -> builtins.list:
    return builtins.list(load(group))


def get(name: str, group: str = "defense") -> Entry:
    entries = load(group)
    key = _key(name).replace("_", "-") if _key(name) not in entries else _key(name)
    if key not in entries:
        raise ValueError(f"unknown {group} {name!r}{_elsewhere(key, group)}; known: {', '.join(entries)}")
    entry = entries[key]
    if entry.broken:
        raise ValueError(f"{group} {entry.name!r} ({entry.origin}) is broken: {entry.broken}")
    return entry


def _elsewhere(key: str, group: str) -> str:
    """' (it is an attack)' and the like, when the name belongs to another group."""
    other = next((g for g in GROUPS if g != group and (g, key) in _REGISTERED), None)
    if other == "calibration":
        return f" (it is a calibration of the reserved data: --calibrate {key})"
    return f" (it is {'an' if other == 'attack' else 'a'} {other})" if other else ""


# --- settings and building -------------------------------------------------------------------------

def _dataset_key(name: str) -> str:
    return str(name).lower().replace("-", "_")


def field_names(config: Optional[type]) -> List[str]:
    return [f.name for f in dataclasses.fields(config)] if config is not None else []


def budget_fields(config: Optional[type]) -> Tuple[str, ...]:
    """The fields a shared training budget (`--epochs`) sets: the config's `budget_fields`, else `epochs`."""
    declared = getattr(config, "budget_fields", None)
    if declared is not None:
        return tuple(declared)
    return ("epochs",) if "epochs" in field_names(config) else ()


def settings(entry: Entry, *, dataset: Optional[str] = None, model: Optional[str] = None,
             preset: Optional[str] = None, layers: Sequence[Mapping[str, Any]] = ()) -> Dict[str, Any]:
    """The one merge rule: config defaults < preset < the architecture's defaults < the dataset's overrides
    < each mapping of `layers` in order (a YAML file, then the command line). Values that are None in a
    layer do not override."""
    preset = preset or "default"
    if entry.presets and preset not in entry.presets:
        raise ValueError(f"{entry.name}: preset {preset!r} is unknown; use {' or '.join(entry.presets)}")
    values: Dict[str, Any] = dict(entry.presets.get(preset, {}))
    if entry.model_defaults is not None and model is not None:
        values.update(entry.model_defaults(model, preset))
    if dataset is not None:
        values.update(entry.overrides.get(_dataset_key(dataset), {}))
    for layer in layers:
        values.update({k: v for k, v in dict(layer or {}).items() if v is not None})
    return values


def _check_fields(entry: Entry, values: Mapping[str, Any], where: str) -> None:
    valid = field_names(entry.config)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown hyper-parameter(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(valid))}")


def make_config(entry: Entry, values: Mapping[str, Any]):
    """The entry's config dataclass from `values` (one-line ValueError for unknown or invalid values)."""
    if entry.config is None:
        if values:
            raise ValueError(f"{entry.name} takes no hyper-parameters, got {', '.join(sorted(values))}")
        return None
    _check_fields(entry, values, entry.name)
    hints = type_hints(entry.config)
    values = {k: parse_bool(v, f"{entry.name}: {k}") if v is not None and is_bool_hint(hints[k]) else v
              for k, v in values.items()}
    try:
        config = entry.config(**values)
    except TypeError as error:
        raise ValueError(f"{entry.name}: {one_line(error)}") from None
    check_common(entry, config)
    return config


def check_common(entry: Entry, config) -> None:
    """One-line ValueError for a shared field out of range, and for a budget field that is not a count ≥ 0
    (a defense's own checks live in its config's __post_init__)."""
    for name in budget_fields(entry.config):
        value = getattr(config, name)
        if value is not None and not (is_integer(value) and value >= 0):
            raise ValueError(f"{entry.name}: {name} must be an integer ≥ 0, got {value!r}")
    for name in field_names(entry.config):
        value = getattr(config, name)
        if isinstance(value, float) and not fits_float32(value):
            raise ValueError(f"{entry.name}: {name} {value!r} is beyond float32's range (±{FLOAT32_MAX:.3g}); "
                             f"pass a smaller value")
    for name, (valid, what) in COMMON_FIELDS.items():
        if hasattr(config, name) and not valid(getattr(config, name)):
            raise ValueError(f"{entry.name}: {name} must be {what}, got {getattr(config, name)!r}")


def applicable(entry: Entry, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The run settings (seed, precision, ...) a harness offers, kept where the config has the field."""
    fields = field_names(entry.config)
    return {k: v for k, v in values.items() if k in fields and v is not None}


def parse_assignment(item: str, option: str, example: str) -> Tuple[str, Any]:
    """A command line's 'KEY=VALUE' → (KEY, VALUE read as YAML: 5 → int, 0.1 → float, [a, b] → list)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{option} {item!r} must look like {example}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ValueError(f"{option} {item!r}: invalid YAML value ({one_line(error)}); fix or quote it") from None


def config_hash(payload: Mapping) -> str:
    """Short stable hash of a JSON-able mapping (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Runnable:
    """An entry with its built config: what runs, and the hash that names the run."""

    entry: Entry
    config: Any

    @property
    def name(self) -> str:
        return self.entry.name

    def config_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self.config) if self.config is not None else {}

    def hash(self) -> str:
        return config_hash({"name": self.name, "config": self.config_dict()})


class Defense(Runnable):
    """A runnable native defense: `defense(model, clean_batches, on_epoch=, progress=)` → (model, history)."""

    def __call__(self, model, clean_batches, *, on_epoch=None, progress=None, **extra):
        return self.entry.run(model, clean_batches, self.config, on_epoch=on_epoch, progress=progress, **extra)


@dataclass
class ScriptDefense:
    """A defense run as a BackdoorBench script (or a plugin class) inside a checkout."""

    entry: Entry
    overrides: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name

    def config_dict(self) -> Dict[str, Any]:
        return {"backdoorbench": self.entry.backdoorbench or f"plugin:{self.entry.name}", **self.overrides}

    def hash(self) -> str:
        return config_hash({"name": self.name, "config": self.config_dict()})


def build(name: str, dataset: Optional[str] = None, *, model: Optional[str] = None, preset: Optional[str] = None,
          budget: Optional[int] = None, run: Optional[Mapping[str, Any]] = None, **overrides):
    """A runnable defense: `settings()` with the shared `budget` (sets `budget_fields`) and `run` settings
    (seed, precision, ...; applied where the config has them) below the explicit `overrides`.
    Native entries give a `Defense`, script-only or plugin-class entries a `ScriptDefense`."""
    entry = get(name)
    if entry.where == "unavailable":
        raise ValueError(f"defense {entry.name!r} has no implementation available here "
                         f"({entry.notes or 'see its registry entry'})")
    if entry.where != "native":
        shared = {"epochs": budget} if budget is not None else {}
        return ScriptDefense(entry, {**shared, **overrides})
    shared = {**applicable(entry, dict(run or {})), **{f: budget for f in budget_fields(entry.config)
                                                        if budget is not None}}
    values = settings(entry, dataset=dataset, model=model, preset=preset, layers=[shared, overrides])
    return Defense(entry, make_config(entry, values))


class Calibration(Runnable):
    """A runnable calibration of the reserved set: `calibration(model, data, spec, labeled=, device=)` →
    (calibrated ImageSet, report)."""
    def __call__(self, model, data, spec, *, labeled: bool = True, device="cpu", progress=None):
        return self.entry.run(model, data, spec, self.config, labeled=labeled, device=device, progress=progress)


def build_calibration(name: str, *, seed: Optional[int] = None, **overrides) -> Calibration:
    """A runnable calibration (e.g. "gic") with its defaults, the run's `seed` and the `overrides`."""
    entry = get(name, "calibration")
    run = applicable(entry, {"seed": seed})
    return Calibration(entry, make_config(entry, settings(entry, layers=[run, overrides])))


def run_plugin_class(name: str, argv: builtins.list) -> int:
    """Run a BackdoorBench-style plugin class as its script would (call from the checkout root)."""
    import argparse
    import sys

    entry = get(name)
    if entry.where != "plugin class":
        raise ValueError(f"{name!r} is not a BackdoorBench-style plugin class")
    sys.path.insert(0, str(Path.cwd()))
    parser = argparse.ArgumentParser(prog=name)
    entry.run.add_arguments(parser)
    args = parser.parse_args(argv)
    entry.run(args).defense(args.result_file)
    return 0


def type_hints(config: type) -> Dict[str, Any]:
    """The config's field types, resolved (configs use `from __future__ import annotations`)."""
    return typing.get_type_hints(config)


list = list_entries  # noqa: A001 — the documented API name `registry.list()`

if __name__ == "__main__":  # `python -m d3_plugin.registry run-class NAME ARGS...`: compare's runner for plugin classes
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "run-class":
        sys.exit("usage: python -m d3_plugin.registry run-class NAME [ARGS...]  (the registry: d3-plugin list)")
    sys.exit(run_plugin_class(sys.argv[2], sys.argv[3:]))
