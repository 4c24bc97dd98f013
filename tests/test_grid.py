"""The grid runner: plans, one-line errors, all-or-nothing cells, skip and retry, resume after a kill, and
the same tiny grid on a two-process pool and on a local Ray instance."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from d3_plugin import grid as grids
from d3_plugin.cli import main
from d3_plugin.grid import AttackJob, GridError, LocalPool, load_grid, plan, run_attack_job, run_grid

from conftest import write_fashion_mnist_subset

pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small data root and one BadNets record trained by the grid's own attack job (4 epochs, 600 images)."""
    root = tmp_path_factory.mktemp("grid")
    data = write_fashion_mnist_subset(root / "data", 600, 200)
    job = AttackJob("badnets", str(root / "record" / "badnets"),
                    {"attack": "badnets", "epochs": 4, "data_root": str(data), "seed": 0})
    result = run_attack_job(job, "cpu", threads=1)
    assert result["error"] == "" and (root / "record" / "badnets" / "attack_info.json").is_file()
    assert run_attack_job(job, "cpu")["skipped"], "a complete record is not trained again"
    return root, data


def tiny_raw(made, **extra) -> dict:
    root, data = made
    return {"seeds": [0, 1], "epochs": 1, "ratio": 0.1, "device": "cpu", "data_root": str(data),
            "attacks": [{"record": str(root / "record" / "badnets")}],
            "defenses": ["ft", {"name": "d3", "set": {"batch_size": 32}}], **extra}


def tiny(made, out: Path, **extra) -> grids.Grid:
    return plan(tiny_raw(made, **extra), out)


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def cell_folders(out: Path):
    return sorted(p.relative_to(out).as_posix() for p in (out / "cells").glob("*/*/*") if p.is_dir())


def test_plan_expands_sweeps_into_records_labels_and_stable_keys(tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "attack_result.pt").write_bytes(b"")
    raw = {"seeds": [0, 1, 2], "attacks": [{"record": "rec"}, {"attack": "blended", "epochs": 2},
                                           {"attack": "sam-flatten", "from": "blended", "rho": [1, 2]}],
           "defenses": ["ft", "d3"], "sweep": {"d3.lam": [1, 10], "blended.alpha": [0.1, 0.2]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    grid = load_grid(tmp_path / "g.yaml")
    assert grid.out == tmp_path / "g"
    assert [j.name for j in grid.attacks] == [
        "rec", "blended-alpha0.1", "blended-alpha0.2", "sam-flatten-blended-alpha0.1-rho1",
        "sam-flatten-blended-alpha0.1-rho2", "sam-flatten-blended-alpha0.2-rho1", "sam-flatten-blended-alpha0.2-rho2"]
    assert [j.options.get("params.alpha") for j in grid.attacks[1:3]] == [0.1, 0.2]
    flatten = grid.attacks[5]
    assert flatten.source == grid.attacks[2].folder and flatten.options["rho"] == 1
    assert grids.attack_argv(flatten)[:7] == ["attack", "sam-flatten", "--out", flatten.folder, "--resume",
                                              "--result_file", grid.attacks[2].folder]
    assert {c.label for c in grid.cells} == {"ft", "d3[lam=1]", "d3[lam=10]"}
    assert len(grid.cells) == 7 * 3 * 3 and len({c.key for c in grid.cells}) == len(grid.cells)
    assert [c.key for c in load_grid(tmp_path / "g.yaml").cells] == [c.key for c in grid.cells]
    ratios = plan({**raw, "attacks": [{"record": "rec"}], "ratio": [0.01, 0.1]}, tmp_path / "r", base=tmp_path)
    assert sorted({(c.label, c.settings["ratio"]) for c in ratios.cells}) == [
        ("d3[lam=1,ratio=0.01]", 0.01), ("d3[lam=1,ratio=0.1]", 0.1), ("d3[lam=10,ratio=0.01]", 0.01),
        ("d3[lam=10,ratio=0.1]", 0.1), ("ft[ratio=0.01]", 0.01), ("ft[ratio=0.1]", 0.1)]
    listed = plan({**raw, "attacks": [{"record": "rec"}], "sweep": {},
                   "defenses": [{"name": "d3", "label": "d3-paper", "set": {"lam": 10, "layers": ["fc", "linear"]}}]},
                  tmp_path / "s", base=tmp_path)
    assert {(c.label, tuple(c.overrides["layers"])) for c in listed.cells} == {("d3-paper", ("fc", "linear"))}


@pytest.mark.parametrize("raw, message", [
    ({"attacks": [], "defenses": ["ft"]}, "attacks must be a non-empty list"),
    ({"attacks": [{"attack": "nope"}], "defenses": ["ft"]}, "unknown attack 'nope'"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["nope"]}, "unknown defense 'nope'"),
    ({"attacks": [{"attack": "badnets"}], "defenses": [{"name": "d3", "set": {"lamda": 1}}]}, "lamda"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["ft"], "seeds": [0, 0]}, "seeds repeat"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["ft"], "seeds": ["a"]}, "seeds must be a list of integers"),
    ({"attacks": [{"attack": "sam-flatten", "rho": 1}], "defenses": ["ft"]}, "`from: RECORD` goes with sam-flatten"),
    ({"attacks": [{"attack": "badnets", "colour": 1}], "defenses": ["ft"]}, "unknown key(s) colour"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["ft"], "sweep": {"lam": [1]}}, "use NAME.PARAM"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["ft", "ft"]}, "share a label"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["ft"], "ratio": 2}, "ratio must be a fraction"),
    ({"attacks": [{"record": "missing"}], "defenses": ["ft"]}, "has no attack_result.pt"),
    ({"attacks": [{"attack": "badnets"}], "defenses": ["ft"], "reserved_source": "fog"}, "bad auxiliary source"),
])
def test_bad_grid_files_are_one_line_errors_with_status_2(tmp_path, capsys, raw, message):
    config = tmp_path / "g.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["grid", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error
    assert not (tmp_path / "g").exists()


