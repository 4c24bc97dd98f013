"""Entry-point discovery: our d3 defense and third parties' plugins, and `d3-plugin list`."""
import argparse
import sys

from d3_plugin import plugins
from d3_plugin.commands import list as list_command


def add_third_party(tmp_path, monkeypatch):
    """A fake installed distribution declaring one defense and one attack."""
    module = tmp_path / "acme_defense.py"
    module.write_text("class shield:\n    @staticmethod\n    def add_arguments(parser):\n        pass\n"
                      "def patch(images):\n    return images\n")
    info = tmp_path / "acme_backdoor-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-backdoor\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[backdoorbench.defenses]\nshield = acme_defense:shield\n\n"
                                           "[backdoorbench.attacks]\npatch = acme_defense:patch\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_our_defense_is_registered():
    found = {p.name: p for p in plugins.discover(plugins.DEFENSES)}
    assert found["d3"].value == "d3_plugin.backdoorbench.defense:d3"
    assert found["d3"].distribution == "d3-plugin"


def test_third_party_plugins_are_discovered_loaded_and_listed(tmp_path, monkeypatch, capsys):
    add_third_party(tmp_path, monkeypatch)
    defenses = {p.name: p for p in plugins.discover(plugins.DEFENSES)}
    attacks = {p.name: p for p in plugins.discover(plugins.ATTACKS)}
    assert {"d3", "shield"} <= set(defenses) and "patch" in attacks
    assert defenses["shield"].distribution == "acme-backdoor" and defenses["shield"].version == "1.2"
    shield = plugins.load("shield")
    assert shield.__name__ == "shield" and callable(shield.add_arguments)
    assert plugins.load("patch", plugins.ATTACKS)("x") == "x"

    parser = argparse.ArgumentParser()
    list_command.add_arguments(parser)
    assert list_command.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    assert "backdoorbench.defenses" in out and "backdoorbench.attacks" in out
    for text in ("d3_plugin.backdoorbench.defense:d3", "shield", "acme-backdoor 1.2", "patch"):
        assert text in out
    sys.modules.pop("acme_defense", None)


def test_unknown_plugin_is_a_one_line_error():
    try:
        plugins.load("no-such-defense")
    except ValueError as error:
        assert "no plugin 'no-such-defense'" in str(error) and "\n" not in str(error)
    else:
        raise AssertionError("expected ValueError")
