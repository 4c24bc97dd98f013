"""`compare`: one table over many defenses, output files, failure isolation, cache, BackdoorBench scripts,
several seeds (mean ± std).

Plumbing only, on a small synthetic record (defense efficacy is tested in test_defenses.py).
"""
import argparse
import csv
import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from d3_plugin import compare as cmp
from d3_plugin import registry
from d3_plugin.attacks import BadNets, poison_test_set
from d3_plugin.record_io import records
from d3_plugin.data import ImageSet, dataset_spec
from d3_plugin.models import build_model


pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]  # see conftest.py


@pytest.fixture
def bench(record):
    return cmp.bench_from_record(record, ratio=0.25, seed=0, device="cpu")


def test_reserved_subset_is_backdoorbenchs_draw(record):
    bench = cmp.bench_from_record(record, ratio=0.05, seed=3, device="cpu")
    random.seed(3)
    expected = random.sample(range(400), int(400 * 0.05))
    assert bench.reserved.source_index.tolist() == expected


def test_writes_every_output_and_a_failure_stays_in_its_row(bench, tmp_path):
    out = tmp_path / "out"
    rows = cmp.compare(bench, ["ft", "fp", "nope", "nc", "fst", "nad"], epochs=1, out=out,
                       overrides={"fp": {"layer": "features"}}, echo=lambda line: None)
    by_name = {row["defense"]: row for row in rows}
    assert list(by_name) == ["no defense", "ft", "fp", "nope", "nc", "fst", "nad"]
    for name in ("no defense", "ft", "fst", "nad"):
        assert not by_name[name]["error"] and 0 <= by_name[name]["acc"] <= 1, by_name[name]
    assert by_name["no defense"]["der"] is None and 0 <= by_name["ft"]["der"] <= 1
    assert "not an nn.Linear" in by_name["fp"]["error"]
    assert "unknown defense 'nope'" in by_name["nope"]["error"]
    assert "--backdoorbench" in by_name["nc"]["error"]
    assert len({row["config_hash"] for row in rows}) == len(rows)

    markdown = (out / "compare.md").read_text()
    assert markdown.count("\n") == len(rows) + 2 and "unknown defense" in markdown
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["defense"] for r in table] == list(by_name) * 2  # the runs, then one aggregate row each
    assert [r["seed"] for r in table] == ["", *"000000", *["mean"] * 7] and table[1]["error"] == ""
    assert table[8]["n"] == "1" and table[8]["acc_std"] == "" and table[10]["n"] == "0"
    assert float(table[1]["acc"]) == pytest.approx(by_name["ft"]["acc"])
    assert len(json.loads((out / "compare.json").read_text())["rows"]) == len(rows)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "temporary files are replaced atomically"


def test_rerun_reuses_finished_rows_and_retries_failures(bench, tmp_path, monkeypatch):
    out = tmp_path / "out"
    kwargs = dict(epochs=1, out=out, overrides={"fp": {"layer": "features"}}, echo=lambda line: None)
    first = cmp.compare(bench, ["ft", "fst", "fp"], **kwargs)
    calls = []
    real = cmp.run_native
    monkeypatch.setattr(cmp, "run_native", lambda b, d: calls.append(d.name) or real(b, d))
    again = cmp.compare(bench, ["ft", "fst", "fp"], **kwargs)
    assert calls == ["fp"], "finished rows come from the cache; only the failed row is retried"
    assert [r["acc"] for r in again[:3]] == [r["acc"] for r in first[:3]]
    cmp.compare(bench, ["ft"], **{**kwargs, "epochs": 2})
    assert calls == ["fp", "ft"], "another configuration has another hash and runs"


def test_reads_backdoorbench_summary_csv(tmp_path):
    folder = tmp_path / "defense" / "nc"
    folder.mkdir(parents=True)
    (folder / "nc_df_summary.csv").write_text(
        ",train_epoch_loss_avg_over_batch,clean_test_loss_avg_over_batch,test_acc,test_asr,test_ra\n"
        "last,0.31,0.4,0.9012,0.0123,0.8765\nvalid_max,0.9,0.9,0.91,0.99,0.88\n"
        "exist_nan_value,False,False,False,False,False\n")
    assert cmp.read_bb_summary(folder, "nc") == {"acc": 0.9012, "asr": 0.0123, "ra": 0.8765}
    (folder / "nc_df_summary.csv").rename(folder / "other_df_summary.csv")
    assert cmp.read_bb_summary(folder, "nc")["acc"] == 0.9012  # falls back to the summary that is there
    (folder / "other_df_summary.csv").write_text(",test_acc\nvalid_max,0.5\n")
    with pytest.raises(ValueError, match="`last` row"):
        cmp.read_bb_summary(folder, "nc")
    with pytest.raises(FileNotFoundError, match="no nc_df_summary.csv"):
        cmp.read_bb_summary(tmp_path, "nc")