def test_grid_names_a_grid_only_in_a_file_of_several(tmp_path, capsys):
    config = tmp_path / "g.yaml"
    config.write_text(yaml.safe_dump({"attacks": [{"attack": "badnets"}], "defenses": ["ft"]}))
    assert main(["grid", str(config), "--grid", "table1", "--dry-run"]) == 2
    assert "holds one grid without a name; drop --grid" in capsys.readouterr().err


def test_a_tiny_grid_runs_then_skips_finished_cells_and_retries_failed_ones(made, tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows = run_grid(tiny(made, out), LocalPool(1), progress=False)
    assert [(r["defense"], r["seed"]) for r in rows] == [("no defense", None), ("ft", 0), ("ft", 1), ("d3", 0),
                                                         ("d3", 1)]
    assert not any(r["error"] for r in rows) and all(0 <= r["der"] <= 1 for r in rows[1:])
    assert {p.name for p in out.iterdir()} == {"cells", "grid.md", "grid.csv", "grid.json", "grid.png"}
    assert len(cell_folders(out)) == 5 and not list(out.rglob(".*partial*"))
    assert (out / "cells" / "badnets" / "no-defense").is_dir(), "no spaces in cell paths"
    table = json.loads((out / "grid.json").read_text())["aggregate"]
    assert [(r["record"], r["defense"], r["n"]) for r in table] == [("badnets", "no defense", 1), ("badnets", "ft", 2),
                                                                   ("badnets", "d3", 2)]

    def must_not_run(cell):
        raise AssertionError(f"{cell.label} seed {cell.seed} ran again")
    monkeypatch.setattr(grids, "_measure", must_not_run)
    assert run_grid(tiny(made, out), LocalPool(1), progress=False) == rows  # read back: seconds included

    ft_seed1 = next(f for f in cell_folders(out) if "/ft/seed1-" in f)
    shutil.rmtree(out / ft_seed1)

    def broken(cell):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(grids, "_measure", broken)
    failed = run_grid(tiny(made, out), LocalPool(1), progress=False)
    assert [r["error"] for r in failed if r["error"]] == ["RuntimeError: disk on fire"]
    assert ft_seed1 not in cell_folders(out), "a failed cell leaves no folder"
    assert "disk on fire" in (out / "grid.md").read_text()
    monkeypatch.undo()
    assert without_seconds(run_grid(tiny(made, out), LocalPool(1), progress=False)) == without_seconds(rows)


def test_eval_every_reaches_the_attack_but_does_not_make_another_record(tmp_path):
    def planned(**extra):
        raw = {"seeds": [0], "defenses": ["ft"], "attacks": [{"attack": "badnets", "epochs": 3, **extra}]}
        return plan(raw, tmp_path / "out")
    plain, measured_less = planned().attacks[0], planned(eval_every=5).attacks[0]
    assert plain.identity == measured_less.identity and plain.folder == measured_less.folder
    assert grids.attack_argv(measured_less)[-2:] == ["--eval-every", "5"]


def test_a_record_made_with_other_options_is_moved_aside_made_again_and_gets_new_cells(made, tmp_path):
    _, data = made

    def planned(epochs):
        raw = {"seeds": [0], "device": "cpu", "data_root": str(data), "defenses": ["ft"],
               "attacks": [{"attack": "badnets", "epochs": epochs, "train_size": 300, "seed": 0}]}
        return plan(raw, tmp_path / "out")
    one, two = planned(1), planned(2)
    job, changed = one.attacks[0], two.attacks[0]
    assert job.folder == changed.folder and job.identity != changed.identity
    assert {c.key for c in one.cells}.isdisjoint(c.key for c in two.cells), "cells of a retrained record are new"
    assert not grids.record_is_current(job)
    assert run_attack_job(job, "cpu", threads=1)["note"] == "" and grids.record_is_current(job)
    assert run_attack_job(job, "cpu")["skipped"]
    result = run_attack_job(changed, "cpu", threads=1)
    assert result["error"] == "" and "moved to" in result["note"]
    aside = next(p for p in (tmp_path / "out" / "record").iterdir() if ".replaced-" in p.name)
    read = lambda folder: json.loads((folder / "attack_info.json").read_text())["train"]["epochs"]  # noqa: E731
    assert read(aside) == 1 and read(Path(changed.folder)) == 2
    assert grids.record_is_current(changed) and not grids.record_is_current(job)
    (Path(changed.folder) / grids.RECORD_STAMP).unlink()
    assert not grids.record_is_current(changed), "a record without its stamp is made again"


def test_a_killed_grid_resumes_without_redoing_finished_cells(made, tmp_path, monkeypatch):
    out, measured = tmp_path / "out", []
    real = grids._measure

    def killed_on_the_third(cell):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(cell.label)
        return real(cell)
    monkeypatch.setattr(grids, "_measure", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_grid(tiny(made, out), LocalPool(1), progress=False)
    assert len(cell_folders(out)) == 2 and not (out / "grid.md").exists()
    finished, pending = grids.finished_rows(tiny(made, out))
    assert [(r["defense"], r["seed"]) for r in finished] == [("no defense", None), ("ft", 0)] and pending == 3
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_raw(made, out=str(out))))
    assert main(["grid", str(tmp_path / "tiny.yaml"), "--table-only"]) == 0
    assert "| badnets | ft | " in (out / "grid.md").read_text() and len(cell_folders(out)) == 2, "ran nothing"
    measured.clear()
    monkeypatch.setattr(grids, "_measure", lambda cell: measured.append(cell.label) or real(cell))
    rows = run_grid(tiny(made, out), LocalPool(1), progress=False)
    assert len(measured) == 3 and len(cell_folders(out)) == 5 and not any(r["error"] for r in rows)


