"""The BackdoorBench defense class: settings merge, reserved-set draw, result files, and a subprocess run
of the installed defense/d3.py in a fake checkout on a record of real Fashion-MNIST images."""
import argparse
import csv
import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3_plugin.attacks.badnets import BadNets
from d3_plugin.attacks.base import poison_test_set, poison_training_set
from d3_plugin.attacks.training import TrainConfig, train_model
from d3_plugin.backdoorbench import install
from d3_plugin.record_io import outputs
from d3_plugin.backdoorbench.defense import d3, main
from d3_plugin.record_io.records import model_from_record, write_attack_record
from d3_plugin.record_io.reserved import EmptyReservedSet, draw_reserved, reserved_indices
from d3_plugin.record_io.safe_load import safe_torch_load
from d3_plugin.commands import defend
from d3_plugin.data import dataset_spec, load_dataset
from d3_plugin.models import build_model

from conftest import TEST_SEED, write_fashion_mnist_subset

pytestmark = pytest.mark.trained  # see conftest.py

COLUMNS = ["", "epoch", "train_epoch_loss_avg_over_batch", "clean_test_loss_avg_over_batch",
           "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]
RECORD = "badnet_fmnist"


def parse(argv):
    parser = argparse.ArgumentParser()
    d3.add_arguments(parser)
    return parser.parse_args(argv)


# --- settings --------------------------------------------------------------------------------------

def test_every_option_but_yaml_path_defaults_to_none():
    args = parse([])
    assert {k for k, v in vars(args).items() if v is not None} == {"yaml_path"}
    assert [c.__name__ for c in d3.__mro__] == ["d3", "BackdoorBenchDefense", "object"]  # no BackdoorBench here


def test_yaml_then_cli_merge_and_mapping_onto_d3config(tmp_path):
    config = tmp_path / "d3.yaml"
    config.write_text("model: preactresnet18\nepochs: 100\nlmd: 10.0\neps: 0.1\nlr: 0.01\nwd: 0.0\n"
                      "train_mode: True\nwarm_up_method: random\nratio: 0.05\nrandom_seed: 0\n")
    defense = d3(parse(["--yaml_path", str(config), "--epochs", "3", "--eps", "0.2",
                        "--train_mode", "false", "--select_layer_name", "linear,layer4"]))
    args = defense.args
    assert (args.epochs, args.eps, args.lmd, args.ratio, args.lr) == (3, 0.2, 10.0, 0.05, 0.01)
    assert args.bn_train is False and args.device == "auto"  # configs/backdoorbench.yaml's run default
    cfg = defense.config
    assert (cfg.lam, cfg.eps, cfg.epochs, cfg.lr, cfg.bn_train, cfg.warm_start) == (10.0, 0.2, 3, 0.01, False,
                                                                                       "random")
    assert list(cfg.layers) == ["linear", "layer4"]
    default = d3(parse(["--yaml_path", str(config)])).config
    assert list(default.layers) == ["layer3", "layer4", "linear"]  # preactresnet18's default θs


def test_preset_paper_gives_the_papers_lambda_and_head_unless_a_value_is_set(tmp_path):
    config = tmp_path / "d3.yaml"
    config.write_text("model: preactresnet18\npreset: default\nlmd:\nselect_layer_name:\n")
    default = d3(parse(["--yaml_path", str(config)])).config
    assert (default.lam, list(default.layers)) == (1.0, ["layer3", "layer4", "linear"])
    paper = d3(parse(["--yaml_path", str(config), "--preset", "paper"])).config
    assert (paper.lam, list(paper.layers)) == (10.0, ["linear"])
    chosen = d3(parse(["--yaml_path", str(config), "--preset", "paper", "--lmd", "5", "--select_layer_name",
                       "layer4,linear"])).config
    assert (chosen.lam, list(chosen.layers)) == (5.0, ["layer4", "linear"])
    with pytest.raises(ValueError, match="preset 'fast' is unknown; use default or paper"):
        d3(parse(["--yaml_path", str(config), "--preset", "fast"])).config


def test_unsupported_settings_are_one_line_errors(tmp_path):
    config = tmp_path / "d3.yaml"
    config.write_text("model: small_cnn\nlr_scheduler: ReduceLROnPlateau\n")
    with pytest.raises(ValueError, match="lr_scheduler='ReduceLROnPlateau' is not supported by d3; set "
                                         "lr_scheduler: CosineAnnealingLR"):
        d3(parse(["--yaml_path", str(config)])).config
    with pytest.raises(ValueError, match="warm_start"):
        d3(parse(["--yaml_path", str(config), "--lr_scheduler", "CosineAnnealingLR",
                  "--warm_up_method", "sideways"])).config
    with pytest.raises(FileNotFoundError, match="--yaml_path"):
        d3(parse(["--yaml_path", str(tmp_path / "missing.yaml")]))


# --- reserved set and table helpers ----------------------------------------------------------------

@pytest.mark.parametrize("n,ratio,seed", [(50000, 0.05, 0), (60000, 0.01, 3), (1234, 0.1, 7)])
def test_reserved_draw_equals_backdoorbench_random_sample(n, ratio, seed):
    state = random.getstate()
    random.seed(seed)
    expected = random.sample(range(n), int(n * ratio))
    random.setstate(state)
    drawn = draw_reserved(n, ratio, seed)
    assert drawn.tolist() == expected
    assert random.getstate() == state  # the global generator is left alone


def test_reserved_index_file_and_empty_set(tmp_path):
    index = tmp_path / "index.txt"
    outputs.write_index(index, [5, 0, 9])
    assert index.read_text() == "5\n0\n9\n"
    assert reserved_indices(10, index_file=str(index)).tolist() == [5, 0, 9]
    with pytest.raises(ValueError, match="outside"):
        reserved_indices(8, index_file=str(index))
    with pytest.raises(EmptyReservedSet, match="empty"):
        reserved_indices(10, ratio=0.05)


def test_metric_tables_follow_backdoorbench_layout(tmp_path):
    rows = [{"epoch": 0, "test_acc": 0.5, "bd_test_loss_avg_over_batch": float("nan")},
            {"epoch": 1, "test_acc": 0.25, "bd_test_loss_avg_over_batch": 1.5}]
    outputs.write_metric_table(tmp_path / "m_df.csv", rows)
    outputs.write_summary_table(tmp_path / "m_df_summary.csv", rows)
    table = list(csv.reader(open(tmp_path / "m_df.csv")))
    assert table == [["", "epoch", "test_acc", "bd_test_loss_avg_over_batch"],
                     ["0", "0", "0.5", "nan_value"], ["1", "1", "0.25", "1.5"]]
    summary = {row[0]: row[1:] for row in csv.reader(open(tmp_path / "m_df_summary.csv"))}
    assert summary["last"] == ["1", "0.25", "1.5"]
    assert summary["valid_max"] == ["1", "0.5", "1.5"]
    assert summary["exist_nan_value"] == ["False", "False", "True"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_unwritable_output_folder_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write to output folder"):
        outputs.ensure_writable(blocker / "sub")


# --- a fake BackdoorBench checkout with a real record ------------------------------------------------

TRAIN_SIZE, TEST_SIZE = 1000, 300  # a real Fashion-MNIST subset keeps the whole file fast on 2 cores


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """<root>/{defense/d3.py, config/defense/d3/, data/fashion_mnist/, record/badnet_fmnist/}."""
    root = tmp_path_factory.mktemp("BackdoorBench")
    (root / "defense").mkdir()
    (root / "config").mkdir()
    install.install(root)
    data = write_fashion_mnist_subset(root / "data" / "fashion_mnist", TRAIN_SIZE, TEST_SIZE)
    spec = dataset_spec("fashion_mnist")
    train, test = load_dataset("fashion_mnist", True, data), load_dataset("fashion_mnist", False, data)
    trigger = BadNets()
    poisoned = poison_training_set(train, trigger, 0.1, target=0)
    torch.manual_seed(TEST_SEED)
    model, _ = train_model(build_model("small_cnn", 10, 1, 28), poisoned, spec,
                           TrainConfig(epochs=1, batch_size=64, lr=0.05))
    write_attack_record(root / "record" / RECORD, model_name="small_cnn", num_classes=10,
                        state_dict=model.state_dict(), dataset="fashion_mnist", data_path="./data/fashion_mnist",
                        img_size=(28, 28, 1), bd_train=poisoned.subset(torch.nonzero(poisoned.poisoned).flatten()),
                        bd_test=poison_test_set(test, trigger, target=0), clean_train_size=TRAIN_SIZE,
                        clean_test_size=TEST_SIZE)
    return root


def clone_checkout(checkout, tmp_path):
    """Another checkout sharing config/ and data/, with its own copy of the record (PNG paths included)."""
    root = tmp_path / "clone"
    (root / "record").mkdir(parents=True)
    for shared in ("config", "data"):
        (root / shared).symlink_to(checkout / shared)
    shutil.copytree(checkout / "record" / RECORD, root / "record" / RECORD, ignore=shutil.ignore_patterns("defense"))
    return root


def test_installed_script_runs_in_a_checkout_and_writes_every_output(checkout):
    command = [sys.executable, "defense/d3.py", "--result_file", RECORD, "--yaml_path",
               "./config/defense/d3/mnist.yaml", "--epochs", "2", "--ratio", "0.2", "--batch_size", "128"]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    save = checkout / "record" / RECORD / "defense" / "d3"

    table = list(csv.reader(open(save / "d3_df.csv")))
    assert table[0] == COLUMNS and len(table) == 3
    rows = [dict(zip(COLUMNS, map(float, row))) for row in table[1:]]
    assert [r[""] for r in rows] == [0, 1] and [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert all(0.0 <= row[k] <= 1.0 for k in ("test_acc", "test_asr", "test_ra"))
        assert all(math.isfinite(row[k]) for k in COLUMNS[2:5])
    summary = {row[0]: row[1:] for row in csv.reader(open(save / "d3_df_summary.csv"))}
    assert set(summary) == {"", "last", "valid_max", "exist_nan_value"} and summary[""] == COLUMNS[1:]
    assert [float(v) for v in summary["last"]] == [rows[-1][c] for c in COLUMNS[1:]]
    assert [float(v) for v in summary["valid_max"]] == [max(r[c] for r in rows) for c in COLUMNS[1:]]
    assert summary["exist_nan_value"] == ["False"] * 7

    for plot in ("acc_like_metric_plots.png", "loss_metric_plots.png"):
        with Image.open(save / plot) as image:
            assert image.format == "PNG" and image.size == (1280, 960)

    result = safe_torch_load(save / "defense_result.pt")
    assert set(result) == {"model_name", "num_classes", "model"}
    assert (result["model_name"], result["num_classes"]) == ("small_cnn", 10)
    purified = model_from_record(("small_cnn", 10, result["model"]))
    attacked = safe_torch_load(checkout / "record" / RECORD / "attack_result.pt")["model"]
    linear = [k for k, m in purified.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in linear:  # D3 moved θs away but kept each on its norm sphere
        before, after = attacked[f"{name}.weight"], result["model"][f"{name}.weight"]
        assert not torch.allclose(before, after)
        assert torch.linalg.vector_norm(after).item() == pytest.approx(torch.linalg.vector_norm(before).item(),
                                                                       rel=1e-4)

    random.seed(0)
    assert np.loadtxt(save / "log" / "index.txt", dtype=int).tolist() == random.sample(range(TRAIN_SIZE), int(TRAIN_SIZE * 0.2))
    logs = list((save / "log").glob("*.log"))
    assert len(logs) == 1 and "[INFO    ] [defense.py:" in logs[0].read_text()
    assert (save / "checkpoint").is_dir()

    report = json.loads((save / "d3_summary.json").read_text())
    assert report["after"]["acc"] == pytest.approx(rows[-1]["test_acc"])
    assert report["after"]["asr"] == pytest.approx(rows[-1]["test_asr"])
    assert 0.0 <= report["der"] <= 1.0 and set(report["before"]) == {"acc", "asr", "ra"}
    assert report["reserved"]["size"] == int(TRAIN_SIZE * 0.2) and report["model"] == "small_cnn"
    assert (report["config"]["lam"], report["config"]["eps"], report["config"]["epochs"]) == (1.0, 0.1, 2)
    assert not list(save.rglob(".*.tmp"))


def test_standalone_defend_command_with_checkout_option(checkout, tmp_path, capsys):
    root = clone_checkout(checkout, tmp_path)
    parser = argparse.ArgumentParser()
    defend.add_arguments(parser)
    args = parser.parse_args(["--result_file", RECORD, "--checkout", str(root), "--epochs", "1", "--ratio", "0.1",
                              "--lmd", "5", "--select_layer_name", "fc"])
    assert args.yaml_path is None  # the defaults alone: the config dataclass and configs/backdoorbench.yaml
    assert defend.run(args) == 0
    assert "ACC" in capsys.readouterr().out
    save = root / "record" / RECORD / "defense" / "d3"
    report = json.loads((save / "d3_summary.json").read_text())
    assert report["config"]["lam"] == 5.0 and report["config"]["layers"] == ["fc"]
    assert len(list(csv.reader(open(save / "d3_df.csv")))) == 2


def run_failing(checkout, monkeypatch, capsys, *argv):
    monkeypatch.chdir(checkout)
    with pytest.raises(SystemExit) as stopped:
        main(["--yaml_path", "./config/defense/d3/mnist.yaml", "--epochs", "1", *argv])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "error:" in message  # stderr holds exactly one line
    return message


class Hostile:
    """Unpickled unsafely, it would create the file PWNED."""
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def png_bomb(path: Path) -> None:
    """A valid 1x1 PNG whose header claims 60000 x 60000 pixels (PIL's decompression-bomb check)."""
    import io
    import struct
    import zlib
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 60000, 60000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["truncated", "missing_png", "empty_reserved", "unwritable", "model_mismatch",
                                  "missing_dataset", "unknown_model", "class_mismatch", "empty_png", "truncated_png",
                                  "png_bomb", "hostile_pickle", "hostile_checkpoint"])
def test_bad_input_is_one_line_and_writes_no_result(checkout, tmp_path, monkeypatch, capsys, case):
    root = clone_checkout(checkout, tmp_path)
    record = root / "record" / RECORD
    argv = ["--result_file", RECORD]
    if case == "truncated":
        pt = record / "attack_result.pt"
        pt.write_bytes(pt.read_bytes()[:1000])
    elif case == "missing_png":
        next((record / "bd_test_dataset").rglob("*.png")).unlink()
    elif case == "empty_reserved":
        argv += ["--ratio", "0.0001"]
    elif case == "unwritable":
        (record / "defense").write_text("a file where the output folder should be")
    elif case == "model_mismatch":
        argv += ["--model", "preactresnet18"]
    elif case in ("empty_png", "truncated_png", "png_bomb"):
        png = next((record / "bd_test_dataset").rglob("*.png"))
        {"empty_png": lambda: png.write_bytes(b""), "truncated_png": lambda: png.write_bytes(png.read_bytes()[:40]),
         "png_bomb": lambda: png_bomb(png)}[case]()
    elif case == "hostile_pickle":
        torch.save({"model": Hostile(), "model_name": "small_cnn", "num_classes": 10}, record / "attack_result.pt")
    elif case == "hostile_checkpoint":
        torch.save({"model": Hostile()}, root / "evil.pt")
        argv += ["--checkpoint_load", "evil.pt"]
    elif case in ("unknown_model", "class_mismatch"):
        pt = record / "attack_result.pt"
        loaded = safe_torch_load(pt)
        loaded.update(model_name="nosuchnet") if case == "unknown_model" else loaded.update(num_classes=43)
        torch.save(loaded, pt)
    else:  # an MNIST record in a checkout without data/mnist (Fashion-MNIST would fall back to the system copy)
        pt = record / "attack_result.pt"
        loaded = safe_torch_load(pt)
        loaded.update(clean_data="mnist", data_path="./data/mnist")
        torch.save(loaded, pt)
    message = run_failing(root, monkeypatch, capsys, *argv)
    expected = {"truncated": "attack_result.pt", "missing_png": "not found", "empty_reserved": "empty",
                "unwritable": "cannot write", "model_mismatch": "small_cnn", "missing_dataset": "data/mnist",
                "unknown_model": "nosuchnet", "class_mismatch": "43", "empty_png": ".png",
                "truncated_png": ".png", "png_bomb": "decompression bomb", "hostile_pickle": "attack_result.pt",
                "hostile_checkpoint": "evil.pt"}[case]
    assert expected in message
    assert not (root / "PWNED").exists()
    results = {"defense_result.pt", "d3_df.csv", "d3_df_summary.csv", "d3_summary.json", "index.txt",
               "acc_like_metric_plots.png", "loss_metric_plots.png"}
    assert not [p for p in record.rglob("*") if p.name in results]


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "nan"], "lr must be a finite number"), (["--lmd", "inf"], "lam must be a finite number"),
    (["--eps", "nan"], "eps must be a finite number"), (["--batch_size", "0"], "batch_size must be an integer ≥ 1"),
    (["--frequency_save", "-1"], "frequency_save must be ≥ 0"), (["--ratio", "1.5"], "ratio must be a fraction"),
    (["--reserved_source", "corrupt:fog"], "bad auxiliary source 'corrupt:fog'"),
    (["--calibrate", "gac"], "unknown calibration 'gac'")])
