"""The one registry: our defenses and attacks, the merge rule, budgets, shipped notes, and third-party plugins
(a fake installed distribution with entry points of every accepted shape, and broken ones)."""
import argparse
import configparser
import dataclasses
import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from d3_plugin import registry
from d3_plugin.attacks.registry import Attack, attacks, get_attack
from d3_plugin.commands import list as list_command
from d3_plugin.data import SPECS

ROOT = Path(__file__).resolve().parents[1]
NATIVE = {"aft", "anp", "badacts", "clp", "d3", "fp", "fst", "ft", "ft-sam", "i-bau", "nad", "sau"}
ATTACKS = {"badnets", "blended", "input-aware", "lf", "sam-flatten", "sig", "wanet"}


def test_every_defense_and_attack_we_ship_is_registered_and_described():
    entries = registry.load()
    assert {n for n, e in entries.items() if e.where == "native"} == NATIVE
    assert {"nc", "npd", "rnp"} <= {n for n, e in entries.items() if e.where == "backdoorbench"}
    assert "gic" not in entries  # a calibration, not a defense
    for entry in entries.values():
        assert entry.paper.get("title"), f"{entry.name}: paper title missing"
        assert entry.data in registry.DATA_KINDS
        if entry.where == "native":
            assert dataclasses.is_dataclass(entry.config) and entry.source, entry.name
    assert set(registry.names("attack")) == ATTACKS
    assert [(e.name, e.where) for e in registry.list_entries("calibration")] == [("gic", "native")]
    assert registry.get("gic", "calibration").paper["arxiv"] == "2502.07231"


