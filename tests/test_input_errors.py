"""Issue 26: bad or degenerate inputs are refused in one line (exit 2) before any work, and failed runs leave
nothing behind. Fast: no training; every test builds what it needs in tmp_path."""
import pytest
import torch

from d3_plugin import checks, registry
from d3_plugin.cli import main


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip()


# --- 1. values torch cannot take ------------------------------------------------------------------------

@pytest.mark.parametrize("name, field", [("d3", "lr"), ("ft", "lr"), ("d3", "weight_decay"), ("i-bau", "pert_lr")])
def test_a_float_beyond_float32_is_refused(name, field):
    with pytest.raises(ValueError, match=rf"{field} 1e\+308 is beyond float32's range"):
        registry.build(name, **{field: 1e308})


def test_a_record_with_a_negative_class_count_is_refused(tmp_path):
    from d3_plugin.record_io.records import load_attack_result
    from d3_plugin.record_io.safe_load import CheckpointError
    folder = tmp_path / "record" / "bad"
    folder.mkdir(parents=True)
    keys = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
    weights = {"head.weight": torch.zeros(10, 4)}
    torch.save({k: None for k in keys} | {"model": weights, "model_name": "small_cnn", "num_classes": -3},
               folder / "attack_result.pt")
    with pytest.raises(CheckpointError, match=r"num_classes is -3, not an integer ≥ 2"):
        load_attack_result(folder)


# --- 2. one boolean parser ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("YES", True), ("1", True), (1, True),
                                         ("false", False), ("No", False), ("0", False), (False, False)])
def test_booleans_in_any_case(text, value):
    assert checks.parse_bool(text) is value


@pytest.mark.parametrize("text", ["maybe", "2", 2, "", 1.0, None, "truthy"])
def test_anything_else_is_not_a_boolean(text):
    with pytest.raises(ValueError, match="must be true or false"):
        checks.parse_bool(text)


@pytest.mark.parametrize("option", ["--resume", "--normalize", "--bn_train", "--amp"])
def test_defend_refuses_a_boolean_option_that_is_not_one(capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["defend", "--result_file", "record/none", option, "maybe"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"argument {option}" in last and "must be true or false" in last


def test_a_boolean_in_a_yaml_file_or_set_is_parsed_the_same_way(tmp_path):
    import argparse

    from d3_plugin.backdoorbench.defense import defense_class
    cls = defense_class("d3")
    for text, refused in (("resume: maybe\n", "resume must be true or false"),
                          ("normalize: 2\n", "normalize=2 is not a valid boolean")):
        (tmp_path / "d3.yaml").write_text(text)
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        with pytest.raises(ValueError, match=refused):
            cls(parser.parse_args(["--yaml_path", str(tmp_path / "d3.yaml")]))
    with pytest.raises(ValueError, match="d3: bn_train must be true or false"):
        registry.build("d3", bn_train="maybe")
    assert registry.build("d3", bn_train="no").config.bn_train is False


# --- 3. degenerate inputs -----------------------------------------------------------------------------

def test_an_index_file_repeating_an_index_is_refused(tmp_path):
    from d3_plugin.record_io.reserved import reserved_indices
    (tmp_path / "idx.txt").write_text("7\n7\n7\n")
    with pytest.raises(ValueError, match=r"repeats index 7 \(3 times\); list each index once"):
        reserved_indices(100, index_file=str(tmp_path / "idx.txt"))
    (tmp_path / "idx.txt").write_text("7\n3\n")
    assert reserved_indices(100, index_file=str(tmp_path / "idx.txt")).tolist() == [7, 3]


@pytest.mark.parametrize("defenses, expected", [
    ("ft,ft", "--defenses 'ft,ft' repeats ft; give each defense once"),
    ("ft,FT-SAM,ft_sam", "repeats ft-sam; give each defense once"),
    ("bb:ft", "bb:ft runs as a BackdoorBench script; pass --backdoorbench PATH"),
])
def test_compare_refuses_repeated_or_unrunnable_defenses_before_reading_data(capsys, defenses, expected):
    status, message = run(capsys, "compare", "--result_file", "no_such_record", "--defenses", defenses)
    assert status == 2 and "\n" not in message and expected in message


def test_compare_refuses_repeated_seeds_the_same_way(capsys):
    status, message = run(capsys, "compare", "--result_file", "no_such_record", "--seeds", "0,0")
    assert status == 2 and "--seeds '0,0' repeats 0; give each seed once" in message


@pytest.mark.parametrize("defenses", ["", " , "])
def test_install_refuses_an_empty_defense_list(tmp_path, capsys, defenses):
    (tmp_path / "defense").mkdir()
    status, message = run(capsys, "install", tmp_path, "--defenses", defenses)
    assert status == 2 and "--defenses is empty" in message
    assert list((tmp_path / "defense").iterdir()) == []


# --- 4. demo checks its settings before any work ------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "-1"], "epochs must be an integer ≥ 0, got -1"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--train-size", "0"], "--train-size must be an integer ≥ 1"),
    (["--attack-epochs", "0"], "--attack-epochs must be an integer ≥ 1"),
])
def test_demo_refuses_bad_settings_before_reading_data(tmp_path, capsys, monkeypatch, argv, expected):
    import d3_plugin.demo

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started work before checking its settings")
    monkeypatch.setattr(d3_plugin.demo, "load_dataset", no_work)
    status, message = run(capsys, "demo", "--out", tmp_path / "demo", "--device", "cpu", *argv)
    assert status == 2 and expected in message
    assert not (tmp_path / "demo").exists()