def test_bad_settings_fail_in_one_line_before_any_data_is_read(tmp_path, monkeypatch, capsys, argv, expected):
    """The record named does not even exist: the settings are refused first."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "d3.yaml"
    config.write_text("model: small_cnn\nepochs: 1\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--yaml_path", str(config), "--result_file", "no_such_record", *argv])
    message = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "\n" not in message and expected in message
    assert not (tmp_path / "record").exists()


# --- precision, --amp, --eval_every, --eval_batch_size --------------------------------------------------

@pytest.mark.parametrize("yaml_text, argv, expected", [
    ("", [], "auto"),                                             # D3Config's default
    ("amp: False\n", [], "fp32"),                                 # BackdoorBench's amp False: full precision
    ("amp: True\n", [], "auto"),
    ("amp: False\n", ["--amp", "True"], "auto"),                  # the command line beats the YAML
    ("amp: True\n", ["--amp", "False"], "fp32"),
    ("amp: False\nprecision: bf16\n", [], "bf16"),                # precision beats amp
    ("", ["--amp", "True", "--precision", "fp32"], "fp32"),
    ("", ["--amp", "False", "--precision", "bf16"], "bf16"),
    ("precision: fp32\n", ["--amp", "True"], "auto"),             # command-line amp beats YAML precision
    ("precision: bf16\n", ["--precision", "fp16"], "fp16"),
])
def test_amp_and_precision_map_onto_d3config(tmp_path, yaml_text, argv, expected):
    config = tmp_path / "d3.yaml"
    config.write_text("model: small_cnn\n" + yaml_text)
    assert d3(parse(["--yaml_path", str(config), *argv])).config.precision == expected


def test_eval_options_defaults_and_one_line_errors(tmp_path):
    config = tmp_path / "d3.yaml"
    config.write_text("model: small_cnn\n")
    cfg = d3(parse(["--yaml_path", str(config)])).config
    assert (cfg.eval_every, cfg.eval_batch_size, cfg.precision) == (1, None, "auto")
    cfg = d3(parse(["--yaml_path", str(config), "--eval_every", "4", "--eval_batch_size", "1024"])).config
    assert (cfg.eval_every, cfg.eval_batch_size) == (4, 1024)
    for argv, option in ((["--precision", "fp8"], "--precision"), (["--eval_every", "0"], "--eval_every"),
                         (["--eval_batch_size", "-5"], "--eval_batch_size"),
                         (["--eval_every", "3", "--frequency_save", "2"], "frequency_save")):
        with pytest.raises(ValueError, match=option) as error:
            d3(parse(["--yaml_path", str(config), *argv])).config
        assert "\n" not in str(error.value)
    config.write_text("model: small_cnn\neval_every: three\n")
    with pytest.raises(ValueError, match="--eval_every must be a positive integer"):
        d3(parse(["--yaml_path", str(config)])).config


def test_eval_every_3_of_5_epochs_evaluates_epochs_3_and_5(checkout, tmp_path, monkeypatch):
    root = clone_checkout(checkout, tmp_path)
    monkeypatch.chdir(root)
    result = main(["--yaml_path", "./config/defense/d3/mnist.yaml", "--result_file", RECORD, "--epochs", "5",
                   "--ratio", "0.1", "--batch_size", "64", "--eval_every", "3", "--eval_batch_size", "128",
                   "--precision", "bf16"])
    assert [("acc" in row) for row in result["history"]] == [False, False, True, False, True]
    save = root / "record" / RECORD / "defense" / "d3"
    table = list(csv.reader(open(save / "d3_df.csv")))
    assert table[0] == COLUMNS and len(table) == 6
    rows = [dict(zip(COLUMNS, row)) for row in table[1:]]
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
    for r in rows:
        assert math.isfinite(float(r["train_epoch_loss_avg_over_batch"]))  # every epoch keeps its training loss
        evaluated = r["epoch"] in ("2", "4")  # epochs 3 and 5, counted from 0
        assert all((r[c] != "") == evaluated for c in COLUMNS[3:]), r
    summary = {row[0]: row[1:] for row in csv.reader(open(save / "d3_df_summary.csv"))}
    assert set(summary) == {"", "last", "valid_max", "exist_nan_value"} and summary[""] == COLUMNS[1:]
    assert summary["last"] == [rows[-1][c] for c in COLUMNS[1:]]
    evaluated = [r for r in rows if r["epoch"] in ("2", "4")]
    assert [float(v) for v in summary["valid_max"][3:]] == [max(float(r[c]) for r in evaluated) for c in COLUMNS[4:]]
    assert summary["exist_nan_value"] == ["False"] * 7
    report = json.loads((save / "d3_summary.json").read_text())
    assert report["precision"] == "bf16" and report["config"]["eval_every"] == 3
    assert report["after"]["acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert result["after"]["acc"] == report["after"]["acc"]


def test_a_calibrated_auxiliary_reserved_set_is_used_and_reported(checkout, tmp_path, monkeypatch):
    root = clone_checkout(checkout, tmp_path)
    monkeypatch.chdir(root)
    result = main(["--yaml_path", "./config/defense/d3/mnist.yaml", "--result_file", RECORD, "--epochs", "1",
                   "--ratio", "0.1", "--batch_size", "64", "--reserved_source", "corrupt:blur:4", "--calibrate", "gic"])
    save = root / "record" / RECORD / "defense" / "d3"
    report = json.loads((save / "d3_summary.json").read_text())
    assert report["reserved"]["source"] == "corrupt:blur:4" and report["reserved"]["calibration"] == "gic"
    assert report["reserved"]["size"] == 100 and result["summary"] == report
    log = next((save / "log").glob("*.log")).read_text()
    assert re.search(r"gic on corrupt:blur:4: BN-statistics distance [0-9.]+ -> [0-9.]+", log)


# --- all-or-nothing result folder --------------------------------------------------------------------

class Killed(Exception):
    """Stands in for the process dying at one write step."""


WRITE_STEPS = ["write_defense_result", "write_metric_table", "write_summary_table", "plot_metrics", "write_index",
               "write_json", "publish"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def quick_run(seed: int):
    return main(["--yaml_path", "./config/defense/d3/mnist.yaml", "--result_file", RECORD, "--epochs", "1",
                 "--ratio", "0.05", "--batch_size", "64", "--random_seed", str(seed)])


def after_a_first_run(checkout, tmp_path, monkeypatch):
    """A clone (the working folder) holding one complete run: (root, its d3/ folder, that folder's files)."""
    root = clone_checkout(checkout, tmp_path)
    monkeypatch.chdir(root)
    quick_run(0)
    save = root / "record" / RECORD / "defense" / "d3"
    return root, save, snapshot(save)


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_a_run_that_dies_at_any_write_step_leaves_the_previous_run_whole(checkout, tmp_path, monkeypatch, step):
    import d3_plugin.backdoorbench.defense as adapter
    root, save, before = after_a_first_run(checkout, tmp_path, monkeypatch)
    assert "d3_summary.json" in before and "defense_result.pt" in before

    def die(*args, **kwargs):
        raise Killed(step)
    if step == "write_defense_result":
        monkeypatch.setattr(adapter, step, die)
    elif step == "publish":
        monkeypatch.setattr(outputs.StagedFolder, step, die)
    else:
        monkeypatch.setattr(adapter.outputs, step, die)
    with pytest.raises(Killed):
        quick_run(1)  # another seed: every file of this run would differ
    assert snapshot(save) == before


def test_a_full_disk_is_one_line_status_2_and_keeps_the_previous_run(checkout, tmp_path, monkeypatch, capsys):
    import errno

    import d3_plugin.backdoorbench.defense as adapter
    root, save, before = after_a_first_run(checkout, tmp_path, monkeypatch)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(adapter.outputs, "write_metric_table", disk_full)
    with pytest.raises(SystemExit) as stopped:
        quick_run(1)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "No space left on device" in message
    assert snapshot(save) == before


def test_a_run_that_dies_between_the_two_renames_leaves_no_result_folder_and_the_old_run_aside(checkout, tmp_path,
                                                                                              monkeypatch):
    root, save, before = after_a_first_run(checkout, tmp_path, monkeypatch)
    rename = Path.rename

    def rename_once_then_die(self, target):
        if self.name.startswith(".d3.partial-"):
            raise Killed("between the renames")
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", rename_once_then_die)
    with pytest.raises(Killed):
        quick_run(1)
    assert not save.exists()  # none, not a mix
    (aside,) = (root / "record" / RECORD / "defense").glob(".d3.replaced-*")
    assert snapshot(aside) == before


def test_a_killed_installed_script_leaves_the_previous_run_whole(checkout, tmp_path, monkeypatch):
    """SIGKILL of `python defense/d3.py` in the middle of its epochs: d3/ still holds the previous run."""
    import signal
    import time
    root, save, before = after_a_first_run(checkout, tmp_path, monkeypatch)
    (root / "defense").symlink_to(checkout / "defense")
    command = [sys.executable, "defense/d3.py", "--result_file", RECORD, "--yaml_path",
               "./config/defense/d3/mnist.yaml", "--epochs", "200", "--ratio", "0.05", "--random_seed", "1"]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:  # wait for the first evaluated epoch, then kill
            if "epoch 0:" in line:
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    time.sleep(0.1)
    assert snapshot(save) == before
    assert list((root / "record" / RECORD / "defense").glob(".d3.partial-*"))  # the dead run's own, hidden


def test_ctrl_c_is_one_line_status_130_and_keeps_the_previous_run(checkout, tmp_path, monkeypatch, capsys):
    import d3_plugin.backdoorbench.defense as adapter
    root, save, before = after_a_first_run(checkout, tmp_path, monkeypatch)
    capsys.readouterr()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(adapter.outputs, "write_metric_table", interrupt)
    with pytest.raises(SystemExit) as stopped:
        quick_run(1)
    assert stopped.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
    assert last.endswith(": interrupted; no results were written (an earlier complete run is kept)")
    assert snapshot(save) == before
    (log,) = (root / "record" / RECORD / "defense").glob(".d3.partial-*/log/*.log")
    assert "KeyboardInterrupt" in log.read_text()  # the interruption is logged with the dead run


# --- every native defense as a BackdoorBench drop-in -------------------------------------------------

STAND_IN_GENERATE = '''"""Stand-in for BackdoorBench's utils/aggregate_block/model_trainer_generate.py (its real one needs the
whole BackdoorBench environment): generate_cls_model(model_name, num_classes, image_size) -> nn.Module."""
from d3_plugin.models import build_model


def generate_cls_model(model_name, num_classes=10, image_size=32, **kwargs):
    return build_model(model_name, num_classes, 1, image_size)
'''
LOAD_RESULTS = ("import sys, torch\n"
                "from utils.aggregate_block.model_trainer_generate import generate_cls_model\n"
                "for path in sys.argv[1:]:\n"
                "    result = torch.load(path, map_location='cpu', weights_only=True)\n"
                "    model = generate_cls_model(result['model_name'], result['num_classes'], 28)\n"
                "    model.load_state_dict(result['model'])\n"
                "    print('loaded', result['model_name'])\n")


def test_install_all_then_every_native_defense_runs_as_its_script_and_writes_a_loadable_model(checkout, tmp_path):
    from d3_plugin import registry

    root = clone_checkout(checkout, tmp_path)
    (root / "config").unlink()
    (root / "defense").mkdir()
    (root / "defense" / "ft.py").write_text("# BackdoorBench's own FT\n")
    helper = root / "utils" / "aggregate_block"
    helper.mkdir(parents=True)
    (helper / "model_trainer_generate.py").write_text(STAND_IN_GENERATE)
    written = install.install(root, defenses=["all"])
    natives = sorted(e.name for e in registry.list_entries() if e.where == "native")
    scripts = {p.stem for p in written if p.parent.name == "defense"}
    assert scripts == {install.script_name(registry.get(n)) for n in natives} and "d3p_ft" in scripts
    assert (root / "defense" / "ft.py").read_text() == "# BackdoorBench's own FT\n"  # theirs untouched
    attacked = safe_torch_load(root / "record" / RECORD / "attack_result.pt")["model"]
    for name in natives:
        script = install.script_name(registry.get(name))
        command = [sys.executable, f"defense/{script}.py", "--result_file", RECORD, "--yaml_path",
                   f"./config/defense/{script}/mnist.yaml", "--epochs", "1", "--ratio", "0.1", "--batch_size", "64",
                   "--device", "cpu", *EXTRA.get(name, [])]
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        save = root / "record" / RECORD / "defense" / script
        assert {f"{script}_df.csv", f"{script}_df_summary.csv", f"{script}_summary.json",
                "defense_result.pt"} <= {p.name for p in save.iterdir()}, name
        result = safe_torch_load(save / "defense_result.pt")["model"]
        if name != "badacts":  # BadActs keeps the weights and adds clipping bounds (checked below)
            assert any(not torch.equal(result[k], attacked[k]) for k in attacked), f"{name} left the model unchanged"
    results = [str(p) for p in (root / "record" / RECORD / "defense").glob("*/defense_result.pt")]
    loaded = subprocess.run([sys.executable, "-c", LOAD_RESULTS, *results], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-1000:]
    assert loaded.stdout.count("loaded small_cnn") == len(natives)
    from d3_plugin.backdoorbench.defense import load_purified
    from d3_plugin.defenses.badacts import ClippedModel
    badacts = root / "record" / RECORD / "defense" / "badacts"
    wrapped = load_purified(badacts)  # the weights BackdoorBench sees, wrapped again with the clipping bounds
    assert isinstance(wrapped, ClippedModel) and (badacts / "badacts_bounds.pt").is_file()
    assert all(torch.equal(v, attacked[k]) for k, v in wrapped.base.state_dict().items())
    assert not isinstance(load_purified(root / "record" / RECORD / "defense" / "d3"), ClippedModel)
    assert len(install.uninstall(root)) == len(written)


EXTRA = {"anp": ["--prune_by", "number", "--prune_value", "3"], "clp": ["--u", "1"]}  # else a tiny model may give nothing to prune


def test_detect_reports_badacts_detection_on_a_record(checkout, tmp_path, capsys):
    from d3_plugin.cli import main as cli
    root = clone_checkout(checkout, tmp_path)
    assert cli(["detect", "--result_file", str(root / "record" / RECORD), "--device", "cpu", "--ratio", "0.2"]) == 0
    report = json.loads((root / "record" / RECORD / "detect" / "badacts.json").read_text())
    assert 0 <= report["auroc"] <= 1 and 0 <= report["flagged_clean"] <= 1 and report["reserved"] == 200
    assert "AUROC" in capsys.readouterr().out
    again = cli(["detect", "--result_file", str(root / "record" / RECORD), "--device", "cpu", "--ratio", "0.2",
                 "--out", str(tmp_path / "again")])
    assert again == 0 and json.loads((tmp_path / "again" / "badacts.json").read_text()) == report  # deterministic


def test_a_killed_run_resumes_to_the_same_model_bit_for_bit(checkout, tmp_path, monkeypatch):
    root = clone_checkout(checkout, tmp_path)
    monkeypatch.chdir(root)
    argv = ["--yaml_path", "./config/defense/d3/mnist.yaml", "--result_file", RECORD, "--epochs", "4",
            "--ratio", "0.1", "--batch_size", "32", "--device", "cpu", "--precision", "fp32"]
    whole = main(argv)["model"].state_dict()
    save = root / "record" / RECORD / "defense"
    assert not (save / ".d3.resume.pt").exists()  # a finished run leaves nothing to resume

    from d3_plugin import bench as bench_module
    evaluate = bench_module.Bench.evaluate
    calls = {"n": 0}

    def dies_in_epoch_3(self, model, loaders=None):
        calls["n"] += 1
        if calls["n"] == 4:  # before, epochs 1 and 2, then epoch 3's evaluation
            raise KeyboardInterrupt
        return evaluate(self, model, loaders)
    monkeypatch.setattr(bench_module.Bench, "evaluate", dies_in_epoch_3)
    with pytest.raises(SystemExit, match="130"):  # the script's Ctrl-C status
        main(argv)
    monkeypatch.setattr(bench_module.Bench, "evaluate", evaluate)
    assert safe_torch_load(save / ".d3.resume.pt")["done"] == 2
    resumed = main(argv + ["--resume", "True"])
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3, 4]
    assert all(torch.equal(whole[k], v) for k, v in resumed["model"].state_dict().items())
    assert not (save / ".d3.resume.pt").exists()
    with pytest.raises(ValueError, match="clp cannot resume"):
        from d3_plugin.backdoorbench.defense import defense_class
        parser = argparse.ArgumentParser()
        defense_class("clp").add_arguments(parser)
        defense_class("clp")(parser.parse_args(["--yaml_path", "", "--resume", "True"]))