@pytest.mark.parametrize("group", ["defenses", "attacks", "calibrations"])
def test_setup_cfg_entry_points_name_exactly_the_registered_objects(group):
    """Our entry points (setup.cfg, installed metadata) and the registry agree, object for object."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    declared = dict(line.split(" = ") for line in parser["options.entry_points"][f"backdoorbench.{group}"].strip()
                    .splitlines())
    kind = group[:-1]
    assert set(declared) == set(registry.names(kind)) - {n for n, e in registry.load(kind).items() if e.run is None}
    for name, value in declared.items():
        assert registry.get(name, kind).run is importlib.metadata.EntryPoint(name, value, "").load(), name
    installed = {p.name for p in importlib.metadata.entry_points(group=registry.GROUPS[kind])
                 if p.dist is not None and p.dist.metadata["Name"] == registry.DISTRIBUTION}
    assert installed == set(declared), "reinstall the package (pip install -e .): its metadata is stale"


@pytest.mark.parametrize("dataset", [None, *sorted(SPECS)])
def test_every_native_defense_builds_with_its_dataset_overrides(dataset):
    for name in NATIVE:
        defense = registry.build(name, dataset=dataset)
        entry = defense.entry
        for key, value in entry.overrides.get(dataset or "", {}).items():
            assert getattr(defense.config, key) == value, (name, key)


def test_the_merge_rule_defaults_preset_architecture_dataset_then_layers():
    d3 = registry.get("d3")
    assert registry.settings(d3) == {}
    assert registry.settings(d3, preset="paper") == {"lam": 10.0}
    assert registry.settings(d3, model="preactresnet18")["layers"] == ["layer3", "layer4", "linear"]
    assert registry.settings(d3, model="preactresnet18", preset="paper")["layers"] == ["linear"]
    assert registry.settings(d3, preset="paper", layers=[{"lam": 3.0}, {"lam": None}, {"eps": 0.2}]) == \
        {"lam": 3.0, "eps": 0.2}
    ftsam = registry.get("ft-sam")
    assert registry.settings(ftsam, dataset="gtsrb", layers=[{"rho": 3.0}])["rho"] == 3.0
    assert registry.build("ft-sam", dataset="gtsrb").config.rho == 8.0
    assert registry.build("ft-sam", dataset="cifar10").config.rho == 2.0
    with pytest.raises(ValueError, match="preset 'nope' is unknown; use default or paper"):
        registry.settings(d3, preset="nope")


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_a_shared_budget_reaches_every_defense_through_its_own_fields(name):
    defense = registry.build(name, budget=3, run={"seed": 7, "precision": "fp32", "unknown_run_key": 1})
    fields = registry.budget_fields(defense.entry.config)
    assert (name == "clp") == (not fields)  # data-free CLP has no training budget
    assert all(getattr(defense.config, f) == 3 for f in fields)
    if hasattr(defense.config, "seed"):
        assert defense.config.seed == 7
    assert registry.build(name, budget=3, **({fields[0]: 1} if fields else {})).config != defense.config or not fields


def test_budget_caps_dependent_fields_and_explicit_values_win():
    assert registry.build("aft", budget=2).config.adv_epochs == 2
    nad = registry.build("nad", budget=2, teacher_epochs=5).config
    assert (nad.teacher_epochs, nad.epochs) == (5, 2)
    assert registry.build("i-bau", budget=4).config.rounds == 4


@pytest.mark.parametrize("name", sorted(NATIVE - {"clp"}))
@pytest.mark.parametrize("values, message", [({"budget": -1}, "≥ 0"),  # the config's own check may come first
                                             ({"batch_size": 0}, "batch_size must be an integer ≥ 1"),
                                             ({"seed": -3}, "seed must be an integer ≥ 0")])
def test_shared_fields_are_checked_for_every_defense(name, values, message):
    fields = registry.field_names(registry.get(name).config)
    if not set(values) - {"budget"} <= set(fields):
        pytest.skip(f"{name} has no {', '.join(values)}")
    with pytest.raises(ValueError, match=message):
        registry.build(name, **values)


def test_config_hash_follows_the_configuration():
    a, b = registry.build("d3", epochs=5), registry.build("d3", epochs=5)
    assert a.hash() == b.hash() != registry.build("d3", epochs=6).hash()


def test_unknown_names_and_parameters_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown defense 'nope'; known: .*d3"):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown hyper-parameter.*lamda.*valid: .*lam"):
        registry.build("d3", lamda=3)
    with pytest.raises(ValueError, match=r"unknown defense 'gic' \(it is a calibration of the reserved data: "
                                         r"--calibrate gic\)"):
        registry.build("gic")
    with pytest.raises(ValueError, match=r"unknown defense 'badnets' \(it is an attack\)"):
        registry.get("badnets")
    with pytest.raises(ValueError, match="gic: norm must be one of"):
        registry.build_calibration("gic", norm="l1")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        get_attack("nope")
    with pytest.raises(ValueError, match="not a trigger attack"):
        get_attack("sam-flatten")


def test_script_only_entry_builds_a_backdoorbench_runner():
    nc = registry.build("nc", budget=2)
    assert isinstance(nc, registry.ScriptDefense)
    assert nc.entry.backdoorbench == "nc" and nc.config_dict()["epochs"] == 2


def test_the_shipped_registry_is_read_once_per_process(monkeypatch):
    reads = []
    read_notes, plugins = registry._read_notes, registry._plugins
    monkeypatch.setattr(registry, "_LOADED", {})
    monkeypatch.setattr(registry, "_read_notes", lambda folder: reads.append("notes") or read_notes(folder))
    monkeypatch.setattr(registry, "_plugins", lambda group: reads.append(group) or plugins(group))
    for _ in range(3):
        registry.get("d3")
        registry.build("ft", budget=1)
        registry.names("attack")
    assert sorted(reads) == ["attack", "defense", "notes", "notes"]  # once per group: YAML files, entry points


@pytest.mark.parametrize("text, message", [
    ("name: x\ndata: sometimes\nbackdoorbench: x\n", "x.yaml: `data` must be one of"),
    ("name: x\nimplementation: {native: a:b}\n", "unknown keys \\['implementation'\\]"),
    ("name: d3\ndata: none\n", "`data` of a native defense is declared where it is registered"),
    ("name: d3\noverrides: {gtsrb: {values: {lamda: 2}}}\n", "overrides.gtsrb: unknown hyper-parameter"),
    ("- not a mapping\n", "must be a mapping with a `name`"),
])
def test_shipped_notes_are_validated(tmp_path, text, message):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        registry.load(notes=tmp_path)


def test_scratch_files_are_not_entries_and_a_bare_note_is_unavailable(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\npaper: {title: X}\n")
    (tmp_path / "_scratch.yaml").write_text("not: an entry\n")
    entries = registry.load(notes=tmp_path)
    assert entries["x"].where == "unavailable" and "not" not in entries


PLUGIN_MODULE = textwrap.dedent('''
    """A third-party package: every accepted plugin shape, and broken ones."""
    import copy
    from dataclasses import dataclass

    from d3_plugin.attacks.badnets import BadNets
    from d3_plugin.attacks.registry import Attack
    from d3_plugin.registry import register_defense

    @dataclass
    class ShrinkConfig:
        factor: float = 0.5
        epochs: int = 1

    @register_defense("registered", config=ShrinkConfig)
    def registered(model, clean_batches, config, *, on_epoch=None, progress=None):
        """Scale every weight (a toy defense registered with the decorator)."""
        model = copy.deepcopy(model)
        for p in model.parameters():
            p.data.mul_(config.factor)
        return model, [{"epoch": 1}]

    def plain(model, clean_batches, config, *, on_epoch=None, progress=None):
        """The same, declared only by an entry point."""
        return registered(model, clean_batches, config)
    plain.config_class = ShrinkConfig

    def wrong_shape(model):
        return model

    class BBClass:
        """A BackdoorBench-style defense class."""
        @staticmethod
        def add_arguments(parser):
            parser.add_argument("--result_file")
        def __init__(self, args):
            self.args = args
        def defense(self, result_file):
            CALLS.append(result_file)
            return {}

    class NotADefense:
        pass

    CALLS = []
    DECLARED = {"paper": {"title": "Declared"}, "data": "none", "backdoorbench": "declared"}

    def square(size: int = 4):
        """A 4x4 square trigger (a trigger factory function)."""
        return BadNets(size=size)

    def needs_args(size):
        return BadNets(size=size)

    ready = Attack("ready", BadNets, "an Attack object", trigger_params={"size": 2})
''')

ENTRY_POINTS = """[backdoorbench.defenses]
registered = acme_defense:registered
plain = acme_defense:plain
bbclass = acme_defense:BBClass
declared = acme_defense:DECLARED
wrong-shape = acme_defense:wrong_shape
not-a-defense = acme_defense:NotADefense
missing = acme_defense:missing_attribute
ft = acme_defense:plain