def test_two_local_workers_give_the_same_table_as_one(made, tmp_path):
    one = run_grid(tiny(made, tmp_path / "one", seeds=[0]), LocalPool(1), progress=False)
    two = run_grid(tiny(made, tmp_path / "two", seeds=[0]), LocalPool(2), progress=False)
    assert without_seconds(one) == without_seconds(two)


def test_the_ray_executor_runs_the_same_tiny_grid(made, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'd3-plugin[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_grid(tiny(made, tmp_path / "ray", seeds=[0]), grids.RayPool(cpus=1), progress=False)
    finally:
        ray.shutdown()
    local = run_grid(tiny(made, tmp_path / "local", seeds=[0]), LocalPool(1), progress=False)
    assert [(r["defense"], r["acc"], r["asr"], r["config_hash"]) for r in rows] == [
        (r["defense"], r["acc"], r["asr"], r["config_hash"]) for r in local]
    assert len(cell_folders(tmp_path / "ray")) == 3


def test_several_grids_in_one_file_share_their_records(tmp_path):
    raw = {"seeds": [0, 1], "epochs": 3,
           "grids": {"table1": {"attacks": [{"attack": "badnets", "epochs": 2}], "defenses": ["ft", "d3"]},
                     "table5": {"attacks": [{"attack": "badnets", "epochs": 2},
                                            {"attack": "sam-flatten", "from": "badnets", "rho": [1, 2]}],
                                "defenses": ["ft"], "seeds": [0]}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    table1, table5 = grids.load_grids(tmp_path / "r.yaml")
    assert (table1.out, table5.out) == (tmp_path / "r" / "table1", tmp_path / "r" / "table5")
    assert table1.attacks[0].folder == table5.attacks[0].folder == str(tmp_path / "r" / "record" / "badnets")
    assert (len(table1.cells), len(table5.cells)) == (4, 3) and table1.cells[0].settings["epochs"] == 3
    with pytest.raises(GridError, match="holds 2 grids"):
        load_grid(tmp_path / "r.yaml")
    assert [g.out.name for g in grids.load_grids(tmp_path / "r.yaml", only=["table5"])] == ["table5"]
    with pytest.raises(GridError, match="no grid named table9 in .*; it holds: table1, table5"):
        grids.load_grids(tmp_path / "r.yaml", only=["table9"])
    raw["grids"]["table5"]["attacks"][0]["epochs"] = 5
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError, match="record badnets is described differently in two grids"):
        grids.load_grids(tmp_path / "r.yaml")


def test_local_workers_end_when_their_driver_is_killed(tmp_path):
    (tmp_path / "holder.py").write_text(textwrap.dedent("""
        import os, sys, time
        from pathlib import Path

        def hold(name, threads=None):
            Path(sys.argv[1], name).write_text(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            from d3_plugin.grid import LocalPool
            list(LocalPool(2).map(hold, [("a",), ("b",)]))
    """))
    driver = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(tmp_path)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / n).is_file() and (tmp_path / n).read_text() for n in "ab"):
            assert time.monotonic() < deadline and driver.poll() is None, "the workers never started"
            time.sleep(0.2)
        workers = [int((tmp_path / n).read_text()) for n in "ab"]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "a worker ran on after its driver was killed"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited child of init may linger as a zombie for a moment
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:  # no /proc here, or it just went: the next look decides
        return True


