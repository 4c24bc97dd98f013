"""The D3 algorithm's pieces on hand-made tensors and tiny models: distance, projection, hinge, warm
start, objective scaling, determinism."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d3_plugin import d3
from d3_plugin.d3 import D3Config, clean_hinge, detoxify, distance, project, select_weights, warm_start

from conftest import TEST_SEED

pytestmark = pytest.mark.trained  # see conftest.py


class Tiny(nn.Module):
    """Conv → Linear head, with biases everywhere, and a nested block holding a Conv2d and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.block(torch.relu(self.conv(x)))))


def tiny_batches(seed=0, n=48, batch=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def tiny_model(seed=TEST_SEED):
    torch.manual_seed(seed)
    return Tiny()


# ---------------------------------------------------------------- distance

def test_distance_is_sum_of_frobenius_norms_not_squared():
    initial = {"a": torch.zeros(1, 2), "b": torch.ones(2, 2)}
    weights = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[1.0, 1.0], [1.0, 3.0]])}
    # ‖(3,4)‖ = 5 and ‖(0,0,0,2)‖ = 2 → 7 (squared would give 29, root of the sum √29)
    assert distance(weights, initial).item() == pytest.approx(7.0)


def test_distance_gradient_is_unit_direction_per_layer():
    initial = {"a": torch.zeros(1, 2), "b": torch.ones(2, 2)}
    a = torch.tensor([[3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[1.0, 1.0], [1.0, 3.0]], requires_grad=True)
    distance({"a": a, "b": b}, initial).backward()
    assert torch.allclose(a.grad, torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(b.grad, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_a_descent_step_on_minus_distance_increases_it():
    torch.manual_seed(TEST_SEED)
    initial = {"w": torch.randn(4, 5)}
    w = (initial["w"] + 0.1 * torch.randn(4, 5)).requires_grad_()
    before = distance({"w": w}, initial)
    (-before).backward()
    with torch.no_grad():
        w -= 0.5 * w.grad
    after = distance({"w": w}, initial)
    assert after.item() == pytest.approx(before.item() + 0.5, rel=1e-5)  # unit gradient: exactly + lr


# ---------------------------------------------------------------- select_weights

def test_select_weights_default_is_every_linear_weight_without_biases():
    model = tiny_model()
    chosen = select_weights(model)
    assert sorted(chosen) == ["block.2.weight", "head.weight"]
    assert chosen["head.weight"] is model.head.weight


def test_select_weights_named_modules_take_linear_and_conv_inside():
    model = tiny_model()
    chosen = select_weights(model, ["block"])
    assert sorted(chosen) == ["block.0.weight", "block.2.weight"]
    assert chosen["block.0.weight"] is model.block[0].weight
    assert sorted(select_weights(model, ["conv", "head"])) == ["conv.weight", "head.weight"]


def test_select_weights_unknown_name_and_no_linear_are_errors():
    with pytest.raises(ValueError, match="no module named nope"):
        select_weights(tiny_model(), ["nope"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        select_weights(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^1 hold\(s\) no nn.Linear or nn.Conv2d weights"):
        select_weights(with_bn, ["1"])  # the BatchNorm: its own message, not "the model has no nn.Linear"


# ---------------------------------------------------------------- projection

def test_project_rescales_to_target_norm_and_leaves_zero_alone():
    weights = {"a": torch.tensor([[3.0, 4.0]]), "z": torch.zeros(2, 2)}
    project(weights, {"a": torch.tensor(10.0), "z": torch.tensor(1.0)})
    assert torch.allclose(weights["a"], torch.tensor([[6.0, 8.0]]))
    assert torch.equal(weights["z"], torch.zeros(2, 2))


@pytest.mark.parametrize("warm", ["random", "middle"])
def test_detoxify_keeps_every_selected_norm_after_real_steps(warm):
    model = tiny_model()
    config = D3Config(epochs=2, lr=0.5, warm_start=warm, layers=["block", "head"], seed=1)
    initial = {name: torch.linalg.vector_norm(w).item() for name, w in select_weights(model, config.layers).items()}
    purified, history = detoxify(model, tiny_batches(), config)
    final = select_weights(purified, config.layers)
    assert history[-1]["distance"] > 0  # the weights really moved
    for name, norm in initial.items():
        assert torch.linalg.vector_norm(final[name]).item() == pytest.approx(norm, rel=1e-5), name
    # the original model is untouched (detoxify works on a copy)
    assert all(torch.linalg.vector_norm(w).item() == pytest.approx(initial[n])
               for n, w in select_weights(model, config.layers).items())


def test_theta_s_and_the_rest_take_their_own_lr_and_only_theta_s_is_projected():
    model = tiny_model()
    config = D3Config(epochs=1, lr=0.5, lr_rest=1e-30, layers=["head"], seed=1)
    groups = d3.parameter_groups(model, select_weights(model, config.layers), config)
    assert [len(g["params"]) for g in groups] == [1, len(list(model.parameters())) - 1]
    assert groups[1]["lr"] == 1e-30 and "lr" not in groups[0]  # θs take the optimizer's lr
    assert [id(p) for p in d3.parameter_groups(model, {}, D3Config())] == [id(p) for p in model.parameters()]
    purified, _ = detoxify(model, tiny_batches(), config)
    before, after = dict(model.named_parameters()), dict(purified.named_parameters())
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert all(torch.allclose(before[n], after[n], atol=1e-12) for n in before if n != "head.weight")


def test_the_solver_defaults_per_architecture_and_the_paper_preset():
    from d3_plugin import registry
    small, paper = registry.build("d3", model="small_cnn"), registry.build("d3", model="small_cnn", preset="paper")
    assert (small.config.lr, small.config.lr_rest) == (0.1, 0.01)  # measured: docs/d3-efficacy.md
    assert (paper.config.lr, paper.config.lr_rest, paper.config.lam) == (0.01, None, 10.0)  # the code's single lr
    assert registry.build("d3", model="small_cnn", lr=0.05).config.lr_rest == 0.01  # a user's lr moves θs only
    preact = registry.build("d3", model="preactresnet18")
    assert (preact.config.lr, preact.config.lr_rest) == (0.01, None)  # not yet measured there: the code's


# ---------------------------------------------------------------- hinge and objective

def _logits_with_losses(losses):
    """Two-class logits whose per-sample cross-entropy (label 0) equals `losses`."""
    losses = torch.tensor(losses)
    margin = -torch.log(torch.expm1(losses))  # CE = log(1 + e^{-m}) → m = −log(e^{CE} − 1)
    return torch.stack([margin, torch.zeros_like(margin)], 1), torch.zeros(len(losses), dtype=torch.long)


def test_hinge_is_zero_below_eps_in_both_variants():
    logits, labels = _logits_with_losses([0.01, 0.05, 0.09])
    for mode in ("sample", "batch"):
        hinge, clean = clean_hinge(logits, labels, 0.1, mode)
        assert hinge.item() == 0.0
        assert clean.item() == pytest.approx(0.05, rel=1e-4)


def test_hinge_variants_differ_when_mean_is_below_eps_but_a_sample_is_above():
    logits, labels = _logits_with_losses([0.01, 0.01, 0.16])  # mean 0.06 < 0.1, one sample 0.16 > 0.1
    assert F.cross_entropy(logits, labels).item() == pytest.approx(0.06, rel=1e-4)
    per_sample, _ = clean_hinge(logits, labels, 0.1, "sample")
    per_batch, _ = clean_hinge(logits, labels, 0.1, "batch")
    assert per_batch.item() == 0.0
    assert per_sample.item() == pytest.approx(0.06 / 3, rel=1e-3)
    above, _ = clean_hinge(logits, labels, 0.02, "batch")
    assert above.item() == pytest.approx(0.04, rel=1e-3)


@pytest.mark.parametrize("lam, normalize, factor", [(10.0, True, 1 / 11), (10.0, False, 1.0),
                                                     (0.5, True, 1.0), (1.0, True, 1.0)])
def test_objective_normalisation_only_when_lambda_above_one(lam, normalize, factor):
    model = tiny_model()
    weights = select_weights(model)
    initial = {name: w.detach() + 0.3 for name, w in weights.items()}
    x, y = tiny_batches()[0]
    config = D3Config(lam=lam, eps=0.0, normalize=normalize)
    loss, stats = d3.objective(weights, initial, config)(model, x, y)
    raw = lam * stats["hinge"] - stats["distance"]
    assert stats["distance"].item() > 0 and stats["hinge"].item() > 0
    assert loss.item() == pytest.approx(factor * raw.item(), rel=1e-5)
    assert stats["hinge"].item() == pytest.approx(stats["clean_loss"].item(), rel=1e-5)  # ε = 0


def test_soft_label_loss_is_zero_at_the_teacher_and_matches_t2_kl():
    logits, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    assert d3.soft_label_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    p, q = F.softmax(teacher / 2, 1), F.softmax(logits / 2, 1)
    expected = 4 * (p * (p.log() - q.log())).sum()
    assert d3.soft_label_loss(logits, teacher, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_adds_its_weighted_term_and_is_off_by_default():
    model, teacher = tiny_model(), tiny_model(1)
    weights = select_weights(model)
    initial = {name: w.detach() + 0.3 for name, w in weights.items()}
    x, y = tiny_batches()[0]
    plain, plain_stats = d3.objective(weights, initial, D3Config())(model, x, y)
    config = D3Config(distill=2.0, distill_temperature=3.0)
    loss, stats = d3.objective(weights, initial, config, teacher)(model, x, y)
    soft = d3.soft_label_loss(model(x), teacher(x), 3.0)
    assert "distill" not in plain_stats and stats["distill"].item() == pytest.approx(soft.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 2.0 * soft.item(), rel=1e-5)


def test_detoxify_distils_from_the_input_model_it_was_given():
    model = tiny_model()
    purified, history = detoxify(model, tiny_batches(), D3Config(epochs=2, lr=0.1, distill=1.0))
    assert all("distill" in row and math.isfinite(row["distill"]) for row in history)
    assert all(p.requires_grad for p in model.parameters())  # the input model (the teacher's source) is untouched
    _, plain = detoxify(model, tiny_batches(), D3Config(epochs=2, lr=0.1))
    assert "distill" not in plain[0]


# ---------------------------------------------------------------- warm start

def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 7, generator=g), "b": torch.randn(3, 5, generator=g) * 4}


@pytest.mark.parametrize("mode", ["near", "random", "far", "noise"])
def test_warm_start_keeps_the_norm(mode):
    weights = _weights()
    norms = {n: torch.linalg.vector_norm(w).item() for n, w in weights.items()}
    original = {n: w.clone() for n, w in weights.items()}
    warm_start(weights, mode, torch.Generator().manual_seed(0))
    for name, w in weights.items():
        assert torch.linalg.vector_norm(w).item() == pytest.approx(norms[name], rel=1e-5)
        assert torch.equal(w, original[name]) == (mode == "near")


def test_warm_start_far_is_minus_w_and_middle_is_zero():
    weights, original = _weights(), _weights()
    warm_start(weights, "far", torch.Generator())
    assert all(torch.allclose(weights[n], -original[n]) for n in weights)
    warm_start(weights, "middle", torch.Generator())
    assert all(torch.count_nonzero(w) == 0 for w in weights.values())


@pytest.mark.parametrize("mode", ["random", "noise"])
def test_warm_start_random_modes_follow_the_generator(mode):
    def run(seed):
        weights = _weights()
        warm_start(weights, mode, torch.Generator().manual_seed(seed))
        return weights

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.allclose(first["a"], other["a"])


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="hinge"):
        D3Config(hinge="mean")
    with pytest.raises(ValueError, match="warm_start"):
        D3Config(warm_start="close")
    with pytest.raises(ValueError):
        D3Config(lam=-1)


@pytest.mark.parametrize("option, value, message", [
    ("lr", float("nan"), "lr must be a finite number"), ("lam", float("inf"), "lam must be a finite number"),
    ("eps", float("nan"), "eps must be a finite number"), ("weight_decay", -1.0, "weight_decay must be"),
    ("lr", 0.0, "lr must be > 0"), ("momentum", 1.0, "momentum < 1"), ("batch_size", 0, "batch_size must be an integer ≥ 1"),
    ("epochs", -1, "epochs must be an integer ≥ 0"), ("epochs", 2.5, "epochs must be an integer"),
    ("distill", -1.0, "distill must be a finite number"), ("distill_temperature", 0.0, "distill_temperature must be > 0"),
    ("lr_rest", 0.0, "lr_rest must be a finite number > 0"), ("lr_rest", float("nan"), "lr_rest must be"),
    ("lr_rest", True, "lr_rest must be")])
def test_config_rejects_non_finite_and_out_of_range_settings_in_one_line(option, value, message):
    with pytest.raises(ValueError, match=message) as error:
        D3Config(**{option: value})
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- determinism

def test_same_seed_same_history_different_seed_different():
    def run(seed):
        torch.manual_seed(123)  # anything drawn from the global generator must not matter
        purified, history = detoxify(tiny_model(), tiny_batches(), D3Config(epochs=3, lr=0.1, seed=seed))
        return history, purified.head.weight.detach()

    (h1, w1), (h2, w2), (h3, w3) = run(0), run(0), run(1)
    assert h1 == h2 and torch.equal(w1, w2)
    assert h1 != h3 and not torch.equal(w1, w3)
    assert [row["epoch"] for row in h1] == [1, 2, 3]
    assert {"lr", "loss", "clean_loss", "hinge", "distance"} <= set(h1[0])
    assert all(math.isfinite(v) for row in h1 for v in row.values())


# ---------------------------------------------------------------- candidates of issue 28 (off by default)

def test_mixup_mixes_pairs_of_the_batch_and_the_hinge_takes_its_soft_targets():
    torch.manual_seed(0)
    x, y = tiny_batches()[0]
    images, (first, second, a) = d3.mixed(x, y, 1.0)
    assert torch.equal(first, y) and sorted(second.tolist()) == sorted(y.tolist())  # a permutation of the labels
    assert ((a >= 0) & (a <= 1)).all()
    logits = torch.randn(len(x), 3)
    _, mixed_loss = d3.clean_hinge(logits, (first, second, a), 0.0)
    expected = (a * F.cross_entropy(logits, first, reduction="none")
                + (1 - a) * F.cross_entropy(logits, second, reduction="none")).mean()
    assert mixed_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_unlearning_shortcut_stays_in_its_budget_and_enters_the_objective():
    from d3_plugin.data import DatasetSpec, ImageSet, Loader
    spec = DatasetSpec("tiny", 3, 1, 4, (0.5,), (0.5,))
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (48, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(48) % 3)
    batches = Loader(data, spec, 16, train=True, seed=0)
    model = tiny_model()
    delta, box = d3.input_shortcut(model, batches, eps=0.1)
    assert delta.shape == (1, 1, 4, 4) and (delta / box.scale).abs().max() <= 0.1 + 1e-6
    purified, history = detoxify(model, batches, D3Config(epochs=1, lr=0.1, unlearn=1.0))
    assert math.isfinite(history[0]["unlearn"])