# --- 5. a corrupt grid cell is named, set aside and counts as not run ---------------------------------

def _grid_with_two_cells(out):
    from d3_plugin import grid
    from d3_plugin.files import write_json
    cells = [grid.Cell("tiny", "record/tiny", name, name, {}, 0, {"ratio": 0.05, "device": "cpu"}, key=key)
             for name, key in (("ft", "aaa"), ("d3", "bbb"))]
    for cell in cells:
        write_json(cell.path(out) / "result.json", {**grid._cell_identity(cell), "acc": 0.9, "asr": 0.1, "ra": 0.8,
                                                    "seconds": 1.0})
    (cells[1].path(out) / "result.json").write_text('{"record": "tiny", "def')  # truncated
    return grid.Grid(out, [0], [], cells), cells


def test_a_truncated_cell_is_named_set_aside_and_left_out_of_the_table(tmp_path, capsys):
    from d3_plugin import grid
    plan, cells = _grid_with_two_cells(tmp_path)
    rows, pending = grid.finished_rows(plan)
    assert [r["defense"] for r in rows] == ["ft"] and pending == 1
    warning = capsys.readouterr().err
    assert "warning:" in warning and "bbb/result.json is corrupt" in warning and "counts as not run" in warning
    assert not cells[1].path(tmp_path).exists()
    assert len(list(cells[1].path(tmp_path).parent.glob("seed0-bbb.corrupt-*/result.json"))) == 1


def test_a_truncated_cell_is_run_again(tmp_path, monkeypatch):
    from d3_plugin import grid
    plan, cells = _grid_with_two_cells(tmp_path)
    monkeypatch.setattr(grid, "_measure", lambda cell: {"acc": 0.5, "asr": 0.2, "ra": 0.4, "seconds": 2.0})
    assert grid.run_cell(cells[0], str(tmp_path))["skipped"]
    again = grid.run_cell(cells[1], str(tmp_path))
    assert "skipped" not in again and again["acc"] == 0.5
    assert grid.read_cell(cells[1].path(tmp_path))["acc"] == 0.5


# --- 6. staging folders of failed and killed runs -------------------------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_removes_the_staging_folders_of_dead_runs_only(tmp_path):
    import os

    from d3_plugin.files import StagedFolder
    final = tmp_path / "defense" / "d3"
    dead = final.with_name(f".d3.partial-20200101-000000-{_dead_pid()}")
    alive = final.with_name(f".d3.partial-20200101-000000-{os.getppid()}")  # another run in progress
    other = final.with_name(f".fst.partial-20200101-000000-{_dead_pid()}")  # another defense's: not ours to judge
    replaced = final.with_name(f".d3.replaced-20200101-000000-{_dead_pid()}")  # may hold the only previous run
    for folder in (dead, alive, other, replaced):
        (folder / "log").mkdir(parents=True)
    StagedFolder(final).remove_stale()
    assert not dead.exists() and alive.exists() and other.exists() and replaced.exists()


def _failing_run(tmp_path, error):
    import argparse

    from d3_plugin.backdoorbench.defense import defense_class
    from d3_plugin.files import StagedFolder
    run = object.__new__(defense_class("d3"))
    run.args = argparse.Namespace(log=str(tmp_path / "log"))
    run.staged = StagedFolder(tmp_path / "defense" / "d3")
    run.staged.staging.mkdir(parents=True)
    run.set_result = lambda result_file: None
    run.set_logger = lambda: None

    def fails():
        raise error
    run.mitigation = fails
    with pytest.raises(type(error)):
        run.defense("record/x")
    return run.staged.staging


def test_a_failed_run_removes_its_staging_folder(tmp_path):
    assert not _failing_run(tmp_path, ValueError("bad data")).exists()


def test_an_interrupted_run_keeps_its_log_for_a_later_run_to_remove(tmp_path):
    assert _failing_run(tmp_path, KeyboardInterrupt()).exists()


def test_a_failed_publish_keeps_the_finished_run_it_names(tmp_path, monkeypatch):
    from pathlib import Path

    from d3_plugin.files import OutputNotWritable, StagedFolder
    staged = StagedFolder(tmp_path / "d3")
    staged.staging.mkdir()

    def refuse(self, target):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(OutputNotWritable, match=str(staged.staging)):
        staged.publish()
    staged.discard()
    assert staged.staging.exists()


# --- 7. one run at a time per output folder -------------------------------------------------------------