[backdoorbench.attacks]
square = acme_defense:square
ready = acme_defense:ready
needs-args = acme_defense:needs_args
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A fake installed distribution `acme-backdoor` declaring plugins (found by importlib.metadata)."""
    (tmp_path / "acme_defense.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "acme_backdoor-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-backdoor\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("acme_defense", None)
    registry._REGISTERED.pop(("defense", "registered"), None)


def test_third_party_plugins_join_the_registry_in_every_shape(third_party):
    entries = registry.load()
    assert entries["registered"].where == "native" and entries["registered"].origin.startswith("acme-backdoor")
    assert entries["plain"].where == "native" and entries["plain"].config.__name__ == "ShrinkConfig"
    assert entries["bbclass"].where == "plugin class"
    assert entries["declared"].where == "backdoorbench" and entries["declared"].data == "none"
    assert entries["ft"].run.__module__ == "d3_plugin.defenses.ft"  # a name we ship wins
    model = torch.nn.Linear(2, 2)
    for name in ("registered", "plain"):
        shrunk, _ = registry.build(name, factor=0.1)(model, [])
        assert torch.allclose(shrunk.weight, model.weight * 0.1)
        assert registry.build(name, budget=4).config.epochs == 4
    assert isinstance(registry.build("bbclass"), registry.ScriptDefense)
    import acme_defense  # a plugin class runs through its BackdoorBench interface (as in a checkout)
    assert registry.run_plugin_class("bbclass", ["--result_file", "badnet_x"]) == 0
    assert acme_defense.CALLS == ["badnet_x"]
    found = attacks()
    assert found["square"].make_trigger().size == 4 and found["ready"].make_trigger().size == 2


def test_a_broken_plugin_is_listed_with_its_reason_and_breaks_nothing(third_party, capsys):
    entries = registry.load()
    assert "does not match defend(model, clean_batches, config" in entries["wrong-shape"].broken
    assert "neither" in entries["not-a-defense"].broken or "lacks" in entries["not-a-defense"].broken
    assert "AttributeError" in entries["missing"].broken
    assert "needs defaults for size" in registry.load("attack")["needs-args"].broken
    with pytest.raises(ValueError, match="'wrong-shape' .*acme-backdoor.* is broken"):
        registry.build("wrong-shape")
    parser = argparse.ArgumentParser()
    list_command.add_arguments(parser)
    assert list_command.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    for text in ("wrong-shape  broken:", "acme-backdoor", "needs-args   broken:", "registered", "sam-flatten",
                 "nc", "BackdoorBench nc.py", "Backdoor Mitigation by Distance-Driven Detoxification"):
        assert text in out, text
    from d3_plugin.cli import main
    assert main(["list", "--group", "attacks"]) == 0  # every command still builds its parser
    assert "needs-args" not in attacks()


def test_a_plugin_cannot_take_over_a_name_we_ship():
    def mine(model, clean_batches, config, *, on_epoch=None, progress=None):
        return model, []
    mine.__module__ = "acme_defense"
    with pytest.raises(ValueError, match="'ft' is taken by d3-plugin"):
        registry.register_defense("ft")(mine)
    assert registry.get("ft").run.__module__ == "d3_plugin.defenses.ft"


def test_a_defend_function_of_the_wrong_shape_cannot_be_registered():
    with pytest.raises(TypeError, match="does not match defend"):
        registry.register_defense("bad")(lambda model: model)
    with pytest.raises(ValueError, match="data must be one of"):
        registry.register_defense("bad", data="sometimes")
    assert "bad" not in registry.names()


def test_attack_objects_are_the_registered_ones():
    assert isinstance(get_attack("badnets"), Attack) and get_attack("BadNets") is get_attack("badnets")
    assert set(attacks()) == ATTACKS - {"sam-flatten", "input-aware"}  # those two are record-making procedures


def test_a_checkouts_defense_base_runs_only_when_a_defense_class_is_built(tmp_path):
    """Listing or importing never executes ./defense/base.py; building a defense class in a checkout does
    (and subclasses it, as BackdoorBench's own scripts do)."""
    import subprocess
    (tmp_path / "defense").mkdir()
    (tmp_path / "defense" / "__init__.py").write_text("")
    (tmp_path / "defense" / "base.py").write_text("open('ran', 'w').write('x')\nclass defense(object):\n    pass\n")

    def python(code_or_module, *args):
        return subprocess.run([sys.executable, *args, code_or_module], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    python("d3_plugin.registry", "-m")
    done = python("import d3_plugin.backdoorbench.defense, d3_plugin.registry as r; r.load(); r.load('attack')", "-c")
    assert done.returncode == 0, done.stderr[-500:]
    assert not (tmp_path / "ran").exists()
    done = python("import sys; sys.path.insert(0, '.')\nfrom d3_plugin.backdoorbench.defense import d3\n"
                  "print([c.__name__ for c in d3.__mro__])", "-c")
    assert done.returncode == 0 and "'d3', 'BackdoorBenchDefense', 'defense', 'object'" in done.stdout, done.stderr
    assert (tmp_path / "ran").exists()