def test_the_shipped_reproduction_grid_file_plans(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "reproduction.yaml"
    planned = grids.load_grids(path, out=str(tmp_path))
    assert [g.out.name for g in planned] == ["table1", "table1_preact", "table5", "table6_7", "table3", "budget",
                                             "budget_sau", "budget_preact"]
    assert sum(len(g.cells) for g in planned) == 486
    assert len({job.folder for g in planned for job in g.attacks}) == 14


def test_a_test_half_measures_even_or_odd_test_images_and_keys_its_own_cells(made, tmp_path):
    import torch
    from d3_plugin.record_io.records import load_attack_result
    from d3_plugin.bench import bench_from_record, on_test_half
    root, data = made
    bench = bench_from_record(load_attack_result(root / "record" / "badnets", str(data)), ratio=0.1, device="cpu")
    halves = {half: on_test_half(bench, half) for half in ("dev", "test")}
    for start, half in enumerate(("dev", "test")):
        for name in ("clean_test", "bd_test"):
            assert torch.equal(getattr(halves[half], name).source_index, getattr(bench, name).source_index[start::2])
    whole = tiny(made, tmp_path / "whole", seeds=[0])
    dev, test = (tiny(made, tmp_path / half, seeds=[0], test_half=half) for half in ("dev", "test"))
    assert all("test_half" not in cell.settings for cell in whole.cells), "grids without it keep their cell keys"
    assert {cell.key for cell in dev.cells}.isdisjoint({cell.key for cell in test.cells} | {c.key for c in whole.cells})
    no_defense = run_grid(dev, LocalPool(1), progress=False)[0]
    assert no_defense["acc"] == pytest.approx(halves["dev"].evaluate(halves["dev"].model)["acc"])
    with pytest.raises(GridError, match="test_half must be dev"):
        tiny(made, tmp_path / "bad", test_half="held-out")


def test_the_shipped_efficacy_grid_file_plans(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "d3_efficacy.yaml"
    planned = {grid.out.name: grid for grid in grids.load_grids(path, out=str(tmp_path))}
    assert set(planned) == {"dev", "preact", "table1_test"}
    for name, half in (("dev", "dev"), ("preact", "dev"), ("table1_test", "test")):  # choose on dev, report on test
        assert planned[name].cells and all(cell.settings["test_half"] == half for cell in planned[name].cells)


def test_a_grid_attack_job_is_made_from_a_typed_spec_not_a_command_line():
    job = AttackJob("b", "/g/record/b", {"attack": "badnets", "epochs": 2, "lr": "1e-3", "params.size": 4})
    spec = grids.attack_spec(job, "cpu")
    assert (spec.attack, spec.out, spec.epochs, spec.lr, dict(spec.params)) == ("badnets", "/g/record/b", 2, 0.001,
                                                                               {"size": 4})
    assert (spec.device, spec.resume, spec.result_file) == ("cpu", True, None)
    for options, message in (({"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
                             ({"lr": "fast"}, "--lr must be a number, got 'fast'"),
                             ({"seed": True}, "--seed must be an integer, got True")):
        with pytest.raises(ValueError, match=message):
            grids.attack_spec(AttackJob("b", "/g/record/b", {"attack": "badnets", **options}), "cpu")