HOLD = """import fcntl, os, sys, time
os.makedirs(sys.argv[1])
with open(os.path.join(sys.argv[1], ".d3-plugin.lock"), "a+") as f:  # what files.folder_lock takes
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(str(os.getpid()))
    f.flush()
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """An output folder whose lock another process holds (killed at the end: the system releases it)."""
    import subprocess
    import sys
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield folder
    holder.kill()
    holder.wait()


def test_a_folder_in_use_is_refused_then_free_once_its_holder_dies(held):
    import os
    import signal
    import time

    from d3_plugin.files import FolderInUse, folder_lock
    with pytest.raises(FolderInUse, match=r"is in use by another run \(pid \d+ holds .*\.d3-plugin\.lock\); wait"):
        with folder_lock(held):
            pass
    os.kill(int((held / ".d3-plugin.lock").read_text()), signal.SIGKILL)
    for _ in range(100):
        try:
            with folder_lock(held):
                return
        except FolderInUse:
            time.sleep(0.05)
    raise AssertionError("the lock outlived its holder")


def test_compare_refuses_an_out_folder_in_use(held):
    from d3_plugin.compare import compare
    from d3_plugin.files import FolderInUse
    with pytest.raises(FolderInUse, match="pass another --out"):
        compare([], ["ft"], out=held)


def test_grid_refuses_an_out_folder_in_use_but_tabulates_it(held, tmp_path, capsys):
    (tmp_path / "record" / "tiny").mkdir(parents=True)
    (tmp_path / "record" / "tiny" / "attack_result.pt").touch()
    (tmp_path / "g.yaml").write_text(f"attacks: [{{record: {tmp_path / 'record' / 'tiny'}}}]\ndefenses: [ft]\n")
    status, message = run(capsys, "grid", tmp_path / "g.yaml", "--out", held)
    assert status == 2 and "is in use by another run" in message and "\n" not in message
    assert run(capsys, "grid", tmp_path / "g.yaml", "--out", held, "--table-only")[0] == 0


# --- 8. clearer one-liners ------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [[], [""], [" "], "fc"])
def test_d3_refuses_empty_layer_names(layers):
    with pytest.raises(ValueError, match=r"layers must name modules, e.g. --layers fc"):
        registry.build("d3", layers=layers)


def test_defend_refuses_an_empty_layers_option(capsys, tmp_path):
    status, message = run(capsys, "defend", "--result_file", tmp_path / "none", "--layers", "")
    assert status == 2 and "layers must name modules" in message


def test_a_checkpoint_that_is_not_a_file_says_what_it_is(tmp_path):
    from d3_plugin.record_io.records import load_attack_result, load_model_checkpoint
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "record" / "x" / "attack_result.pt").mkdir(parents=True)
    for path, says in (("folder.pt", "is a folder, expected a file"),
                       ("zero.pt", r"is not a regular file \(a device, pipe or socket\)"),
                       ("dangling.pt", "is a link to .*nowhere, which does not exist"),
                       ("missing.pt", "does not exist")):
        with pytest.raises(OSError, match=rf"{path} {says}; check the path"):
            load_model_checkpoint(tmp_path / path)
    with pytest.raises(IsADirectoryError, match=r"x/attack_result.pt is a folder, expected a file"):
        load_attack_result(tmp_path / "record" / "x")


def test_index_and_config_files_that_are_folders_say_so(tmp_path):
    from d3_plugin.backdoorbench.defense import read_yaml
    from d3_plugin.record_io.reserved import read_index_file
    with pytest.raises(IsADirectoryError, match="index file .* is a folder, expected a file; pass a file of indices"):
        read_index_file(tmp_path, 10)
    with pytest.raises(IsADirectoryError, match="config file .* is a folder, expected a file; pass --yaml_path"):
        read_yaml(tmp_path, "d3")


def test_uninstall_honours_defenses(tmp_path, capsys):
    from d3_plugin.backdoorbench import install
    (tmp_path / "defense").mkdir()
    install.install(tmp_path, defenses=["d3", "fst"])
    edited = tmp_path / "defense" / "d3.py"
    edited.write_text(edited.read_text() + "# my edit\n")
    status, _ = run(capsys, "install", tmp_path, "--uninstall", "--defenses", "fst")
    assert status == 0 and not (tmp_path / "defense/fst.py").exists() and not (tmp_path / "config/defense/fst").exists()
    assert edited.read_text().endswith("# my edit\n") and (tmp_path / "config/defense/d3/mnist.yaml").is_file()
    status, message = run(capsys, "install", tmp_path, "--uninstall", "--defenses", "fst")
    assert status == 2 and "fst not installed in" in message
    status, message = run(capsys, "install", tmp_path, "--uninstall")  # the rest: still stopped by the edit
    assert status == 2 and "defense/d3.py in" in message and "was edited" in message
    assert run(capsys, "install", tmp_path, "--uninstall", "--defenses", "d3", "--force")[0] == 0
    assert not (tmp_path / install.MANIFEST).exists() and list((tmp_path / "defense").iterdir()) == []
