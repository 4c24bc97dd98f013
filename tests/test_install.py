"""`d3-plugin install`: writes the script and configs, refuses foreign files, uninstalls exactly its own."""
import argparse
import ast
import json
from pathlib import Path

import pytest
import yaml

from d3_plugin.backdoorbench import install
from d3_plugin.commands import install as install_command


def fake_checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / "BackdoorBench"
    (checkout / "defense").mkdir(parents=True)
    (checkout / "defense" / "ft.py").write_text("print('ft')\n")
    (checkout / "config" / "defense" / "ft").mkdir(parents=True)
    return checkout


def run_command(*argv) -> int:
    parser = argparse.ArgumentParser()
    install_command.add_arguments(parser)
    return install_command.run(parser.parse_args([str(a) for a in argv]))


def cli(*argv) -> int:
    """`d3-plugin install ...` through the real entry point (errors become one line and status 2)."""
    from d3_plugin.cli import main
    return main(["install", *map(str, argv)])


def tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_install_writes_script_and_configs_then_uninstall_removes_exactly_them(tmp_path, capsys):
    checkout = fake_checkout(tmp_path)
    before = tree(checkout)
    assert run_command(checkout) == 0
    names = {p.name for p in (checkout / "config/defense/d3").iterdir()}
    assert names == {"config.yaml", "cifar10.yaml", "cifar100.yaml", "gtsrb.yaml", "tiny.yaml", "mnist.yaml"}
    script = (checkout / "defense/d3.py").read_text()
    assert script.splitlines()[0] == install.HEADER
    ast.parse(script)  # valid Python
    assert "d3.add_arguments(parser)" in script and "d3(args).defense(args.result_file)" in script
    for path in (checkout / "config/defense/d3").iterdir():
        settings = yaml.safe_load(path.read_text())
        assert settings["device"] == "auto" and settings["lmd"] is None and settings["eps"] == 0.1
        assert settings["preset"] == "default" and settings["select_layer_name"] is None
        assert settings["ratio"] == 0.05 and settings["warm_up_method"] == "random"
    assert run_command(checkout) == 0  # re-install over our own files is fine
    assert run_command(checkout, "--uninstall") == 0
    assert tree(checkout) == before
    assert (checkout / "defense/ft.py").read_text() == "print('ft')\n"


def test_install_refuses_to_overwrite_a_foreign_file_and_writes_nothing(tmp_path):
    checkout = fake_checkout(tmp_path)
    (checkout / "defense/d3.py").write_text("# the authors' own D3\n")
    before = tree(checkout)
    with pytest.raises(FileExistsError, match="not written by d3-plugin"):
        run_command(checkout)
    assert tree(checkout) == before
    assert (checkout / "defense/d3.py").read_text() == "# the authors' own D3\n"


def test_uninstall_leaves_files_that_lost_our_header_and_foreign_neighbours(tmp_path):
    checkout = fake_checkout(tmp_path)
    install.install(checkout)
    edited = checkout / "config/defense/d3/tiny.yaml"
    edited.write_text("# my own tiny settings\nepochs: 5\n")
    neighbour = checkout / "config/defense/d3/mine.yaml"
    neighbour.write_text("epochs: 1\n")
    removed = install.uninstall(checkout)
    assert edited.exists() and neighbour.exists()
    assert not (checkout / "defense/d3.py").exists()
    assert len(removed) == 6  # script + 5 of 6 configs
    assert not (checkout / install.MANIFEST).exists()


def test_not_a_checkout_and_not_installed_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not look like a BackdoorBench checkout"):
        install.install(tmp_path)
    with pytest.raises(FileNotFoundError, match="not installed"):
        install.uninstall(fake_checkout(tmp_path))


def test_an_edited_file_of_ours_is_neither_overwritten_nor_removed_without_force(tmp_path, capsys):
    checkout = fake_checkout(tmp_path)
    assert cli(checkout) == 0
    script = checkout / "defense/d3.py"
    script.write_text(script.read_text() + "# my edit\n")  # header kept
    edited = script.read_text()
    before = tree(checkout)
    assert cli(checkout) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "defense/d3.py" in message and "--force" in message
    assert script.read_text() == edited and tree(checkout) == before
    assert cli(checkout, "--uninstall") == 2
    assert script.read_text() == edited and tree(checkout) == before
    assert cli(checkout, "--force") == 0
    assert "# my edit" not in script.read_text()
    assert cli(checkout, "--uninstall") == 0 and not script.exists()


def test_a_corrupt_manifest_stops_install_before_anything_is_written(tmp_path, capsys):
    checkout = fake_checkout(tmp_path)
    (checkout / install.MANIFEST).write_text("{not json")
    before = tree(checkout)
    assert cli(checkout) == 2
    assert "is corrupt" in capsys.readouterr().err
    assert tree(checkout) == before


def test_a_manifest_without_hashes_still_uninstalls_files_left_as_this_version_writes_them(tmp_path):
    checkout = fake_checkout(tmp_path)
    install.install(checkout)
    manifest = checkout / install.MANIFEST
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"d3_plugin_version": "0.1", "files": sorted(old["files"])}))
    assert len(install.uninstall(checkout)) == 7


def test_every_generated_config_is_valid_yaml_that_builds_its_defense(tmp_path):
    """Each native defense's six configs parse and give the config dataclass's defaults (with the dataset's
    overrides), read through the BackdoorBench class exactly as a script reads them."""
    import argparse

    import yaml

    from d3_plugin import registry
    from d3_plugin.backdoorbench.defense import defense_class
    for rel, text in install.planned_files(install.native_defenses()).items():
        if rel.suffix != ".yaml":
            continue
        assert isinstance(yaml.safe_load(text), dict), rel
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        name = next(n for n in install.native_defenses() if install.script_name(registry.get(n)) == rel.parent.name)
        cls = defense_class(name)
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        dataset = None if rel.stem == "config" else rel.stem
        expected = registry.build(name, dataset, model="preactresnet18").config
        assert cls(parser.parse_args(["--yaml_path", str(path)])).config == expected, rel