SIGKILL_IN_EPOCH_3 = """
import os, runpy, signal, sys
import d3_plugin.bench as bench
evaluate, calls = bench.Bench.evaluate, []
def killed(self, *args, **kwargs):  # before, epochs 1 and 2, then SIGKILL in epoch 3's evaluation
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(self, *args, **kwargs)
bench.Bench.evaluate = killed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_installed_script_killed_by_sigkill_resumes_to_the_same_model_bit_for_bit(checkout, tmp_path):
    """Subprocesses: an uninterrupted run, a run SIGKILLed in epoch 3, then `--resume True`."""
    root = clone_checkout(checkout, tmp_path)
    (root / "defense").mkdir()
    install.install(root)
    argv = ["defense/d3.py", "--result_file", RECORD, "--yaml_path", "./config/defense/d3/mnist.yaml", "--epochs", "4",
            "--ratio", "0.1", "--batch_size", "32", "--device", "cpu", "--precision", "fp32"]
    save = root / "record" / RECORD / "defense"

    def run(*command):
        return subprocess.run([sys.executable, *command], cwd=root, capture_output=True, text=True, timeout=300)
    assert run(*argv).returncode == 0
    whole = safe_torch_load(save / "d3" / "defense_result.pt")["model"]
    shutil.rmtree(save / "d3")
    killed = run("-c", SIGKILL_IN_EPOCH_3, *argv)
    assert killed.returncode == -9 and not (save / "d3").exists()
    assert safe_torch_load(save / ".d3.resume.pt")["done"] == 2
    resumed = run(*argv, "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    result = safe_torch_load(save / "d3" / "defense_result.pt")["model"]
    assert set(result) == set(whole) and all(torch.equal(result[k], whole[k]) for k in whole)
    rows = list(csv.reader(open(save / "d3" / "d3_df.csv")))
    assert [row[1] for row in rows[1:]] == ["0", "1", "2", "3"]  # the resumed run's table has every epoch
