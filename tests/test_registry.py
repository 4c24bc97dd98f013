"""The defense registry: shipped entries, lookup, build with per-dataset defaults and overrides, plugins."""
import dataclasses
import textwrap

import pytest

from d3_plugin import plugins, registry
from d3_plugin.data import SPECS

NATIVE = {"d3", "ft", "ft-sam", "fst", "nad", "fp"}


def test_shipped_entries_are_listed_and_complete():
    names = registry.names()
    assert NATIVE | {"nc", "gic", "badacts"} <= set(names)
    for entry in registry.list():
        assert entry.paper.get("title"), f"{entry.name}: paper title missing"
        assert entry.data in registry.DATA_KINDS
        if entry.kind == "unavailable":
            assert "no implementation" in entry.notes.lower(), f"{entry.name} must say why it is unavailable"


@pytest.mark.parametrize("dataset", [None, *sorted(SPECS)])
def test_every_native_entry_builds_for_every_dataset(dataset):
    """Defaults in every YAML name real config fields and pass the config's validation."""
    for entry in registry.list():
        if entry.kind == "native" and entry.plugin is None:
            defense = registry.build(entry.name, dataset=dataset)
            assert callable(defense.function) and dataclasses.is_dataclass(defense.config)
            for key, value in entry.hyperparameters(dataset).items():
                assert getattr(defense.config, key) == value or isinstance(value, list), (entry.name, key)


def test_dataset_defaults_and_overrides():
    cifar = registry.build("ft-sam", dataset="cifar10").config
    gtsrb = registry.build("ft-sam", dataset="gtsrb").config
    assert (cifar.rho, cifar.label_smoothing, cifar.adaptive) == (2.0, 0.1, True)
    assert (gtsrb.rho, gtsrb.label_smoothing, gtsrb.epochs) == (8.0, 0.0, 50)
    assert registry.build("ft-sam", dataset="gtsrb", rho=3.0).config.rho == 3.0
    fst = registry.build("fst", alpha=0.5, epochs=2).config
    assert (fst.alpha, fst.epochs) == (0.5, 2)
    assert registry.get("ft-sam").sources["gtsrb"].startswith("BackdoorBench")


def test_config_hash_follows_the_configuration():
    a, b = registry.build("d3", epochs=5), registry.build("d3", epochs=5)
    assert a.hash() == b.hash() != registry.build("d3", epochs=6).hash()


def test_unknown_names_and_parameters_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown defense 'nope'; known: .*d3"):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown hyper-parameter.*lamda.*valid: .*lam"):
        registry.build("d3", lamda=3)
    with pytest.raises(ValueError, match="no implementation"):
        registry.build("gic")


def test_script_only_entry_builds_a_backdoorbench_runner():
    nc = registry.build("nc", epochs=2)
    assert isinstance(nc, registry.ScriptDefense)
    assert nc.entry.backdoorbench == "nc" and nc.config_dict()["epochs"] == 2


def test_entry_yaml_validation(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\ndata: sometimes\n")
    with pytest.raises(ValueError, match="x.yaml: `data` must be one of"):
        registry.load(tmp_path)
    (tmp_path / "x.yaml").write_text("name: x\nimplementation: {nativ: a:b}\n")
    with pytest.raises(ValueError, match="unknown implementation keys"):
        registry.load(tmp_path)
    (tmp_path / "x.yaml").write_text("name: x\npaper: {title: X}\n")
    (tmp_path / "_scratch.yaml").write_text("not: an entry\n")
    assert "x" in registry.load(tmp_path) and registry.load(tmp_path)["x"].kind == "unavailable"


PLUGIN_MODULE = textwrap.dedent('''
    """A third-party package's defenses."""
    from dataclasses import dataclass
    import copy

    @dataclass
    class ShrinkConfig:
        factor: float = 0.5

    def shrink(model, clean_batches, config, *, on_epoch=None, progress=None):
        """Scale every weight (a toy native defense)."""
        model = copy.deepcopy(model)
        for p in model.parameters():
            p.data.mul_(config.factor)
        return model, [{"epoch": 1}]
    shrink.config_class = ShrinkConfig

    class mydefense:
        """A BackdoorBench-style defense class."""
        @staticmethod
        def add_arguments(parser):
            parser.add_argument("--result_file")
        def __init__(self, args):
            self.args = args
        def defense(self, result_file):
            CALLS.append(result_file)
            return {}

    CALLS = []

    DECLARED = {"paper": {"title": "Declared"}, "data": "none",
                "implementation": {"native": "toy_plugin_module:shrink", "config": "toy_plugin_module:ShrinkConfig"},
                "defaults": {"all": {"source": "plugin", "values": {"factor": 0.25}}}}
''')


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    (tmp_path / "toy_plugin_module.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [plugins.Plugin(plugins.DEFENSES, name, f"toy_plugin_module:{attr}", "toy-dist", "1.0")
             for name, attr in (("shrink", "shrink"), ("mydefense", "mydefense"), ("declared", "DECLARED"),
                                ("ft", "shrink"), ("broken", "missing_attribute"))]
    monkeypatch.setattr(plugins, "discover", lambda group=plugins.DEFENSES: found if group == plugins.DEFENSES else [])


def test_entry_point_plugins_join_the_registry(fake_plugins):
    import torch
    names = registry.names()
    assert {"shrink", "mydefense", "declared", "broken"} <= set(names)
    assert registry.get("shrink").kind == "native"
    assert registry.get("mydefense").kind == "external"
    assert registry.get("declared").paper["title"] == "Declared"
    assert "failed to load" in registry.get("broken").notes and registry.get("broken").kind == "unavailable"
    ft = registry.get("ft")  # the shipped YAML wins; the plugin is recorded on it
    assert ft.native == "d3_plugin.defenses.ft:finetune" and ft.entry_point == "ft"

    model = torch.nn.Linear(2, 2)
    shrunk, _ = registry.build("shrink", factor=0.1)(model, [])
    assert torch.allclose(shrunk.weight, model.weight * 0.1)
    assert registry.build("declared").config.factor == 0.25
    assert isinstance(registry.build("mydefense"), registry.ScriptDefense)
    import toy_plugin_module  # a plugin class runs through its BackdoorBench interface (as in a checkout)
    assert registry.run_plugin_class("mydefense", ["--result_file", "badnet_x"]) == 0
    assert toy_plugin_module.CALLS == ["badnet_x"]
    with pytest.raises(ValueError, match="not a BackdoorBench-style plugin class"):
        registry.run_plugin_class("shrink", [])
