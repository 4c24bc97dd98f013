"""`d3-plugin install`: writes the script and configs, refuses foreign files, uninstalls exactly its own."""
import argparse
import ast
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