def test_backdoorbench_scripts_run_in_the_checkout_and_land_in_the_table(bench, record, tmp_path):
    checkout = record.checkout_root
    (checkout / "defense").mkdir()
    (checkout / "defense" / "nc.py").write_text("# stand-in")
    (checkout / "config" / "defense" / "nc").mkdir(parents=True)
    (checkout / "config" / "defense" / "nc" / "config.yaml").write_text("epochs: 1\n")
    seen = []

    def runner(command, cwd, **kwargs):
        seen.append((command, cwd))
        folder = Path(cwd) / "record" / command[command.index("--result_file") + 1] / "defense" / "nc"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nc_df_summary.csv").write_text(",test_acc,test_asr,test_ra\nlast,0.5,0.25,0.4\n")
        return subprocess.CompletedProcess(command, 0, "", "")

    rows = cmp.compare(bench, ["nc"], backdoorbench=str(checkout), runner=runner, echo=lambda line: None)
    command, cwd = seen[0]
    assert cwd == str(checkout)
    assert command[1:] == ["./defense/nc.py", "--result_file", "badnet_tiny", "--yaml_path",
                           "./config/defense/nc/config.yaml", "--dataset", "fashion_mnist", "--device", "cpu",
                           "--random_seed", "0", "--ratio", "0.25"]  # the same reserved draw as native rows
    assert (rows[1]["acc"], rows[1]["asr"], rows[1]["ra"]) == (0.5, 0.25, 0.4) and rows[1]["der"] is not None

    def failing(command, cwd, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nRuntimeError: CUDA missing\n")
    rows = cmp.compare(bench, ["bb:ft"], backdoorbench=str(checkout), runner=failing, echo=lambda line: None)
    assert "ft.py not found" in rows[1]["error"]
    (checkout / "defense" / "ft.py").write_text("# stand-in")
    rows = cmp.compare(bench, ["bb:ft"], backdoorbench=str(checkout), runner=failing, echo=lambda line: None,
                       overrides={"bb:ft": {"layers": ["fc", "linear"]}, "ft": {"lr": 9}})
    assert rows[1]["defense"] == "ft (BackdoorBench)" and "CUDA missing" in rows[1]["error"]
    command = cmp.bb_command(checkout, cmp.registry.get("ft"), record.folder, "fashion_mnist",
                             overrides={"layers": ["fc", "linear"]})
    assert command[-2:] == ["--layers", "fc,linear"]


def test_command_line(record, tmp_path, monkeypatch, capsys):
    from d3_plugin.commands import compare as command
    monkeypatch.setattr(records, "load_attack_result", lambda path, data_root=None: record)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--result_file", str(record.folder), "--defenses", "ft,d3", "--epochs", "1",
                              "--ratio", "0.25", "--device", "cpu", "--out", str(out), "--set", "d3.lam=2"])
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert "no defense" in printed and "d3" in printed and "ACC %" in printed
    assert {p.name for p in out.iterdir()} >= {"compare.md", "compare.csv", "compare.json", "compare.png",
                                               "compare_cache.json"}
    with pytest.raises(ValueError, match="DEFENSE.PARAM=VALUE"):
        cmp.parse_overrides(["lam=2"])
    with pytest.raises(ValueError, match="--result_file is required"):
        command.run(parser.parse_args(["--defenses", "d3"]))


# --- several seeds ------------------------------------------------------------------------------------

def test_parse_seeds_and_its_one_line_errors():
    assert cmp.parse_seeds("0,1,2") == [0, 1, 2]
    assert cmp.parse_seeds(" 5, 3 ") == [5, 3]
    assert cmp.parse_seeds(None, 7) == [7] and cmp.parse_seeds() == [0]
    for seeds, seed, message in [("0,1", 1, "together"), ("", None, "empty"), (" ", None, "empty"),
                                 ("0,a", None, "'a' is not an integer"), ("0,,1", None, "'' is not an integer"),
                                 ("1.5", None, "not an integer"), ("0,1,0", None, "repeats 0"),
                                 ("-1", None, "outside"), (None, 2 ** 32, "outside")]:
        with pytest.raises(ValueError, match=message) as error:
            cmp.parse_seeds(seeds, seed)
        assert "\n" not in str(error.value)


