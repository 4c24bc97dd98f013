"""`d3_plugin.analysis` and `d3-plugin analyze`: interpolation (Fig. 2), weight changes (Fig. 4b), t-SNE of
penultimate features (Fig. 4a), cost relative to FT (Fig. 3).

The numerics on tiny models with known answers; the command line end to end on a small synthetic record
(tests/test_compare.py's pattern) with tiny settings: plumbing, not the paper's numbers.
"""
import argparse
import copy
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from d3_plugin import analysis, cli
from d3_plugin.attacks import BadNets, poison_test_set
from d3_plugin.record_io import records
from d3_plugin.bench import bench_from_record
from d3_plugin.data import ImageSet, Loader, dataset_spec
from d3_plugin.models import build_model

from conftest import TEST_SEED

pytestmark = [pytest.mark.trained, pytest.mark.usefixtures("suite_threads")]  # see conftest.py
PNG = b"\x89PNG\r\n\x1a\n"


def two_states(seed: int = TEST_SEED):
    """A small CNN's state and a shifted copy whose BN running statistics (and step count) also differ."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, 1, 28)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    end = {}
    for key, value in init.items():
        if key.endswith("running_var"):
            end[key] = value + 0.5  # stays positive at t = 2
        elif torch.is_floating_point(value):
            end[key] = value + torch.randn_like(value)
        else:
            end[key] = value + 7
    return model, init, end


# --- interpolation ------------------------------------------------------------------------------------

def test_interpolate_state_hits_both_ends_and_extrapolates_buffers_included():
    _, init, end = two_states()
    assert any(k.endswith("running_mean") for k in init) and any(k.endswith("num_batches_tracked") for k in init)
    at0, at1, at2 = (analysis.interpolate_state(init, end, t) for t in (0.0, 1.0, 2.0))
    half = analysis.interpolate_state(init, end, 0.5)
    for key in init:
        assert torch.equal(at0[key], init[key]), key
        if torch.is_floating_point(init[key]):
            assert torch.equal(at1[key], end[key]), key
            assert torch.allclose(at2[key], 2 * end[key] - init[key], atol=1e-6), key
            assert torch.allclose(half[key], (init[key] + end[key]) / 2, atol=1e-6), key
        else:  # num_batches_tracked keeps θ_init's at every t
            assert torch.equal(at1[key], init[key]) and torch.equal(at2[key], init[key]), key
    var = next(k for k in init if k.endswith("running_var"))
    assert not torch.equal(at1[var], init[var]), "BN running variance moves with t"
    shrunk = {**end, var: init[var] * 0.1}
    assert analysis.interpolate_state(init, shrunk, 2.0)[var].min() >= 0, "an extrapolated variance is clamped at 0"


def test_interpolate_state_refuses_another_architecture():
    _, init, end = two_states()
    with pytest.raises(ValueError, match="different parameters"):
        analysis.interpolate_state(init, {k: v for k, v in end.items() if k != "linear.bias"}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        analysis.interpolate_state(init, {**end, "linear.bias": torch.zeros(3)}, 0.5)


def test_interpolation_curve_reproduces_the_models_own_metrics_at_t0_and_leaves_it_unchanged(record):
    bench = bench_from_record(record, ratio=0.25, seed=0, device="cpu")
    model = bench.model
    _, _, end = two_states(seed=1)
    init = copy.deepcopy(model.state_dict())
    own = bench.evaluate(model)
    curve = analysis.interpolation_curve(model, init, end, [0.0, 1.0], bench.evaluate)
    assert [p["t"] for p in curve] == [0.0, 1.0]
    assert curve[0]["acc"] == own["acc"] and curve[0]["asr"] == own["asr"]
    assert curve[0]["clean_loss"] == pytest.approx(own["clean_loss"], rel=1e-6)
    moved = copy.deepcopy(model)
    moved.load_state_dict(end)
    assert curve[1]["clean_loss"] == pytest.approx(bench.evaluate(moved)["clean_loss"], rel=1e-6)
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items()), "the model itself is untouched"


def test_interpolation_grid():
    assert analysis.interpolation_grid(21, 2.0)[:3] == [0.0, 0.1, 0.2]
    assert analysis.interpolation_grid(21, 2.0)[10] == 1.0 and analysis.interpolation_grid(3, 2.0) == [0.0, 1.0, 2.0]
    for points, t_max in [(1, 2.0), (0, 2.0), (3, 0.0), (3, float("nan"))]:
        with pytest.raises(ValueError):
            analysis.interpolation_grid(points, t_max)


# --- weight differences ---------------------------------------------------------------------------------

def test_weight_differences_zero_for_identical_states_and_a_known_shift():
    model, init, _ = two_states()
    names = analysis.selected_weight_names(model, ["features.4", "fc", "linear"])
    assert names == ["features.4.0.weight", "fc.weight", "linear.weight"]
    assert analysis.selected_weight_names(model, None) == ["fc.weight", "linear.weight"]  # every nn.Linear
    size = sum(init[n].numel() for n in names)
    same = analysis.weight_differences(init, copy.deepcopy(init), names)
    assert same.shape == (size,) and not same.any()
    shifted = {**init, "fc.weight": init["fc.weight"] + 0.25, "linear.weight": init["linear.weight"] - 1.0}
    delta = analysis.weight_differences(init, shifted, ["fc.weight", "linear.weight"])
    n_fc = init["fc.weight"].numel()
    np.testing.assert_allclose(delta[:n_fc], 0.25, atol=1e-6)
    np.testing.assert_allclose(delta[n_fc:], -1.0, atol=1e-6)
    summary = analysis.weight_summary(init, shifted, ["fc.weight"])
    assert summary["n"] == n_fc and summary["mean_abs"] == pytest.approx(0.25, rel=1e-5)
    assert summary["frobenius"] == pytest.approx(0.25 * n_fc ** 0.5, rel=1e-5)
    assert analysis.weight_summary(init, init, names)["cosine"] == pytest.approx(1.0)
    flipped = {**init, "fc.weight": -init["fc.weight"]}
    assert analysis.weight_summary(init, flipped, ["fc.weight"])["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no module named nope"):
        analysis.selected_weight_names(model, ["nope"])
    with pytest.raises(ValueError, match="not in the"):
        analysis.weight_differences(init, init, ["nope.weight"])


def test_shared_histogram_counts_everything_on_one_set_of_bins():
    edges, counts = analysis.shared_histogram({"ft": np.array([-1.0, 0.0, 1.0]), "d3": np.zeros(5)}, bins=4)
    assert edges[0] == -1.0 and edges[-1] == 1.0 and len(edges) == 5
    assert counts["ft"].tolist() == [1, 0, 1, 1] and counts["d3"].tolist() == [0, 0, 5, 0]
    edges, counts = analysis.shared_histogram({"ft": np.zeros(3)}, bins=2)  # nothing moved
    assert counts["ft"].sum() == 3 and edges[0] < 0 < edges[-1]


# --- features and t-SNE ----------------------------------------------------------------------------------

def test_penultimate_features_are_the_last_linears_input(record):
    torch.manual_seed(TEST_SEED)
    model = build_model("small_cnn", 10, 1, 28).train()
    loader = Loader(record.clean_test.subset(torch.arange(37)), record.spec, batch_size=16)
    features = analysis.penultimate_features(model, loader)
    assert features.shape == (37, model.linear.in_features) and features.dtype == np.float32
    assert model.training, "the model's mode is restored"
    assert not model.linear._forward_hooks, "the hook is removed"
    model.eval()
    inputs = next(iter(loader))[0]
    with torch.no_grad():
        expected = model.relu(model.fc(model.features(inputs)))
    np.testing.assert_allclose(features[:16], expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no nn.Linear"):
        analysis.penultimate_features(nn.Sequential(nn.Flatten()), loader)


def test_embed_tsne_is_deterministic_for_a_seed_and_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(12, 1, (20, 8))]).astype(np.float32)
    first, again = analysis.embed_tsne(features, seed=3), analysis.embed_tsne(features, seed=3)
    assert first.shape == (40, 2) and np.array_equal(first, again)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.diag(np.full(40, np.inf))
    nearest = distances.argmin(1)
    assert ((nearest < 20) == (np.arange(40) < 20)).all(), "each point's nearest neighbour is in its own blob"
    with pytest.raises(ValueError, match="at least 4"):
        analysis.embed_tsne(features[:3], seed=0)


def test_without_scikit_learn_tsne_names_the_extra(analyze, monkeypatch, tmp_path, capsys):
    import sys
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn → ImportError
    with pytest.raises(ImportError, match=r"pip install 'd3-plugin\[analysis\]'"):
        analysis.embed_tsne(np.zeros((10, 3)), seed=0)
    assert analyze("tsne", "--samples", "30", "--out", str(tmp_path / "t")) == 2
    assert capsys.readouterr().err == ("d3-plugin analyze: error: t-SNE needs scikit-learn: "
                                       "pip install 'd3-plugin[analysis]'\n")
    assert not (tmp_path / "t").exists()


def test_sample_indices_seeded_sorted_and_capped():
    a = analysis.sample_indices(100, 10, seed=5)
    assert torch.equal(a, analysis.sample_indices(100, 10, seed=5)) and torch.equal(a, a.sort().values)
    assert len(set(a.tolist())) == 10 and not torch.equal(a, analysis.sample_indices(100, 10, seed=6))
    assert analysis.sample_indices(7, 30, seed=0).tolist() == list(range(7))


# --- cost ------------------------------------------------------------------------------------------------

def test_relative_cost_against_ft():
    rows = [{"defense": "no defense", "seed": None, "seconds": 0.0, "error": ""},
            {"defense": "ft", "seed": 0, "seconds": 10.0, "error": ""},
            {"defense": "d3", "seed": 0, "seconds": 12.0, "error": ""},
            {"defense": "ft", "seed": 1, "seconds": 30.0, "error": ""},
            {"defense": "d3", "seed": 1, "seconds": 28.0, "error": ""},
            {"defense": "anp", "seed": 0, "seconds": 5.0, "error": ""},
            {"defense": "anp", "seed": 1, "seconds": None, "error": "RuntimeError: boom"},
            {"defense": "nad", "seed": 0, "seconds": None, "error": "RuntimeError: boom"},
            {"defense": "ft", "seed": "mean", "seconds": 999.0, "error": ""}]
    table = {r["defense"]: r for r in analysis.relative_cost(rows)}
    assert list(table) == ["ft", "d3", "anp", "nad"]
    assert table["ft"]["relative_to_ft"] == 1.0 and table["ft"]["seconds_mean"] == 20.0
    assert table["ft"]["seconds_std"] == pytest.approx(200 ** 0.5) and table["ft"]["n"] == 2
    assert table["d3"]["relative_to_ft"] == pytest.approx(1.0) and table["anp"]["relative_to_ft"] == 0.25
    assert table["anp"]["n"] == 1 and table["anp"]["seconds_std"] is None
    assert table["nad"]["n"] == 0 and table["nad"]["relative_to_ft"] is None
    for without in ([r for r in rows if r["defense"] != "ft"], [{**r, "error": "x"} for r in rows]):
        with pytest.raises(ValueError, match="cost needs an ft row; add ft to the compare/grid"):
            analysis.relative_cost(without)


# --- the command line ------------------------------------------------------------------------------------

def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def analyze(record, monkeypatch):
    monkeypatch.setattr(records, "load_attack_result", lambda path, data_root=None: record)

    def run(*argv):
        return cli.main(["analyze", *argv, "--result_file", str(record.folder), "--ratio", "0.25",
                         "--device", "cpu", "--epochs", "1"])
    return run


def test_command_interpolate(analyze, record, tmp_path):
    out = tmp_path / "interp"
    assert analyze("interpolate", "--defense", "ft,d3", "--points", "3", "--out", str(out)) == 0
    rows = read_csv(out / "interpolate.csv")
    assert list(rows[0]) == ["defense", "t", "clean_loss", "bd_loss", "acc", "asr"]
    assert [(r["defense"], float(r["t"])) for r in rows] == [(d, t) for d in ("ft", "d3") for t in (0.0, 1.0, 2.0)]
    bench = bench_from_record(record, ratio=0.25, seed=0, device="cpu")
    own = bench.evaluate(bench.model)
    assert all(float(r["acc"]) == pytest.approx(own["acc"]) for r in rows if r["t"] == "0.0")
    assert all(0 <= float(r["asr"]) <= 1 and np.isfinite(float(r["bd_loss"])) for r in rows)
    assert (out / "interpolate.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == ["interpolate.csv", "interpolate.png"], "no temporary files"


def test_command_weights(analyze, tmp_path):
    out = tmp_path / "weights"
    assert analyze("weights", "--bins", "10", "--out", str(out)) == 0
    rows = read_csv(out / "weights.csv")
    assert [r["defense"] for r in rows] == ["ft"] * 10 + ["d3"] * 10
    size = sum(p.numel() for n, p in build_model("small_cnn", 10, 1, 28).named_parameters()
               if n in ("features.4.0.weight", "fc.weight", "linear.weight"))
    assert sum(int(r["count"]) for r in rows if r["defense"] == "d3") == size, "D3's θs for small_cnn by default"
    assert rows[0]["bin_left"] == rows[10]["bin_left"], "shared bins"
    summary = {r["defense"]: r for r in read_csv(out / "weights_summary.csv")}
    assert list(summary) == ["ft", "d3"] and summary["ft"]["layers"] == "features.4.0.weight fc.weight linear.weight"
    assert all(float(r["mean_abs"]) > 0 and -1 <= float(r["cosine"]) <= 1 for r in summary.values())
    assert (out / "weights.png").read_bytes()[:8] == PNG
    assert analyze("weights", "--defense", "ft", "--layers", "linear", "--out", str(tmp_path / "w2")) == 0
    assert read_csv(tmp_path / "w2" / "weights_summary.csv")[0]["n"] == str(64 * 10)


def test_command_tsne(analyze, tmp_path):
    out = tmp_path / "tsne"
    assert analyze("tsne", "--samples", "30", "--out", str(out)) == 0
    rows = read_csv(out / "tsne.csv")
    assert list(rows[0]) == ["stage", "kind", "label", "x", "y"]
    for stage in ("before", "after"):
        kinds = [r["kind"] for r in rows if r["stage"] == stage]
        assert kinds.count("clean") == 30 and kinds.count("poisoned") == 30
    assert (out / "tsne.png").read_bytes()[:8] == PNG
    first = (out / "tsne.csv").read_bytes()
    assert analyze("tsne", "--samples", "30", "--out", str(out)) == 0
    assert (out / "tsne.csv").read_bytes() == first, "seeded: the same record and seed give the same embedding"


def test_command_cost(tmp_path, capsys):
    folder = tmp_path / "compare"
    folder.mkdir()
    rows = [{"defense": "no defense", "seed": None, "seconds": 0.0, "error": ""},
            {"defense": "ft", "seed": 0, "seconds": 4.0, "error": ""},
            {"defense": "d3", "seed": 0, "seconds": 6.0, "error": ""}]
    (folder / "compare.json").write_text(json.dumps({"rows": rows, "aggregate": []}))
    assert cli.main(["analyze", "cost", "--from", str(folder)]) == 0
    table = read_csv(folder / "analyze" / "cost.csv")
    assert [(r["defense"], float(r["relative_to_ft"]), r["n"]) for r in table] == [("ft", 1.0, "1"), ("d3", 1.5, "1")]
    assert (folder / "analyze" / "cost.png").read_bytes()[:8] == PNG
    assert "1.50× FT" in capsys.readouterr().out

    (folder / "compare.json").write_text(json.dumps({"rows": rows[:1] + rows[2:]}))
    out = tmp_path / "nothing"
    assert cli.main(["analyze", "cost", "--from", str(folder / "compare.json"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == \
        "d3-plugin analyze: error: cost needs an ft row; add ft to the compare/grid"
    assert not out.exists(), "a failed analysis leaves no output folder"


def test_bad_input_is_one_line(record, tmp_path, monkeypatch, capsys):
    from d3_plugin.commands import analyze as command

    monkeypatch.setattr(records, "load_attack_result", lambda path, data_root=None: record)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = str(tmp_path / "never")
    cases = [(["interpolate", "--out", out], "--result_file is required"),
             (["weights", "--result_file", "r", "--defense", "nope", "--out", out], "unknown defense 'nope'"),
             (["tsne", "--result_file", "r", "--defense", "", "--out", out], "--defense is empty"),
             (["interpolate", "--result_file", "r", "--points", "1", "--out", out], "--points must be"),
             (["interpolate", "--result_file", "r", "--epochs", "-1", "--out", out], "--epochs must be"),
             (["weights", "--result_file", "r", "--layers", ",", "--out", out], "--layers is empty"),
             (["weights", "--result_file", "r", "--layers", "nope", "--out", out], "no module named nope"),
             (["tsne", "--result_file", "r", "--samples", "1", "--out", out], "--samples must be"),
             (["cost", "--out", out], "--from is required"),
             (["cost", "--from", str(tmp_path), "--out", out], "no compare.json"),
             (["weights", "--result_file", "r", "--set", "d3.nope=1", "--out", out], "nope")]
    for argv, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            command.run(parser.parse_args(argv))
        assert "\n" not in str(error.value), argv
    assert not (tmp_path / "never").exists()
    assert cli.main(["analyze", "weights", "--result_file", "r", "--defense", "ft,nope", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d3-plugin analyze: error: unknown defense 'nope'") and err.count("\n") == 1