def run_row(defense, seed, acc, asr, der, seconds, error=""):
    ra = None if asr is None else 1 - asr
    return {"defense": defense, "seed": seed, "acc": acc, "asr": asr, "ra": ra, "der": der, "seconds": seconds,
            "config_hash": f"{defense}{seed}", "reserved": f"r{seed}", "error": error}


def test_aggregate_mean_sample_std_min_max_and_failed_seeds():
    failed = run_row("nad", 2, None, None, None, None, "RuntimeError: boom")
    rows = [{**run_row("no defense", None, 0.9, 0.98, None, 0.0), "config_hash": "nd"},
            run_row("ft", 0, 0.50, 0.25, 0.60, 10.0), run_row("nad", 0, 0.8, 0.1, 0.9, 2.0),
            run_row("ft", 1, 0.70, 0.75, 0.70, 20.0), run_row("nad", 1, 0.6, 0.3, 0.7, 4.0),
            run_row("ft", 2, 0.90, 0.50, 0.80, 30.0), failed]
    none, ft, nad = cmp.aggregate(rows)
    assert [none["defense"], ft["defense"], nad["defense"]] == ["no defense", "ft", "nad"]
    assert all(row["seed"] == "mean" for row in (none, ft, nad))
    assert (none["n"], none["runs"], none["acc"], none["acc_std"], none["der"]) == (1, 1, 0.9, None, None)
    assert none["config_hash"] == "nd" and none["error"] == ""
    assert (ft["n"], ft["runs"], ft["error"]) == (3, 3, "")
    assert ft["acc"] == pytest.approx(0.7) and ft["acc_std"] == pytest.approx(0.2)  # ddof=1
    assert (ft["acc_min"], ft["acc_max"]) == (0.5, 0.9)
    assert ft["asr"] == pytest.approx(0.5) and ft["asr_std"] == pytest.approx(0.25)
    assert ft["ra"] == pytest.approx(0.5) and ft["der"] == pytest.approx(0.7) and ft["der_std"] == pytest.approx(0.1)
    assert (ft["seconds"], ft["seconds_std"], ft["seconds_min"], ft["seconds_max"]) == (20.0, 10.0, 10.0, 30.0)
    assert (nad["n"], nad["runs"]) == (2, 3), "a failed seed is left out of the statistics"
    assert nad["acc"] == pytest.approx(0.7) and nad["acc_std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert (nad["seconds"], nad["seconds_min"], nad["seconds_max"]) == (3.0, 2.0, 4.0)
    assert nad["error"] == "seed 2: RuntimeError: boom"
    assert len({none["config_hash"], ft["config_hash"], nad["config_hash"]}) == 3

    markdown = cmp.markdown_table(rows)
    assert "| ft | 70.00 ± 20.00 (50.00–90.00) | 50.00 ± 25.00 (25.00–75.00) |" in markdown
    assert "| 20.0 ± 10.0 (10.0–30.0) | 3 |" in markdown and "| 2 of 3 |" in markdown
    assert "| no defense | 90.00 | 98.00 | 2.00 |  | 0.0 | 1 | nd |" in markdown
    assert markdown.startswith("Seeds 0, 1, 2.")
    assert cmp.bar_chart(rows)[:8] == b"\x89PNG\r\n\x1a\n"  # with error bars


def test_two_seeds_end_to_end_then_one_more_seed_from_the_cache(record, tmp_path, monkeypatch, capsys):
    from d3_plugin import cli
    monkeypatch.setattr(records, "load_attack_result", lambda path, data_root=None: record)
    out = tmp_path / "seeds"
    argv = ["compare", "--result_file", str(record.folder), "--defenses", "ft", "--epochs", "1", "--ratio", "0.25",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(argv + ["--seeds", "0,1"]) == 0
    assert "seeds 0,1" in capsys.readouterr().out
    saved = json.loads((out / "compare.json").read_text())
    runs = saved["rows"]
    assert [(r["defense"], r["seed"]) for r in runs] == [("no defense", None), ("ft", 0), ("ft", 1)]
    assert runs[1]["reserved"] != runs[2]["reserved"], "each seed draws its own reserved set"
    assert runs[1]["config_hash"] != runs[2]["config_hash"]
    for seed, row in zip((0, 1), runs[1:]):
        bench = cmp.bench_from_record(record, ratio=0.25, seed=seed, device="cpu")
        assert row["reserved"] == bench.reserved_digest()  # BackdoorBench's draw for that seed
    none, ft = saved["aggregate"]
    assert (none["n"], ft["n"], ft["seed"]) == (1, 2, "mean")
    for key in ("acc", "asr", "ra", "der", "seconds"):
        a, b = runs[1][key], runs[2][key]
        assert ft[key] == pytest.approx((a + b) / 2, rel=1e-12, abs=1e-15)
        assert ft[f"{key}_std"] == pytest.approx(abs(a - b) / 2 ** 0.5, rel=1e-9, abs=1e-15)
        assert (ft[f"{key}_min"], ft[f"{key}_max"]) == (min(a, b), max(a, b))
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["defense"], r["seed"]) for r in table] == [("no defense", ""), ("ft", "0"), ("ft", "1"),
                                                          ("no defense", "mean"), ("ft", "mean")]
    assert float(table[4]["acc"]) == pytest.approx(ft["acc"]) and table[4]["n"] == "2"
    assert " ± " in (out / "compare.md").read_text()

    calls = []
    real = cmp.run_native

    def fail_seed_2(bench, defense):
        calls.append(bench.seed)
        if bench.seed == 2:
            raise RuntimeError("diverged")
        return real(bench, defense)
    monkeypatch.setattr(cmp, "run_native", fail_seed_2)
    monkeypatch.setattr(cmp.Bench, "evaluate", lambda *a: pytest.fail("the no-defense row comes from the cache"))
    assert cli.main(argv + ["--seeds", "0,1,2"]) == 1
    assert calls == [2], "seeds 0 and 1 come from the cache"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"][1:3] == runs[1:]
    ft = saved["aggregate"][1]
    assert (ft["n"], ft["runs"]) == (2, 3) and ft["error"] == "seed 2: RuntimeError: diverged"
    assert ft["acc"] == pytest.approx((runs[1]["acc"] + runs[2]["acc"]) / 2)
    assert "2 of 3" in (out / "compare.md").read_text()

    capsys.readouterr()
    assert cli.main(argv + ["--seeds", "0,1", "--seed", "1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_backdoorbench_scripts_run_once_per_seed(record, tmp_path):
    checkout = record.checkout_root
    (checkout / "defense").mkdir()
    (checkout / "defense" / "nc.py").write_text("# stand-in")
    seeds = []

    def runner(command, cwd, **kwargs):
        seed = int(command[command.index("--random_seed") + 1])
        seeds.append(seed)
        folder = Path(cwd) / "record" / command[command.index("--result_file") + 1] / "defense" / "nc"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nc_df_summary.csv").write_text(f",test_acc,test_asr,test_ra\nlast,0.{5 + seed},0.25,0.4\n")
        return subprocess.CompletedProcess(command, 0, "", "")

    benches = [cmp.bench_from_record(record, ratio=0.25, seed=s, device="cpu") for s in (3, 4)]
    rows = cmp.compare(benches, ["nc"], backdoorbench=str(checkout), runner=runner, echo=lambda line: None,
                       out=tmp_path / "bb")
    assert seeds == [3, 4]
    assert [(r["seed"], r["acc"]) for r in rows[1:]] == [(3, 0.8), (4, 0.9)]
    assert cmp.aggregate(rows)[1]["acc"] == pytest.approx(0.85)
    cmp.compare(benches, ["nc"], backdoorbench=str(checkout), runner=runner, echo=lambda line: None,
                out=tmp_path / "bb")
    assert seeds == [3, 4], "both seeds come from the cache"
    with pytest.raises(ValueError, match="distinct seed"):
        cmp.compare([benches[0], benches[0]], ["nc"], echo=lambda line: None)


def test_aggregate_names_the_failed_seeds_once_per_message():
    rows = [run_row("x", s, None, None, None, None, "ValueError: unknown") for s in (0, 1)]
    rows.append(run_row("x", 2, None, None, None, None, "RuntimeError: other"))
    (x,) = cmp.aggregate(rows)
    assert (x["n"], x["runs"], x["acc"], x["acc_std"]) == (0, 3, None, None)
    assert x["error"] == "seeds 0, 1: ValueError: unknown; seed 2: RuntimeError: other"
    assert cmp.aggregate(rows[:1])[0]["error"] == "ValueError: unknown"


def test_compare_runs_d3_in_the_precision_of_the_other_defenses_unless_told():
    from types import SimpleNamespace

    from d3_plugin.compare import build_for
    from d3_plugin.data import dataset_spec
    bench = SimpleNamespace(spec=dataset_spec("cifar10"), model_name="preactresnet18", seed=3)
    config = build_for("d3", bench, epochs=2).config
    assert (config.precision, config.seed, config.epochs, list(config.layers)) == ("fp32", 3, 2,
                                                                                   ["layer3", "layer4", "linear"])
    assert build_for("d3", bench, overrides={"precision": "auto"}).config.precision == "auto"


def test_auxiliary_reserved_data_and_gic_enter_the_identity_and_the_command_line(record, tmp_path, monkeypatch,
                                                                                  capsys):
    from d3_plugin.bench import with_auxiliary
    from d3_plugin.commands import compare as command

    bench = cmp.bench_from_record(record, ratio=0.25, seed=0, device="cpu")
    assert with_auxiliary(bench, "id") is bench
    noisy = with_auxiliary(bench, "corrupt:noise:2").ready()
    assert noisy.identity["reserved_source"] == "corrupt:noise:2" and "calibration" not in noisy.identity
    assert torch.equal(noisy.reserved.labels, bench.reserved.labels)
    assert not torch.equal(noisy.reserved.images, bench.reserved.images)
    reports = []
    calibrated = with_auxiliary(bench, "corrupt:noise:2", registry.build_calibration("gic", epochs=1), reports.append)
    assert calibrated.identity["calibration"] and calibrated.reserved is bench.reserved and not reports, "deferred"
    digest = calibrated.reserved_digest()
    assert calibrated.ready().calibration_report["labels"] == "given" and reports == [calibrated.calibration_report]
    assert calibrated.reserved_digest() == digest != noisy.reserved_digest() != bench.reserved_digest()

    monkeypatch.setattr(records, "load_attack_result", lambda path, data_root=None: record)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    common = ["--result_file", str(record.folder), "--defenses", "ft", "--epochs", "1", "--ratio", "0.25",
              "--device", "cpu"]
    rows = {}
    for extra in ([], ["--reserved-source", "digits", "--calibrate", "gic", "--set", "gic.epochs=1"]):
        out = tmp_path / f"cli{len(extra)}"
        assert command.run(parser.parse_args(common + extra + ["--out", str(out)])) == 0
        rows[len(extra)] = json.loads((out / "compare.json").read_text())["rows"]
    printed = capsys.readouterr().out
    assert "gic (seed 0) on digits: BN-statistics distance" in printed and "labels victim" in printed
    assert rows[0][0]["config_hash"] == rows[6][0]["config_hash"], "the no-defense row does not depend on them"
    assert rows[0][1]["config_hash"] != rows[6][1]["config_hash"]

    def must_not_calibrate(*args, **kwargs):
        raise AssertionError("every row is cached: nothing to calibrate")
    monkeypatch.setattr(registry.Calibration, "__call__", must_not_calibrate)
    again = common + ["--reserved-source", "digits", "--calibrate", "gic", "--set", "gic.epochs=1",
                      "--out", str(tmp_path / "cli6")]
    assert command.run(parser.parse_args(again)) == 0
    bb_row = cmp.compare(with_auxiliary(bench, "digits"), ["bb:ft"], backdoorbench=str(tmp_path), echo=print)[1]
    assert "drop --reserved-source/--calibrate" in bb_row["error"]
    with pytest.raises(ValueError, match="bad auxiliary source 'nope'"):
        command.run(parser.parse_args(common + ["--reserved-source", "nope"]))
    with pytest.raises(ValueError, match="unknown calibration 'gac'"):
        command.run(parser.parse_args(common + ["--calibrate", "gac"]))
    with pytest.raises(ValueError, match="--set: gic: norm must be one of"):
        command.run(parser.parse_args(common + ["--calibrate", "gic", "--set", "gic.norm=l1"]))
